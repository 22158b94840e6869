-- Auto-route new image series to pacs-node (DicomModalities "pacsnode").
--
-- When a study is stable (no instance for StableAge seconds), every image
-- series not yet forwarded is sent with C-STORE (one association, through
-- the REST route /modalities/pacsnode/store; the Lua SendToModality() only
-- takes instances). Skipped, so that results never loop back to the node:
--   * derived objects (SEG, SR, KO, PR, ...) - the node's own results;
--   * series received from the node itself (RemoteAET PACSNODE);
--   * series already forwarded (user metadata PacsNodeForwarded), so the
--     arrival of the node's SEG/SR does not send the images a second time.

local NODE_MODALITY = 'pacsnode'
local NODE_AET = 'PACSNODE'
local NOT_IMAGES = { SEG = true, SR = true, KO = true, PR = true, DOC = true, REG = true,
                     RTSTRUCT = true, RWV = true, OT = true }

-- Whether a resource has a metadata entry. (Orthanc's RestApiGet returns nil
-- and logs an error for a missing entry, so list the names first.)
local function hasMetadata(uri, name)
  local names = RestApiGet(uri .. '/metadata')
  if names == nil then
    return false
  end
  for _, n in ipairs(ParseJson(names)) do
    if n == name then
      return true
    end
  end
  return false
end

local function remoteAet(seriesId)
  local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
  if #instances == 0 then
    return nil
  end
  local uri = '/instances/' .. instances[1]['ID']
  if hasMetadata(uri, 'RemoteAET') then
    return RestApiGet(uri .. '/metadata/RemoteAET')
  end
  return nil
end

local function alreadyForwarded(seriesId)
  return hasMetadata('/series/' .. seriesId, 'PacsNodeForwarded')
end

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local ids = {}
  for _, s in ipairs(series) do
    local modality = s['MainDicomTags']['Modality'] or ''
    if not NOT_IMAGES[modality] and not alreadyForwarded(s['ID']) and remoteAet(s['ID']) ~= NODE_AET then
      print('pacs-node autoroute: study ' .. studyId .. ' series ' .. s['ID'] .. ' (' .. modality .. ')')
      table.insert(ids, s['ID'])
    end
  end
  if #ids == 0 then
    return
  end
  -- Synchronous C-STORE; nil when the node refused or could not be reached
  -- (the series then stay unmarked and go again when the study changes).
  local answer = RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
                             DumpJson({ Resources = ids, Synchronous = true }, true))
  if answer == nil then
    print('pacs-node autoroute: sending study ' .. studyId .. ' to ' .. NODE_MODALITY .. ' failed')
    return
  end
  for _, id in ipairs(ids) do
    RestApiPut('/series/' .. id .. '/metadata/PacsNodeForwarded', '1')
  end
end
