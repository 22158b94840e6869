"""TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom.sr).

Content (see ``docs/outputs.md``):

* observer context: a device (UID derived from the model version, name =
  algorithm name, manufacturer, model name, serial number);
* procedure reported: "CT/MRI unspecified body region" (LOINC) by modality,
  else SCT "Imaging procedure";
* one **volumetric ROI group** (TID 1411) per finding: tracking identifier
  "Anomaly <n>" + a deterministic tracking UID, finding SCT "Morphologically
  abnormal structure", a Referenced Segment (the SEG's SOP Instance UID,
  segment 1, and the source images the finding lies on),
  algorithm identification (name, version, model sha256 and threshold as
  parameters), measurements Volume (mm3), Score (derivation Maximum) and
  Score (derivation Mean), and the centre of mass as an SCOORD3D POINT
  (DCM 128138 "Center of Mass") in the source frame of reference;
* one **study-level group** (TID 1501) "Study": the study anomaly score and
  the qualitative evaluation "Morphologically abnormal structure" = Present /
  Absent. With no finding, this group is the whole result;
* when the engine checked the series against the model's training domain
  (``prediction.domain``), the document-level **Qualitative Evaluations**
  container (TID 1500 row 12): CODE (TRAINING-DOMAIN, 99PACSNODE, "Series
  within the model's training domain") = SCT Yes / No, and one TEXT
  (DOMAIN-WARNING, 99PACSNODE, "Training-domain warning") per warning.
  99PACSNODE is the node's private coding scheme, identified in the Coding
  Scheme Identification Sequence.

VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY; the Series
Description says "NOT FOR CLINICAL USE".

highdicom 0.28's ``ReferencedSegment.from_segmentation`` fails on
single-segment SEGs, so the reference is built explicitly here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from .settings import OutputSettings
from .source import SourceSeries
from .types import AlgorithmInfo, FindingLike
from .uids import UIDFactory

__all__ = ["ABNORMALITY", "DOMAIN_WARNING", "IN_TRAINING_DOMAIN", "PRIVATE_SCHEME", "build_sr", "seg_frames_by_slice"]

UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
MM3 = hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter")
#: Concept name of the presence/absence evaluation.
ABNORMALITY = codes.SCT.MorphologicallyAbnormalStructure
#: The node's private coding scheme (for concepts no standard code covers).
PRIVATE_SCHEME = "99PACSNODE"
#: Concept name of the training-domain evaluation (value SCT Yes / No).
IN_TRAINING_DOMAIN = hd.sr.CodedConcept("TRAINING-DOMAIN", PRIVATE_SCHEME, "Series within the model's training domain")
#: Concept name of one training-domain warning (TEXT).
DOMAIN_WARNING = hd.sr.CodedConcept("DOMAIN-WARNING", PRIVATE_SCHEME, "Training-domain warning")
#: TID 1500 row 12, the document-level qualitative evaluations.
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_PROCEDURES = {"CT": codes.LN.CTUnspecifiedBodyRegion, "MR": codes.LN.MRIUnspecifiedBodyRegion}


def seg_frames_by_slice(seg: Dataset, source: SourceSeries) -> dict[int, list[int]]:
    """Map source slice ``z`` → SEG frame numbers, from the SEG's per-frame source references."""
    by_ref = {(s.sop_instance_uid, s.frame_number): z for z, s in enumerate(source.slices)}
    out: dict[int, list[int]] = {}
    for number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        for der in frame.get("DerivationImageSequence", []):
            for src in der.get("SourceImageSequence", []):
                frame_no = src.get("ReferencedFrameNumber")
                key = (str(src.ReferencedSOPInstanceUID), int(frame_no) if frame_no is not None else None)
                if key in by_ref:
                    out.setdefault(by_ref[key], []).append(number)
    return out


def _algorithm(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    params = [f"{k}={v}" for k, v in algorithm.parameters().items()]
    return hd.sr.AlgorithmIdentification(name=algorithm.name[:64], version=algorithm.version[:64], parameters=params or None)


def _finding_slices(mask: np.ndarray, finding: FindingLike) -> list[int]:
    z0, y0, x0, z1, y1, x1 = (int(v) for v in finding.bbox_zyx)
    box = mask[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1]
    return [z0 + int(i) for i in np.flatnonzero(box.reshape(box.shape[0], -1).any(axis=1))]


def _referenced_segment(seg: Dataset, source: SourceSeries, slices: Sequence[int]) -> hd.sr.ReferencedSegment:
    # No Referenced Frame Number: PS3.3 forbids it next to Referenced Segment
    # Number; the finding is located by its source images instead.
    if source.is_multiframe:
        ref = source.slices[slices[0]]
        images = [
            hd.sr.SourceImageForSegmentation(
                ref.sop_class_uid,
                ref.sop_instance_uid,
                referenced_frame_numbers=sorted({int(source.slices[z].frame_number or 1) for z in slices}),
            )
        ]
    else:
        images = [
            hd.sr.SourceImageForSegmentation(source.slices[z].sop_class_uid, source.slices[z].sop_instance_uid)
            for z in slices
        ]
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=1,
        source_images=images,
    )


