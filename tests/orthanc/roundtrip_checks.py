"""What a correct round trip leaves in the archive: the node's SEG and SR in
the source study, referencing the analysed series, and a SEG whose mask
(decoded from the archive's copy) equals the node's own output."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
from pydicom import Dataset, dcmread

from peers import OrthancServer
from served_node import ServedNode

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass(frozen=True)
class ArchivedResults:
    seg_sop: str
    sr_sop: str
    seg_series: str
    sr_series: str
    #: SOP Instance UIDs of everything the archive holds in the study.
    study_sops: frozenset[str]


def study_sops(orthanc: OrthancServer, study_uid: str) -> frozenset[str]:
    """SOP Instance UIDs of the study's instances in Orthanc."""
    oid = orthanc.find_study(study_uid)
    if oid is None:
        return frozenset()
    return frozenset(i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get(f"/studies/{oid}/instances"))


def _sources(files: list[Path]) -> tuple[str, set[str]]:
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    (series_uid,) = {str(h.SeriesInstanceUID) for h in headers}
    return series_uid, {str(h.SOPInstanceUID) for h in headers}


def _mask(seg: hd.seg.Segmentation, source_sops: list[str]) -> np.ndarray:
    return np.asarray(seg.get_pixels_by_source_instance(source_sop_instance_uids=source_sops, segment_numbers=[1],
                                                        assert_missing_frames_are_empty=True))


def _referenced_sops(ds: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in a data set."""
    found: set[str] = set()
    for elem in ds:
        if elem.keyword == "ReferencedSOPInstanceUID":
            found.add(str(elem.value))
        elif elem.VR == "SQ":
            for item in elem.value:
                found |= _referenced_sops(item)
    return found


def check_results_in_archive(orthanc: OrthancServer, node: ServedNode, job_id: int, study_uid: str,
                             source_files: list[Path]) -> ArchivedResults:
    source_series, source_sops = _sources(source_files)
    job = node.job(job_id)
    outputs = {o.kind: o for o in job.outputs}
    assert {"seg", "sr"} <= set(outputs), outputs
    seg_row, sr_row = outputs["seg"], outputs["sr"]

    # QIDO-RS: the SEG and SR series are in the source study.
    r = httpx.get(f"{orthanc.dicomweb_url}/studies/{study_uid}/series", headers={"Accept": "application/dicom+json"},
                  timeout=10)
    assert r.status_code == 200, r.text
    series = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in r.json()}
    assert series.get(source_series) is not None and series.get(seg_row.series_instance_uid) == "SEG" \
        and series.get(sr_row.series_instance_uid) == "SR", series

    seg_id = orthanc.find_instance(seg_row.sop_instance_uid)
    sr_id = orthanc.find_instance(sr_row.sop_instance_uid)
    assert seg_id and sr_id

    # SEG: references the analysed series and only its images; same mask as the node's file.
    archived = dcmread(BytesIO(orthanc.file(seg_id)))
    assert archived.SOPClassUID == SEG and archived.StudyInstanceUID == study_uid
    assert [s.SeriesInstanceUID for s in archived.ReferencedSeriesSequence] == [source_series]
    frame_sources = {src.ReferencedSOPInstanceUID
                     for fg in archived.PerFrameFunctionalGroupsSequence
                     for der in fg.DerivationImageSequence for src in der.SourceImageSequence}
    assert frame_sources and frame_sources <= source_sops, frame_sources - source_sops
    seg_archive = hd.seg.segread(BytesIO(orthanc.file(seg_id)))
    seg_node = hd.seg.segread(node.outputs_dir / seg_row.path)
    assert seg_archive.SOPInstanceUID == seg_node.SOPInstanceUID == seg_row.sop_instance_uid
    order = sorted(source_sops)
    mask_archive, mask_node = _mask(seg_archive, order), _mask(seg_node, order)
    assert mask_archive.shape == mask_node.shape == (len(order), archived.Rows, archived.Columns, 1)
    assert np.array_equal(mask_archive, mask_node)

    # SR: in the study, its evidence names the analysed images; each finding
    # references the SEG's segment.
    sr = dcmread(BytesIO(orthanc.file(sr_id)))
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.StudyInstanceUID == study_uid
    evidence = {(ser.SeriesInstanceUID, sop.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for ser in study.ReferencedSeriesSequence for sop in ser.ReferencedSOPSequence}
    assert {sop for ser, sop in evidence if ser == source_series} <= source_sops
    assert any(ser == source_series for ser, _ in evidence), evidence
    referenced = _referenced_sops(sr)
    if job.findings_count:
        assert seg_row.sop_instance_uid in referenced
    else:
        assert not mask_node.any()

    return ArchivedResults(seg_row.sop_instance_uid, sr_row.sop_instance_uid, seg_row.series_instance_uid,
                           sr_row.series_instance_uid, study_sops(orthanc, study_uid))
