// Loads the node's outputs with OHIF's own parsers (dcmjs and
// @cornerstonejs/adapters, the code OHIF runs in the browser) and prints
// what they made of them as JSON, for tests/outputs/test_viewers.py.
//
//   node viewers.mjs manifest.json
//
// manifest: {"source": [paths of the source series], "seg": path|null,
//            "map": path|null, "sr": path|null}
// Every source image gets the imageId "pacsnode:<SOP Instance UID>", its
// metadata from its own header (the modules Cornerstone3D's DICOM image
// loader provides); results name images by their index in "source".
import fs from "node:fs";
import * as dcmjs from "dcmjs";
import * as core from "@cornerstonejs/core";
import { adaptersSEG, adaptersSR, adaptersPMAP } from "@cornerstonejs/adapters";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function read(path) {
  const buf = fs.readFileSync(path);
  const arrayBuffer = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  const dict = DicomMessage.readFile(arrayBuffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(dict.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(dict.meta);
  return { dataset, arrayBuffer };
}

const numbers = (v) => (Array.isArray(v) ? v.map(Number) : [Number(v)]);
const manifest = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const imageIds = [];
const headers = new Map();
for (const path of manifest.source) {
  const { dataset } = read(path);
  const id = `pacsnode:${dataset.SOPInstanceUID}`;
  imageIds.push(id);
  headers.set(id, dataset);
}
const indexOf = (id) => imageIds.indexOf(id);

// The modules @cornerstonejs/dicom-image-loader derives from a header.
core.metaData.addProvider((type, imageId) => {
  const ds = headers.get(imageId);
  if (!ds) return undefined;
  const iop = numbers(ds.ImageOrientationPatient);
  const spacing = numbers(ds.PixelSpacing);
  switch (type) {
    case "instance":
      return ds;
    case "imagePlaneModule":
      return {
        frameOfReferenceUID: ds.FrameOfReferenceUID, rows: ds.Rows, columns: ds.Columns,
        imageOrientationPatient: iop, rowCosines: iop.slice(0, 3), columnCosines: iop.slice(3, 6),
        imagePositionPatient: numbers(ds.ImagePositionPatient), sliceThickness: Number(ds.SliceThickness),
        pixelSpacing: spacing, rowPixelSpacing: spacing[0], columnPixelSpacing: spacing[1],
      };
    case "generalImageModule":
      return { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: ds.InstanceNumber };
    case "sopCommonModule":
      return { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID };
    case "generalSeriesModule":
      return { modality: ds.Modality, seriesInstanceUID: ds.SeriesInstanceUID, studyInstanceUID: ds.StudyInstanceUID };
    case "imagePixelModule":
      return {
        samplesPerPixel: ds.SamplesPerPixel, photometricInterpretation: ds.PhotometricInterpretation,
        rows: ds.Rows, columns: ds.Columns, bitsAllocated: ds.BitsAllocated, bitsStored: ds.BitsStored,
        highBit: ds.HighBit, pixelRepresentation: ds.PixelRepresentation,
      };
    default:
      return undefined;
  }
}, 10000);

const errorOf = (e) => `${e && e.message ? e.message : e}`;
const out = {};

// SEG the way OHIF's cornerstone-dicom-seg extension loads it.
async function loadSeg(path) {
  const { arrayBuffer } = read(path);
  const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    imageIds, arrayBuffer, { metadataProvider: core.metaData });
  const segments = {};
  for (const [number, item] of result.segMetadata.data.entries()) {
    if (item) segments[number] = { label: item.SegmentLabel, voxels: 0, images: [] };
  }
  // one label map image per source image; the value of a pixel is its segment number
  for (const image of result.labelMapImages.flat()) {
    const index = indexOf(image.referencedImageId);
    const pixels = image.getPixelData();
    for (let i = 0; i < pixels.length; i++) {
      const seg = segments[pixels[i]];
      if (!seg) continue;
      seg.voxels += 1;
      if (seg.images[seg.images.length - 1] !== index) seg.images.push(index);
    }
  }
  for (const seg of Object.values(segments)) seg.images.sort((a, b) => a - b);
  return { segments, overlapping: Boolean(result.overlappingSegments) };
}

// Parametric Map the way OHIF's cornerstone-dicom-pmap extension loads it:
// the adapter's pixel data set into a volume derived from the source series,
// whose slices are the source imageIds in Cornerstone3D's volume order.
async function loadMap(path) {
  const { arrayBuffer, dataset } = read(path);
  if (dataset.Modality === "SEG") {
    // a FRACTIONAL SEG goes through the SEG loader (which refuses it)
    return await loadSeg(path);
  }
  const volumeIds = core.utilities.sortImageIdsAndGetSpacing([...imageIds]).sortedImageIds;
  const { pixelData } = await adaptersPMAP.Cornerstone3D.ParametricMap.generateToolState(
    volumeIds, arrayBuffer, core.metaData);
  const perImage = Number(dataset.Rows) * Number(dataset.Columns);
  const sums = [];
  let nonzero = 0;
  for (let z = 0; z < volumeIds.length; z++) {
    let sum = 0;
    for (let i = z * perImage; i < (z + 1) * perImage; i++) {
      sum += pixelData[i];
      if (pixelData[i]) nonzero += 1;
    }
    sums.push(sum);
  }
  // image (index into "source") of each volume slice
  return { length: pixelData.length, nonzero, sums, images: volumeIds.map(indexOf) };
}

// SR the way OHIF hydrates it (extensions/cornerstone-dicom-sr).
function loadSr(path) {
  const { dataset } = read(path);
  const byUid = {};
  for (const id of imageIds) byUid[`${headers.get(id).SOPInstanceUID}:1`] = id;
  const state = adaptersSR.Cornerstone3D.MeasurementReport.generateToolState(dataset, byUid, core.metaData);
  const tools = {};
  for (const [tool, items] of Object.entries(state)) {
    tools[tool] = items.map((s) => ({
      label: s.annotation.data.label ?? null,
      finding: s.finding ? s.finding.CodeMeaning : null,
      image: indexOf(s.annotation.metadata.referencedImageId),
      polyline: s.annotation.data.contour ? s.annotation.data.contour.polyline : null,
      closed: s.annotation.data.contour ? s.annotation.data.contour.closed : null,
      stats: Object.values(s.annotation.data.cachedStats || {})[0] ?? null,
      tracking: s.TrackingUniqueIdentifier ?? null,
    }));
  }
  return { tools };
}

for (const [key, load] of [["seg", loadSeg], ["map", loadMap], ["sr", loadSr]]) {
  if (!manifest[key]) continue;
  try {
    out[key] = await load(manifest[key]);
  } catch (e) {
    out[key] = { error: errorOf(e) };
  }
}
process.stdout.write(JSON.stringify(out));