def _domain_evaluations(domain: Mapping[str, Any]) -> hd.sr.ContainerContentItem:
    """The Qualitative Evaluations container stating the training-domain check."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    inside = bool(domain.get("in_domain", True))
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=IN_TRAINING_DOMAIN, value=codes.SCT.Yes if inside else codes.SCT.No,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    items += [
        hd.sr.TextContentItem(name=DOMAIN_WARNING, value=str(w), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for w in domain.get("warnings") or [] if str(w).strip()
    ]
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _private_scheme(settings: OutputSettings) -> Dataset:
    """Coding Scheme Identification item of :data:`PRIVATE_SCHEME` (PS3.3 C.12.1.1.3)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "pacs-node local concepts"
    item.CodingSchemeResponsibleOrganization = settings.manufacturer[:64]
    return item


def build_sr(
    source: SourceSeries,
    *,
    mask: np.ndarray,
    findings: Sequence[FindingLike],
    study_score: float,
    seg: Dataset | None,
    algorithm: AlgorithmInfo,
    uids: UIDFactory,
    settings: OutputSettings,
    domain: Mapping[str, Any] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report.

    Parameters
    ----------
    source:
        Source series.
    mask:
        The ``(z, y, x)`` mask (locates each finding's slices).
    findings:
        The engine's findings; one ROI group each, in label order.
    study_score:
        Study-level anomaly score.
    seg:
        The binary SEG the ROI groups reference; required when there are
        findings.
    algorithm, uids, settings:
        Identity, UID factory and ``[outputs]`` settings.
    domain:
        The engine's training-domain check (``in_domain``, ``warnings``);
        empty or None (checkpoints without a training-domain record): the
        report says nothing about it.

    Raises
    ------
    ValueError
        Findings without a SEG to reference.
    """
    source.check_shape(mask, "mask")
    if findings and seg is None:
        raise ValueError("findings need a SEG to reference")
    alg = _algorithm(algorithm)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device(),
            name=algorithm.name[:64],
            manufacturer_name=settings.manufacturer,
            model_name=algorithm.name[:64],
            serial_number=settings.device_serial_number,
        ),
    )
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    mask = np.asarray(mask, dtype=bool)
    for finding in sorted(findings, key=lambda f: int(f.label)):
        assert seg is not None
        slices = _finding_slices(mask, finding)
        if not slices:
            raise ValueError(f"finding {finding.label} has no voxel of the mask inside its bounding box")
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.tracking(f"finding-{int(finding.label)}"), identifier=f"Anomaly {int(finding.label)}"
            ),
            referenced_segment=_referenced_segment(seg, source, slices),
            finding_type=ABNORMALITY,
            algorithm_id=alg,
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Volume, value=float(finding.volume_mm3), unit=MM3, algorithm_id=alg),
                hd.sr.Measurement(
                    name=codes.SCT.Score, value=float(finding.max_score), unit=UNITLESS,
                    derivation=codes.SCT.Maximum, algorithm_id=alg,
                ),
                hd.sr.Measurement(
                    name=codes.SCT.Score, value=float(finding.mean_score), unit=UNITLESS,
                    derivation=codes.SCT.Mean, algorithm_id=alg,
                ),
            ],
        )
        if source.frame_of_reference_uid:
            # TID 1411 is extensible: the centre of mass as a 3D point.
            group[0].ContentSequence.append(
                hd.sr.Scoord3DContentItem(
                    name=codes.DCM.CenterOfMass,
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=np.asarray([finding.centroid_patient], dtype=np.float64),
                    frame_of_reference_uid=source.frame_of_reference_uid,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        groups.append(group)
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking("study"), identifier="Study"),
            algorithm_id=alg,
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Score, value=float(study_score), unit=UNITLESS, algorithm_id=alg)
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=ABNORMALITY, value=codes.SCT.Present if findings else codes.SCT.Absent)
            ],
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_PROCEDURES.get(source.modality, codes.SCT.ImagingProcedure),
        imaging_measurements=groups,
    )
    if domain:
        report[0].ContentSequence.append(_domain_evaluations(domain))
    evidence: list[Dataset] = list(source.datasets) + ([seg] if seg is not None and findings else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids.series("sr"),
        series_number=settings.sr_series_number,
        sop_instance_uid=uids.instance("sr"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=settings.institution_name or None,
        series_description=settings.sr_series_description,
    )
    if domain:
        sr.CodingSchemeIdentificationSequence = [_private_scheme(settings)]
    return sr
