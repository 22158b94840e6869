-- Auto-route new image series to pacs-node (DicomModalities "pacsnode").
--
-- When a study is stable (no instance for StableAge seconds), every image
-- series not yet forwarded is sent with C-STORE. Skipped, so that results
-- never loop back to the node:
--   * derived objects (SEG, SR, KO, PR, ...) - the node's own results;
--   * series received from the node itself (RemoteAET PACSNODE);
--   * series already forwarded (user metadata PacsNodeForwarded), so the
--     arrival of the node's SEG/SR does not send the images a second time.

local NODE_MODALITY = 'pacsnode'
local NODE_AET = 'PACSNODE'
local NOT_IMAGES = { SEG = true, SR = true, KO = true, PR = true, DOC = true, REG = true,
                     RTSTRUCT = true, RWV = true, OT = true }

local function remoteAet(seriesId)
  local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
  if #instances == 0 then
    return nil
  end
  local ok, aet = pcall(RestApiGet, '/instances/' .. instances[1]['ID'] .. '/metadata/RemoteAET')
  if ok then
    return aet
  end
  return nil
end

local function alreadyForwarded(seriesId)
  local ok, _ = pcall(RestApiGet, '/series/' .. seriesId .. '/metadata/PacsNodeForwarded')
  return ok
end

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  for _, s in ipairs(series) do
    local modality = s['MainDicomTags']['Modality'] or ''
    if not NOT_IMAGES[modality] and not alreadyForwarded(s['ID']) and remoteAet(s['ID']) ~= NODE_AET then
      print('pacs-node autoroute: study ' .. studyId .. ' series ' .. s['ID'] .. ' (' .. modality .. ')')
      SendToModality(s['ID'], NODE_MODALITY)
      RestApiPut('/series/' .. s['ID'] .. '/metadata/PacsNodeForwarded', '1')
    end
  end
end
