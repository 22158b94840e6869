"""BINARY DICOM SEG of the findings (highdicom only).

One segment per finding (``seg_segments = "per_finding"``, the default):
segment ``k`` holds the voxels of the ``k``-th finding in label order and is
labelled "Anomaly <label>", with the finding's tracking UID (the SR's
measurement group of the same finding carries the same UID and references
this segment number), so a viewer lists, colours and hides the findings one
by one. ``seg_segments = "merged"`` keeps the earlier layout: one segment
"Anomaly" with every finding. A SEG made when nothing was found
(``seg_when_empty = "empty"``) has one empty segment "Anomaly".

Every segment: category SCT 49755003 "Morphologically abnormal structure",
type SCT 52988006 "Lesion", algorithm type AUTOMATIC with the algorithm's
name, version and family (DCM 123110 "Artificial Intelligence"). The SEG
references the source series (ReferencedSeriesSequence) and, frame by frame,
the source image (and frame) it was derived from
(DerivationImageSequence/SourceImageSequence of each per-frame functional
group).

General Series Laterality is left out. It is Type 2C, required "if the body
part examined is a paired structure" and no Image or Frame Laterality is
present (PS3.3 C.7.3.1). A SEG has no Body Part Examined, and dciodvfy
rejects Laterality in a SEG in every form (R, L or empty: "present when
condition unsatisfied"); PixelMed's validator checks only the second half of
the condition and reports it missing. The two validators contradict each
other here; the node follows dciodvfy, whose verdict gates delivery.

Empty frames are kept by default (``seg_omit_empty_frames = false``): one SEG
frame per source slice and segment is the layout all viewers place
correctly. When frames are omitted, highdicom still records for every
remaining frame its own source image reference and plane position;
``tests/outputs`` checks both layouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from . import NOT_FOR_CLINICAL_USE
from .regions import label_findings
from .settings import OutputSettings
from .source import SourceSeries
from .types import AlgorithmInfo, FindingLike
from .uids import UIDFactory

__all__ = [
    "SEGMENT_LABEL",
    "algorithm_identification",
    "anomaly_segment",
    "build_seg",
    "finding_label",
    "segment_colour",
]

SEGMENT_LABEL = "Anomaly"
#: Display colours (RGB) of segments 1, 2, ...: distinct at a glance, red first.
_PALETTE = (
    (255, 0, 0), (0, 160, 255), (255, 200, 0), (0, 200, 80), (200, 0, 255),
    (255, 110, 0), (0, 220, 220), (255, 0, 150), (140, 200, 0), (120, 90, 255),
)


def finding_label(finding: FindingLike) -> str:
    """Segment label and SR tracking identifier of a finding: "Anomaly <label>"."""
    return f"{SEGMENT_LABEL} {int(finding.label)}"


def segment_colour(number: int) -> hd.color.CIELabColor:
    """Recommended display colour of segment ``number`` (1-based)."""
    return hd.color.CIELabColor.from_rgb(*_PALETTE[(number - 1) % len(_PALETTE)])


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence: name, version, family AI, parameters."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=algorithm.version[:64],
        parameters=algorithm.parameters() or None,
    )


def anomaly_segment(
    algorithm: AlgorithmInfo,
    uids: UIDFactory,
    label: str = SEGMENT_LABEL,
    *,
    number: int = 1,
    tracking_uid: str | None = None,
) -> hd.seg.SegmentDescription:
    """Description of one anomaly segment with coded concepts.

    Parameters
    ----------
    algorithm, uids:
        Identity and UID factory.
    label:
        Segment label and tracking identifier.
    number:
        Segment number (1-based).
    tracking_uid:
        Tracking UID; default: the UID of segment ``number``.
    """
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm),
        tracking_uid=tracking_uid or uids.tracking(f"segment-{number}"),
        tracking_id=label,
        display_color=segment_colour(number),
    )


def build_seg(
    source: SourceSeries,
    mask: np.ndarray,
    *,
    algorithm: AlgorithmInfo,
    uids: UIDFactory,
    settings: OutputSettings,
    findings: Sequence[FindingLike] = (),
    labels: np.ndarray | None = None,
) -> hd.seg.Segmentation:
    """Build the BINARY SEG.

    Parameters
    ----------
    source:
        Source series (slice order of ``mask``).
    mask:
        Boolean ``(z, y, x)`` anomaly mask (may be empty: every frame empty).
    algorithm, uids, settings:
        Identity, UID factory and ``[outputs]`` settings
        (``seg_segments``, ``seg_omit_empty_frames``, series number and
        description).
    findings:
        The findings of ``mask``; with ``seg_segments = "per_finding"`` each
        becomes its own segment. Empty: one segment "Anomaly" with the mask.
    labels:
        The label image of ``findings`` when the caller already has it
        (:func:`~worker.outputs.regions.label_findings`).

    Returns
    -------
    highdicom.seg.Segmentation
        Uncompressed (Explicit VR Little Endian; BINARY SEG in highdicom 0.28
        allows only that or JPEG 2000 lossless).

    Raises
    ------
    SourceError
        ``mask`` is not shaped like the source series.
    ValueError
        The findings do not match the mask's regions
        (:func:`~worker.outputs.regions.label_findings`).
    """
    source.check_shape(mask, "mask")
    mask = np.asarray(mask, dtype=bool)
    if findings and settings.seg_segments == "per_finding":
        if labels is None:
            labels, ordered = label_findings(mask, findings)
        else:
            ordered = sorted(findings, key=lambda f: int(f.label))
        pixels = source.to_source_order(np.asarray(labels))
        segments = [
            anomaly_segment(algorithm, uids, finding_label(f), number=k,
                            tracking_uid=uids.tracking(f"finding-{int(f.label)}"))
            for k, f in enumerate(ordered, start=1)
        ]
    else:
        pixels = source.to_source_order(mask)
        segments = [anomaly_segment(algorithm, uids)]
    seg = hd.seg.Segmentation(
        source_images=source.datasets,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
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
    return seg


def segment_numbers(seg: Dataset) -> list[int]:
    """Segment numbers of a SEG data set, in stored order."""
    return [int(s.SegmentNumber) for s in seg.SegmentSequence]
