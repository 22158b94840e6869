"""The continuous anomaly map, as a Parametric Map or a FRACTIONAL SEG.

The engine's map is a float in 0..1 where 0.5 is the calibrated threshold
(``map >= 0.5`` ⇔ raw score ≥ threshold).

* ``parametric`` (default): a Parametric Map of the 0..1 score in 32-bit
  floats (Float Pixel Data, identity Real World Value Mapping, unit "no
  units", Frame Anatomy). OHIF (``@cornerstonejs/adapters``' ParametricMap,
  shown as a fused colour map) and 3D Slicer (dcmqi's ``paramap2itkimage``)
  load it. 4 bytes per voxel.
* ``fractional``: a FRACTIONAL SEG (type PROBABILITY, 8 bits, maximum 255),
  one segment "Anomaly score". 3D Slicer shows it as a heat map; OHIF's
  adapters refuse FRACTIONAL SEGs ("Fractional segmentations are not yet
  supported"). The values are a calibrated anomaly score, not a
  probability in the statistical sense; the segment label says so.

Both keep one frame per source slice and reference the source images frame by
frame, like the binary SEG. Neither carries General Series Laterality (see
:func:`build_parametric_map` and ``worker.outputs.seg``).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from . import NOT_FOR_CLINICAL_USE
from .seg import algorithm_identification
from .settings import OutputSettings
from .source import SourceSeries
from .types import AlgorithmInfo
from .uids import UIDFactory

__all__ = ["build_anomaly_map", "build_fractional_map", "build_parametric_map", "frame_anatomy"]

_UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")


def _unit_map(anomaly_map: np.ndarray) -> np.ndarray:
    amap = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(amap, 0.0, 1.0)


def build_fractional_map(
    source: SourceSeries,
    anomaly_map: np.ndarray,
    *,
    algorithm: AlgorithmInfo,
    uids: UIDFactory,
    settings: OutputSettings,
) -> hd.seg.Segmentation:
    """FRACTIONAL SEG (PROBABILITY, 0..255) of the anomaly map."""
    source.check_shape(anomaly_map, "anomaly map")
    pixels = source.to_source_order(_unit_map(anomaly_map))
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Anomaly score",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm),
        tracking_uid=uids.tracking("map"),
        tracking_id="Anomaly score",
    )
    seg = hd.seg.Segmentation(
        source_images=source.datasets,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        segment_descriptions=[segment],
        series_instance_uid=uids.series("map:fractional"),
        series_number=settings.map_series_number,
        sop_instance_uid=uids.instance("map:fractional"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        device_serial_number=settings.device_serial_number,
        content_label="ANOMALYMAP",
        content_description=f"AI anomaly score 0..1 (0.5 = threshold) - {NOT_FOR_CLINICAL_USE}"[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
        series_description=settings.map_series_description,
        institution_name=settings.institution_name or None,
    )
    return seg  # no Laterality: see worker.outputs.seg


def frame_anatomy(source: SourceSeries) -> Dataset:
    """Frame Anatomy functional group item (Mandatory in the Parametric Map IOD).

    Anatomic region: the source's Anatomic Region Sequence, else its Body
    Part Examined through highdicom's table of the standard's pairings, else
    SCT 38266002 "Entire body". Frame Laterality: the source's R/L/B, else U.
    dcmqi (3D Slicer) does not read a Parametric Map without it.
    """
    from highdicom._standard_utils import get_anatomic_region_map  # pinned highdicom (<0.29)

    first = source.first
    item = Dataset()
    region: Dataset | None = None
    if first.get("AnatomicRegionSequence"):
        region = first.AnatomicRegionSequence[0]
    else:
        known = get_anatomic_region_map().get(str(first.get("BodyPartExamined", "") or "").upper())
        concept = known[0] if known else hd.sr.CodedConcept("38266002", "SCT", "Entire body")
        region = Dataset()
        region.CodeValue = concept.value
        region.CodingSchemeDesignator = concept.scheme_designator
        region.CodeMeaning = concept.meaning
    item.AnatomicRegionSequence = [region]
    side = str(first.get("Laterality", "") or first.get("ImageLaterality", "") or "")
    item.FrameLaterality = side if side in ("R", "L", "B") else "U"
    return item


def build_parametric_map(
    source: SourceSeries,
    anomaly_map: np.ndarray,
    *,
    algorithm: AlgorithmInfo,
    uids: UIDFactory,
    settings: OutputSettings,
) -> hd.pm.ParametricMap:
    """Parametric Map of the 0..1 score as 32-bit floats (identity Real World Value Mapping).

    Float pixel data and a Frame Anatomy functional group are what dcmqi's
    ``paramap2itkimage`` (3D Slicer) needs; Cornerstone3D's ParametricMap
    adapter (OHIF) reads 16/32-bit integers and floats alike. With Frame
    Laterality present, General Series Laterality is left out (dciodvfy: its
    condition is then unsatisfied).
    """
    source.check_shape(anomaly_map, "anomaly map")
    values = source.to_source_order(_unit_map(anomaly_map)).astype(np.float32)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY",
        lut_explanation="Anomaly score (0.5 = calibrated threshold)",
        unit=_UNITLESS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=codes.SCT.Score,
    )
    pm = hd.pm.ParametricMap(
        source_images=source.datasets,
        pixel_array=values,
        series_instance_uid=uids.series("map:parametric"),
        series_number=settings.map_series_number,
        sop_instance_uid=uids.instance("map:parametric"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        device_serial_number=settings.device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="ANOMALYMAP",
        content_description=f"AI anomaly score 0..1 (0.5 = threshold) - {NOT_FOR_CLINICAL_USE}"[:64],
        series_description=settings.map_series_description,
        institution_name=settings.institution_name or None,
    )
    pm.ContentCreatorName = ""  # Type 2 of the Content Identification macro (dcmqi warns without it)
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [frame_anatomy(source)]
    _store_along_slice_normal(pm)
    return pm


def _store_along_slice_normal(pm: Dataset) -> None:
    """Store the frames in increasing position along row × column direction (in place).

    highdicom stores them in the opposite order (its volume index convention).
    The frame order of an enhanced object is free, but both Cornerstone3D's
    ParametricMap adapter (OHIF: the pixel data as stored, put into the source
    volume's slice order) and dcmqi's ``paramap2itkimage`` (frame ``k`` at
    slice ``k`` from the lowest position) take the stored order as the volume
    order; each frame keeps its functional groups, so the object stays the same.
    """
    frames = pm.PerFrameFunctionalGroupsSequence
    if len(frames) < 2:
        return
    shared = pm.SharedFunctionalGroupsSequence[0]
    orient = (shared.get("PlaneOrientationSequence") or frames[0].PlaneOrientationSequence)[0]
    iop = np.asarray([float(v) for v in orient.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    along = [float(np.dot([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient], normal)) for f in frames]
    order = np.argsort(along, kind="stable")
    if (order == np.arange(len(frames))).all():
        return
    pixels = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(len(frames), -1)
    pm.FloatPixelData = pixels[order].tobytes()
    pm.PerFrameFunctionalGroupsSequence = [frames[int(k)] for k in order]


def build_anomaly_map(
    source: SourceSeries,
    anomaly_map: np.ndarray,
    *,
    algorithm: AlgorithmInfo,
    uids: UIDFactory,
    settings: OutputSettings,
) -> hd.seg.Segmentation | hd.pm.ParametricMap | None:
    """The map in the configured form (``settings.anomaly_map``), or ``None`` for "none"."""
    if settings.anomaly_map == "fractional":
        return build_fractional_map(source, anomaly_map, algorithm=algorithm, uids=uids, settings=settings)
    if settings.anomaly_map == "parametric":
        return build_parametric_map(source, anomaly_map, algorithm=algorithm, uids=uids, settings=settings)
    return None
