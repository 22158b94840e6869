"""TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom.sr).

Content (see ``docs/outputs.md``):

* observer context: a device (UID derived from the model version, name =
  algorithm name, manufacturer, model name, serial number);
* procedure reported: "CT/MRI unspecified body region" (LOINC) by modality,
  else SCT "Imaging procedure";
* Image Library (TID 1600): the key slice of every finding (or, with no
  finding, the series' middle slice);
* **Imaging Measurements**: one volumetric ROI group (TID 1411) per finding,
  in label order:

  - Tracking Identifier "Anomaly <label>" (with ``sr_ohif_tracking``
    prefixed by Cornerstone3D's tool tag, see below) and the finding's
    tracking UID, the same UID as its SEG segment;
  - algorithm identification (name, version, model sha256 and threshold as
    parameters); Finding SCT "Morphologically abnormal structure";
  - Referenced Segment: the SEG, the finding's own segment number, and the
    source images the finding lies on;
  - Perimeter outline (DCM 121057): SCOORD POLYLINE, the finding's outline
    on its key slice (the slice of its largest cross-section), selected from
    that image (TID 1411's own Image Region row may not stand next to a
    Referenced Segment, so this is an extension item);
  - the centre of mass as SCOORD3D POINT (DCM 128138) in the source frame of
    reference;
  - measurements (TID 1419): Area (mm2) on the key slice, inferred from the
    same outline; Volume (mm3); Score (derivation Maximum) and Score
    (derivation Mean);

* **Qualitative Evaluations** (TID 1500 row 12, report level), the
  study-level result: "Morphologically abnormal structure" = Present / Absent,
  the study anomaly score as TEXT (a NUM is not allowed there), and, when the
  engine checked the series against the model's training domain
  (``prediction.domain``), CODE (TRAINING-DOMAIN, 99PACSNODE, "Series within
  the model's training domain") = SCT Yes / No plus one TEXT (DOMAIN-WARNING,
  99PACSNODE, "Training-domain warning") per warning. 99PACSNODE is the node's
  private coding scheme, identified in the Coding Scheme Identification
  Sequence.

Why this shape: OHIF reads a TID 1500 report with
``@cornerstonejs/adapters``' ``MeasurementReport``, which takes each group's
first NUM, looks for a SCOORD it was inferred from and turns it into a
measurement on that image; OHIF's SR viewport draws the group's first
top-level SCOORD. The adapter picks the tool by the Tracking Identifier:
``"Cornerstone3DTools@^0.1.0:PlanarFreehandROI"`` (plus ``":Anomaly n"``)
makes the outline a PlanarFreehandROI that OHIF can load as an editable
measurement (``sr_ohif_tracking = true``, default); a Comment item
"Anomaly <n>" gives it its label. Without the tag OHIF still shows the report
read-only. A group under Imaging Measurements without any image coordinates
breaks both (the study-level result therefore lives at report level).

Code meanings are the standard's (PS3.16), see :func:`standard_meanings`.
VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY; the Series
Description says "NOT FOR CLINICAL USE".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from .regions import FindingRegion
from .seg import finding_label
from .settings import OutputSettings
from .source import SourceSeries
from .types import AlgorithmInfo
from .uids import UIDFactory

__all__ = [
    "ABNORMALITY",
    "CORNERSTONE_FREEHAND",
    "DOMAIN_WARNING",
    "IN_TRAINING_DOMAIN",
    "PRIVATE_SCHEME",
    "STUDY_SCORE",
    "build_sr",
    "standard_meanings",
]

UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
MM2 = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
MM3 = hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter")
#: Concept name of the presence/absence evaluation (and the finding type).
ABNORMALITY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
#: The node's private coding scheme (for concepts no standard code covers).
PRIVATE_SCHEME = "99PACSNODE"
#: Concept name of the training-domain evaluation (value SCT Yes / No).
IN_TRAINING_DOMAIN = hd.sr.CodedConcept("TRAINING-DOMAIN", PRIVATE_SCHEME, "Series within the model's training domain")
#: Concept name of one training-domain warning (TEXT).
DOMAIN_WARNING = hd.sr.CodedConcept("DOMAIN-WARNING", PRIVATE_SCHEME, "Training-domain warning")
#: Concept name of the study anomaly score (TEXT at report level).
STUDY_SCORE = hd.sr.CodedConcept("STUDY-SCORE", PRIVATE_SCHEME, "Study anomaly score")
#: Cornerstone3D's tracking identifier of a freehand ROI (``@cornerstonejs/adapters``).
CORNERSTONE_FREEHAND = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
#: TID 1500 row 12, the document-level qualitative evaluations.
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_PROCEDURES = {"CT": codes.LN.CTUnspecifiedBodyRegion, "MR": codes.LN.MRIUnspecifiedBodyRegion}
_AREA = hd.sr.CodedConcept("42798000", "SCT", "Area")
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
#: Concept name of the outline on the key slice (TID 1411 allows no Image
#: Region next to a Referenced Segment; this one is an extension item).
_OUTLINE = hd.sr.CodedConcept("121057", "DCM", "Perimeter outline")

#: Code meanings exactly as PS3.16 writes them, where highdicom's or
#: pydicom's differ in case (PixelMed flags every such item).
_MEANINGS: dict[tuple[str, str], str] = {
    ("DCM", "121233"): "Source image for segmentation",
    ("DCM", "121232"): "Source series for segmentation",
    ("DCM", "121058"): "Procedure reported",
    ("DCM", "121112"): "Source of Measurement",
    ("SCT", "49755003"): "Morphologically abnormal structure",
    ("SCT", "246262008"): "Score",
}


def standard_meanings(ds: Dataset) -> Dataset:
    """Replace code meanings in the SR content tree by the standard's spelling (in place).

    Walks every code sequence (concept names, values, units, derivations,
    ...) and sets the Code Meaning of the codes in :data:`_MEANINGS`.
    """
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            key = (str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeValue", "")))
            if key in _MEANINGS and "CodeMeaning" in item:
                item.CodeMeaning = _MEANINGS[key]
            standard_meanings(item)
    return ds



def _algorithm(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    params = [f"{k}={v}" for k, v in algorithm.parameters().items()]
    return hd.sr.AlgorithmIdentification(name=algorithm.name[:64], version=algorithm.version[:64], parameters=params or None)


def _referenced_segment(seg: Dataset, source: SourceSeries, region: FindingRegion, segment: int) -> hd.sr.ReferencedSegment:
    # No Referenced Frame Number: PS3.3 forbids it next to Referenced Segment
    # Number; the finding is located by its source images instead.
    if source.is_multiframe:
        ref = source.slices[region.slices[0]]
        images = [
            hd.sr.SourceImageForSegmentation(
                ref.sop_class_uid,
                ref.sop_instance_uid,
                referenced_frame_numbers=sorted({int(source.slices[z].frame_number or 1) for z in region.slices}),
            )
        ]
    else:
        images = [
            hd.sr.SourceImageForSegmentation(source.slices[z].sop_class_uid, source.slices[z].sop_instance_uid)
            for z in region.slices
        ]
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment,
        source_images=images,
    )


def _key_image(source: SourceSeries, z: int) -> hd.sr.SourceImageForRegion:
    ref = source.slices[z]
    frames = [int(ref.frame_number)] if ref.frame_number is not None else None
    return hd.sr.SourceImageForRegion(ref.sop_class_uid, ref.sop_instance_uid, referenced_frame_numbers=frames)


def _image_library(source: SourceSeries, slices: Sequence[int]) -> hd.sr.ContentSequence:
    """TID 1600 Image Library of the key slices (OHIF reads it to find the images a report needs).

    Single-frame images get highdicom's full entry descriptors; highdicom
    reads those from root attributes an enhanced multi-frame image does not
    have, so a multi-frame source gets plain IMAGE entries with their frame
    numbers (the descriptors are optional, TID 1601).
    """
    if not source.is_multiframe:
        datasets = list({str(source.dataset_of(z).SOPInstanceUID): source.dataset_of(z) for z in slices}.values())
        return hd.sr.ImageLibrary(datasets)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    ref = source.slices[slices[0]]
    image = hd.sr.ImageContentItem(
        name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
        referenced_sop_class_uid=ref.sop_class_uid,
        referenced_sop_instance_uid=ref.sop_instance_uid,
        referenced_frame_numbers=sorted({int(source.slices[z].frame_number or 1) for z in slices}),
        relationship_type=contains,
    )
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = hd.sr.ContentSequence([image])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return hd.sr.ContentSequence([library])


def _pixel_area_mm2(source: SourceSeries, z: int) -> float:
    ds = source.dataset_of(z)
    spacing = ds.get("PixelSpacing")
    if spacing is None and source.is_multiframe:
        ref = source.slices[z]
        frames = ds.get("PerFrameFunctionalGroupsSequence") or []
        for group in (frames[int(ref.frame_number or 1) - 1] if frames else None,
                      (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
            measures = group.get("PixelMeasuresSequence") if group is not None else None
            if measures:
                spacing = measures[0].get("PixelSpacing")
                break
    if not spacing:
        return 1.0
    return float(spacing[0]) * float(spacing[1])


def _finding_group(
    region: FindingRegion,
    *,
    segment: int,
    seg: Dataset,
    source: SourceSeries,
    alg: hd.sr.AlgorithmIdentification,
    uids: UIDFactory,
    settings: OutputSettings,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    finding = region.finding
    label = finding_label(finding)
    tracking = f"{CORNERSTONE_FREEHAND}:{label}" if settings.sr_ohif_tracking else label
    outline = region.outline.astype(np.float32)
    area = float(region.area_pixels) * _pixel_area_mm2(source, region.key_slice)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking(f"finding-{int(finding.label)}"),
                                                     identifier=tracking),
        referenced_segment=_referenced_segment(seg, source, region, segment),
        finding_type=ABNORMALITY,
        algorithm_id=alg,
        measurements=[
            hd.sr.Measurement(name=_AREA, value=area, unit=MM2, algorithm_id=alg),
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
    items = group[0].ContentSequence
    # The Area is inferred from the outline (TID 300 row "INFERRED FROM" TID
    # 320). highdicom refuses coordinates on measurements of a volumetric
    # group, so the item is added here; it is what OHIF's adapter reads.
    first_num = next(i for i, item in enumerate(items) if item.ValueType == "NUM")
    area_item = items[first_num]
    inferred = hd.sr.CoordinatesForMeasurement(hd.sr.GraphicTypeValues.POLYLINE, outline,
                                               _key_image(source, region.key_slice), purpose=_OUTLINE)
    if "ContentSequence" in area_item:
        area_item.ContentSequence.append(inferred)
    else:
        area_item.ContentSequence = hd.sr.ContentSequence([inferred])
    # the spatial items go before the measurements
    spatial: list[hd.sr.ContentItem] = [
        hd.sr.ScoordContentItem(
            name=_OUTLINE, graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    spatial[0].ContentSequence = hd.sr.ContentSequence([_key_image(source, region.key_slice)])
    if source.frame_of_reference_uid:
        spatial.append(
            hd.sr.Scoord3DContentItem(
                name=codes.DCM.CenterOfMass,
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.asarray([finding.centroid_patient], dtype=np.float64),
                frame_of_reference_uid=source.frame_of_reference_uid,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if settings.sr_ohif_tracking:
        spatial.append(hd.sr.TextContentItem(name=_COMMENT, value=label,
                                             relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    for offset, item in enumerate(spatial):
        items.insert(first_num + offset, item)
    return group


def _report_evaluations(
    *, found: bool, study_score: float, domain: Mapping[str, Any] | None
) -> hd.sr.ContainerContentItem:
    """The report-level Qualitative Evaluations container: the study result and the training-domain check."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    score = f"{study_score:.4f} (above 1 suggests an abnormal study)"
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=ABNORMALITY, value=codes.SCT.Present if found else codes.SCT.Absent,
                              relationship_type=contains),
        hd.sr.TextContentItem(name=STUDY_SCORE, value=score, relationship_type=contains),
    ]
    if domain:
        inside = bool(domain.get("in_domain", True))
        items.append(hd.sr.CodeContentItem(name=IN_TRAINING_DOMAIN, value=codes.SCT.Yes if inside else codes.SCT.No,
                                           relationship_type=contains))
        items += [
            hd.sr.TextContentItem(name=DOMAIN_WARNING, value=str(w), relationship_type=contains)
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
    regions: Sequence[FindingRegion],
    study_score: float,
    seg: Dataset | None,
    algorithm: AlgorithmInfo,
    uids: UIDFactory,
    settings: OutputSettings,
    domain: Mapping[str, Any] | None = None,
    segment_of: Mapping[int, int] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report.

    Parameters
    ----------
    source:
        Source series.
    regions:
        The findings with their key slices and outlines
        (:func:`~worker.outputs.regions.finding_regions`), in label order;
        one measurement group each.
    study_score:
        Study-level anomaly score.
    seg:
        The binary SEG the groups reference; required when there are
        findings.
    algorithm, uids, settings:
        Identity, UID factory and ``[outputs]`` settings.
    domain:
        The engine's training-domain check (``in_domain``, ``warnings``);
        empty or None (checkpoints without a training-domain record): the
        report says nothing about it.
    segment_of:
        Finding label → SEG segment number; default: each finding's own
        segment (``FindingRegion.number``). A merged SEG passes 1 for all.

    Raises
    ------
    ValueError
        Findings without a SEG to reference.
    """
    if regions and seg is None:
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
    groups = []
    for region in regions:
        assert seg is not None
        segment = (segment_of or {}).get(region.label, region.number)
        groups.append(_finding_group(region, segment=segment, seg=seg, source=source, alg=alg, uids=uids,
                                     settings=settings))
    key_slices = sorted({r.key_slice for r in regions}) or [source.num_slices // 2]
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    content = hd.sr.ContentSequence()
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE))
    content.extend(hd.sr.ObservationContext(observer_device_context=device))
    content.append(hd.sr.CodeContentItem(
        name=codes.DCM.ProcedureReported, value=_PROCEDURES.get(source.modality, codes.SCT.ImagingProcedure),
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    ))
    content.extend(_image_library(source, key_slices))
    measurements = hd.sr.ContainerContentItem(
        name=codes.DCM.ImagingMeasurements, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    if groups:
        measurements.ContentSequence = hd.sr.ContentSequence([item for g in groups for item in g])
    content.append(measurements)
    content.append(_report_evaluations(found=bool(regions), study_score=study_score, domain=domain))
    root.ContentSequence = content
    evidence: list[Dataset] = list(source.datasets) + ([seg] if seg is not None and regions else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
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
    sr.CodingSchemeIdentificationSequence = [_private_scheme(settings)]
    standard_meanings(sr)
    return sr
