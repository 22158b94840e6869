"""BINARY DICOM SEG of the anomaly mask (highdicom only).

One segment, number 1, "Anomaly": category SCT 49755003 "Morphologically
abnormal structure", type SCT 52988006 "Lesion", algorithm type AUTOMATIC with
the algorithm's name, version and family (DCM 123110 "Artificial
Intelligence"). The SEG references the source series (ReferencedSeriesSequence)
and, frame by frame, the source image (and frame) it was derived from
(DerivationImageSequence/SourceImageSequence of each per-frame functional
group).

Empty frames are kept by default (``seg_omit_empty_frames = false``): one SEG
frame per source slice is the layout all viewers place correctly. When frames
are omitted, highdicom still records for every remaining frame its own source
image reference and plane position; ``tests/outputs`` checks both layouts.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from . import NOT_FOR_CLINICAL_USE
from .settings import OutputSettings
from .source import SourceSeries
from .types import AlgorithmInfo
from .uids import UIDFactory

__all__ = ["SEGMENT_LABEL", "algorithm_identification", "anomaly_segment", "build_seg"]

SEGMENT_LABEL = "Anomaly"
#: Display colour of the segment (CIELab of pure red), as viewers show it.
_RED = hd.color.CIELabColor(53.24, 80.09, 67.2)


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence: name, version, family AI, parameters."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=algorithm.version[:64],
        parameters=algorithm.parameters() or None,
    )


def anomaly_segment(algorithm: AlgorithmInfo, uids: UIDFactory, label: str = SEGMENT_LABEL) -> hd.seg.SegmentDescription:
    """Description of segment 1 (anomaly) with coded concepts."""
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm),
        tracking_uid=uids.tracking("segment-1"),
        tracking_id=label,
        display_color=_RED,
    )


def build_seg(
    source: SourceSeries,
    mask: np.ndarray,
    *,
    algorithm: AlgorithmInfo,
    uids: UIDFactory,
    settings: OutputSettings,
) -> hd.seg.Segmentation:
    """Build the BINARY SEG.

    Parameters
    ----------
    source:
        Source series (slice order of ``mask``).
    mask:
        Boolean ``(z, y, x)`` anomaly mask (may be empty: every frame empty).
    algorithm, uids, settings:
        Identity, UID factory and ``[outputs]`` settings.

    Returns
    -------
    highdicom.seg.Segmentation
        Uncompressed (Explicit VR Little Endian; BINARY SEG in highdicom 0.28
        allows only that or JPEG 2000 lossless).
    """
    source.check_shape(mask, "mask")
    pixels = source.to_source_order(np.asarray(mask, dtype=bool))
    return hd.seg.Segmentation(
        source_images=source.datasets,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[anomaly_segment(algorithm, uids)],
        series_instance_uid=uids.series("seg"),
        series_number=settings.seg_series_number,
        sop_instance_uid=uids.instance("seg"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        device_serial_number=settings.device_serial_number,
        content_label="ANOMALY",
        content_description=f"AI anomaly mask - {NOT_FOR_CLINICAL_USE}"[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=settings.seg_omit_empty_frames,
        series_description=settings.seg_series_description,
        institution_name=settings.institution_name or None,
    )
