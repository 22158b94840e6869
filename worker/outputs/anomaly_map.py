"""The continuous anomaly map, as a FRACTIONAL SEG or a Parametric Map.

The engine's map is a float in 0..1 where 0.5 is the calibrated threshold
(``map >= 0.5`` ⇔ raw score ≥ threshold).

* ``fractional``: a FRACTIONAL SEG (type PROBABILITY, 8 bits, maximum 255),
  one segment "Anomaly score". Viewers that show SEGs (OHIF, 3D Slicer) show
  it as a heat map. The values are a calibrated anomaly score, not a
  probability in the statistical sense; the segment label says so.
* ``parametric``: a Parametric Map with 16-bit unsigned integers and a Real
  World Value Mapping (slope 1/10000) back to the 0..1 score, unit "no units".

Both keep one frame per source slice and reference the source images frame by
frame, like the binary SEG.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from . import NOT_FOR_CLINICAL_USE
from .seg import algorithm_identification
from .settings import OutputSettings
from .source import SourceSeries
from .types import AlgorithmInfo
from .uids import UIDFactory

__all__ = ["PM_SCALE", "build_anomaly_map", "build_fractional_map", "build_parametric_map"]

#: Stored value = round(score * PM_SCALE) in the Parametric Map.
PM_SCALE = 10000
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
    return hd.seg.Segmentation(
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


def build_parametric_map(
    source: SourceSeries,
    anomaly_map: np.ndarray,
    *,
    algorithm: AlgorithmInfo,
    uids: UIDFactory,
    settings: OutputSettings,
) -> hd.pm.ParametricMap:
    """Parametric Map (uint16, Real World Value Mapping to the 0..1 score)."""
    source.check_shape(anomaly_map, "anomaly map")
    stored = np.rint(source.to_source_order(_unit_map(anomaly_map)) * PM_SCALE).astype(np.uint16)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY",
        lut_explanation="Anomaly score (0.5 = calibrated threshold)",
        unit=_UNITLESS,
        value_range=(0, PM_SCALE),
        slope=1.0 / PM_SCALE,
        intercept=0.0,
        quantity_definition=codes.SCT.Score,
    )
    pm = hd.pm.ParametricMap(
        source_images=source.datasets,
        pixel_array=stored,
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
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=PM_SCALE / 2, window_width=PM_SCALE)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="ANOMALYMAP",
        content_description=f"AI anomaly score 0..1 (0.5 = threshold) - {NOT_FOR_CLINICAL_USE}"[:64],
        series_description=settings.map_series_description,
        institution_name=settings.institution_name or None,
    )
    # General Series Laterality is Type 2C; dciodvfy requires it on a
    # Parametric Map without frame laterality: copy the source's (or empty).
    pm.Laterality = source.first.get("Laterality", "")
    return pm


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
