"""TID 1500 SR, anomaly maps (FRACTIONAL SEG / Parametric Map) and the SC overlay."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from outgen import ALGORITHM, OUT_OF_DOMAIN, SOURCES, Prediction, decode_by_reference, prediction_for, synthetic_series
from worker.outputs.anomaly_map import build_fractional_map, build_parametric_map
from worker.outputs.build import build_outputs, uid_factory, write_outputs
from worker.outputs.settings import OutputSettings
from worker.outputs.source import SourceSeries
from worker.outputs.sr import CORNERSTONE_FREEHAND, DOMAIN_WARNING, IN_TRAINING_DOMAIN, PRIVATE_SCHEME, STUDY_SCORE
from worker.outputs.validate import run_dciodvfy, volumetric_roi_groups

BOXES = [(slice(1, 3), slice(2, 7), slice(3, 9)), (slice(6, 8), slice(15, 20), slice(12, 16))]


def _texts(ds: pydicom.Dataset) -> set[str]:
    """Every TEXT/UIDREF value in an SR content tree."""
    out: set[str] = set()
    for item in ds.get("ContentSequence", []):
        for key in ("TextValue", "UID"):
            if key in item:
                out.add(str(item.get(key)))
        out |= _texts(item)
    return out


def _measurements(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> dict[str, float]:
    out = {}
    for m in group.get_measurements():
        key = m.name.meaning if m.derivation is None else f"{m.name.meaning}/{m.derivation.meaning}"
        out[key] = float(m.value)
    return out


def _report_evaluations(sr: pydicom.Dataset) -> pydicom.Dataset:
    """The report-level Qualitative Evaluations container (TID 1500 row 12)."""
    found = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"
             and i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert len(found) == 1 and found[0].RelationshipType == "CONTAINS"
    return found[0]


def _study_result(sr: pydicom.Dataset) -> tuple[str, str]:
    """(presence code value, study score text) of the report-level evaluations."""
    items = _report_evaluations(sr).ContentSequence
    presence = [i for i in items if i.ValueType == "CODE"
                and i.ConceptNameCodeSequence[0].CodeValue == codes.SCT.MorphologicallyAbnormalStructure.value]
    score = [i for i in items if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == STUDY_SCORE.value]
    assert len(presence) == 1 and len(score) == 1
    return str(presence[0].ConceptCodeSequence[0].CodeValue), str(score[0].TextValue)


@pytest.mark.parametrize("name", ["ct-single", "mr-multiframe"])
def test_sr_matches_findings(name: str, tmp_path: Path, out_settings: OutputSettings) -> None:
    source = SourceSeries.from_datasets(SOURCES[name]())
    boxes = BOXES if source.num_slices >= 8 else [(slice(1, 3), slice(2, 7), slice(3, 9)), (slice(5, 6), slice(15, 20), slice(12, 16))]
    pred = prediction_for(source, boxes)
    assert len(pred.findings) == 2
    written = write_outputs(
        build_outputs(job_id=11, source=source, prediction=pred, algorithm=ALGORITHM, settings=out_settings),
        tmp_path / "11", settings=out_settings,
    )
    kinds = {w.kind: w for w in written}
    assert [w.kind for w in written] == ["seg", "sr", "map"]
    seg_uid = kinds["seg"].sop_instance_uid
    seg = hd.seg.segread(kinds["seg"].path)
    sr = hd.sr.srread(kinds["sr"].path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription

    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(pred.findings)
    by_ref = {(s.sop_instance_uid, s.frame_number): z for z, s in enumerate(source.slices)}
    for number, (group, finding) in enumerate(zip(groups, sorted(pred.findings, key=lambda f: f.label)), start=1):
        ref = group.referenced_segment
        assert ref is not None
        assert ref[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg_uid
        # the finding's own segment, labelled after it, with the same tracking UID
        assert int(ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber) == number
        segment = seg.SegmentSequence[number - 1]
        assert segment.SegmentLabel == f"Anomaly {finding.label}" and segment.TrackingID == segment.SegmentLabel
        assert segment.TrackingUID == group.tracking_uid
        # source images of the finding: exactly the slices it lies on
        z0, z1 = finding.bbox_zyx[0], finding.bbox_zyx[3]
        src_refs = [i.ReferencedSOPSequence[0] for i in ref[1:]]
        if source.is_multiframe:
            frames = sorted(int(f) for f in np.atleast_1d(src_refs[0].ReferencedFrameNumber))
            assert frames == sorted(source.slices[z].frame_number for z in range(z0, z1 + 1))
        else:
            assert {r.ReferencedSOPInstanceUID for r in src_refs} == {source.slices[z].sop_instance_uid for z in range(z0, z1 + 1)}
        m = _measurements(group)
        assert m["Volume"] == pytest.approx(finding.volume_mm3)
        assert m["Score/Maximum"] == pytest.approx(finding.max_score)
        assert m["Score/Mean"] == pytest.approx(finding.mean_score)
        assert str(group.tracking_identifier) == f"{CORNERSTONE_FREEHAND}:Anomaly {finding.label}"
        items = list(group[0].ContentSequence)
        # the centre of mass, in the source frame of reference
        points = [i for i in items if i.ValueType == "SCOORD3D"]
        assert len(points) == 1 and points[0].ConceptNameCodeSequence[0].CodeValue == codes.DCM.CenterOfMass.value
        np.testing.assert_allclose([float(v) for v in points[0].GraphicData], finding.centroid_patient, atol=1e-4)
        assert points[0].ReferencedFrameOfReferenceUID == source.frame_of_reference_uid
        # the outline on the key slice: the slice with the finding's largest cross-section
        region = pred.mask.copy()
        region[:z0] = False
        region[z1 + 1:] = False
        area = region.reshape(region.shape[0], -1).sum(axis=1)
        outlines = [i for i in items if i.ValueType == "SCOORD"]
        assert len(outlines) == 1 and outlines[0].GraphicType == "POLYLINE"
        image = outlines[0].ContentSequence[0].ReferencedSOPSequence[0]
        frame = int(image.ReferencedFrameNumber) if "ReferencedFrameNumber" in image else None
        key = by_ref[(image.ReferencedSOPInstanceUID, frame)]
        assert area[key] == area.max()
        xy = np.asarray(outlines[0].GraphicData, float).reshape(-1, 2)
        ys, xs = np.nonzero(region[key])
        assert (xy[0] == xy[-1]).all()  # closed
        np.testing.assert_array_equal(xy.min(axis=0), [xs.min(), ys.min()])  # pixel corners around the region
        np.testing.assert_array_equal(xy.max(axis=0), [xs.max() + 1, ys.max() + 1])
        # the first NUM is the Area on that slice, inferred from the same outline (what OHIF's adapter reads)
        nums = [i for i in items if i.ValueType == "NUM"]
        assert nums[0].ConceptNameCodeSequence[0].CodeMeaning == "Area"
        assert float(nums[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(float(area[key]))  # 1 mm pixels
        inferred = [i for i in nums[0].ContentSequence if i.ValueType == "SCOORD"]
        assert len(inferred) == 1 and inferred[0].RelationshipType == "INFERRED FROM"
        np.testing.assert_array_equal(np.asarray(inferred[0].GraphicData, float).reshape(-1, 2), xy)
        assert [i.TextValue for i in items if i.ValueType == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeValue == "121106"] == [f"Anomaly {finding.label}"]

    # no measurement group without image coordinates: the study-level result is at report level
    assert sr.content.get_image_measurement_groups() == []
    presence, score = _study_result(sr)
    assert presence == codes.SCT.Present.value and score.startswith(f"{pred.study_score:.4f}")
    texts = _texts(sr)
    assert f"model_sha256={ALGORITHM.checksum}" in texts and "threshold=0.4321" in texts
    assert ALGORITHM.version in texts and ALGORITHM.name in texts
    # observer device context
    obs = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert obs and obs[0].observer_identifying_attributes.name == ALGORITHM.name
    # evidence lists the SEG and the source images
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for ser in s.ReferencedSeriesSequence for i in ser.ReferencedSOPSequence}
    assert seg_uid in evidence and source.slices[0].sop_instance_uid in evidence


def test_sr_plain_tracking_and_merged_segment(out_settings: OutputSettings) -> None:
    """``sr_ohif_tracking = false``: plain "Anomaly n" tracking identifiers and
    no Comment; ``seg_segments = "merged"``: one segment that every group references."""
    source = SourceSeries.from_datasets(SOURCES["ct-single"]())
    pred = prediction_for(source, BOXES)
    settings = out_settings.model_copy(update={"sr_ohif_tracking": False, "seg_segments": "merged"})
    built = build_outputs(job_id=3, source=source, prediction=pred, algorithm=ALGORITHM, settings=settings)
    seg, sr = built[0].dataset, built[1].dataset
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Anomaly"]
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == ["Anomaly 1", "Anomaly 2"]
    assert [int(g.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber) for g in groups] == [1, 1]
    assert not [i for g in groups for i in g[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121106"]


def test_nothing_found(tmp_path: Path, out_settings: OutputSettings, dciodvfy: str) -> None:
    source = SourceSeries.from_datasets(SOURCES["mr-single"]())
    pred = prediction_for(source, [])
    settings = out_settings.model_copy(update={"overlay": True})
    written = write_outputs(build_outputs(job_id=2, source=source, prediction=pred, algorithm=ALGORITHM,
                                          settings=settings), tmp_path / "2", settings=settings)
    assert [w.kind for w in written] == ["sr", "map"]  # SEG omitted, no overlay
    sr = pydicom.dcmread(written[0].path)
    assert volumetric_roi_groups(sr) == 0
    # Imaging Measurements is there (OHIF looks it up) but empty; the result is at report level
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    assert "ContentSequence" not in measurements
    presence, score = _study_result(sr)
    assert presence == codes.SCT.Absent.value and score.startswith(f"{pred.study_score:.4f}")
    assert run_dciodvfy(written[0].path, dciodvfy)[0] == []

    # seg_when_empty = "empty": an empty SEG with every frame; no map when anomaly_map_when_empty = false
    settings = out_settings.model_copy(update={"seg_when_empty": "empty", "anomaly_map_when_empty": False})
    written = write_outputs(build_outputs(job_id=2, source=source, prediction=pred, algorithm=ALGORITHM,
                                          settings=settings), tmp_path / "2", settings=settings)
    assert [w.kind for w in written] == ["seg", "sr"]
    seg = hd.seg.segread(written[0].path)
    assert int(seg.NumberOfFrames) == source.num_slices and not seg.pixel_array.any()
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Anomaly"]
    assert sorted(p.name for p in (tmp_path / "2").iterdir()) == ["seg.dcm", "sr.dcm"]  # stale map.dcm removed


def test_sr_states_training_domain(tmp_path: Path, out_settings: OutputSettings, dciodvfy: str) -> None:
    source = SourceSeries.from_datasets(SOURCES["ct-single"]())
    pred = prediction_for(source, BOXES[:1])
    pred.domain = OUT_OF_DOMAIN
    # write_outputs' gate: re-read by highdicom + dciodvfy (required here)
    written = write_outputs(build_outputs(job_id=5, source=source, prediction=pred, algorithm=ALGORITHM,
                                          settings=out_settings), tmp_path / "5", settings=out_settings)
    path = next(w.path for w in written if w.kind == "sr")
    sr = hd.sr.srread(path)
    container = _report_evaluations(sr)
    assert container.ConceptNameCodeSequence[0].CodingSchemeDesignator == "UMLS"
    domain = [i for i in container.ContentSequence if i.ConceptNameCodeSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
              and i.ConceptNameCodeSequence[0].CodeValue != STUDY_SCORE.value]
    code, *texts = domain
    assert code.ValueType == "CODE" and code.RelationshipType == "CONTAINS"
    name = code.ConceptNameCodeSequence[0]
    assert (name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning) == (
        IN_TRAINING_DOMAIN.value, PRIVATE_SCHEME, "Series within the model's training domain")
    assert code.ConceptCodeSequence[0].CodeValue == codes.SCT.No.value
    assert [t.ValueType for t in texts] == ["TEXT", "TEXT"]
    assert {t.ConceptNameCodeSequence[0].CodeValue for t in texts} == {DOMAIN_WARNING.value}
    assert [t.TextValue for t in texts] == OUT_OF_DOMAIN["warnings"]
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == PRIVATE_SCHEME and scheme.CodingSchemeName
    # the rest of the report is unchanged
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 1
    assert _study_result(sr)[0] == codes.SCT.Present.value

    errors, warnings = run_dciodvfy(path, dciodvfy)
    assert errors == []
    # dciodvfy only notes that a private scheme is not one of PS3.16's
    assert all("Unrecognized defined term <99PACSNODE>" in w for w in warnings if PRIVATE_SCHEME in w)

    # in the domain: Yes, no warning; not checked (older model): no training-domain item
    for value in (codes.SCT.Yes, None):
        pred.domain = {"in_domain": True, "warnings": [], "checks": {}} if value is not None else {}
        (sr_built,) = [o.dataset for o in build_outputs(job_id=5, source=source, prediction=pred, algorithm=ALGORITHM,
                                                        settings=out_settings) if o.kind == "sr"]
        items = [i for i in _report_evaluations(sr_built).ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue in (IN_TRAINING_DOMAIN.value, DOMAIN_WARNING.value)]
        if value is None:
            assert items == []
        else:
            assert len(items) == 1 and items[0].ConceptCodeSequence[0].CodeValue == value.value


def test_inconsistent_prediction_rejected(out_settings: OutputSettings) -> None:
    source = SourceSeries.from_datasets(SOURCES["ct-single"]())
    pred = prediction_for(source, BOXES)
    bad = Prediction(mask=np.zeros_like(pred.mask), anomaly_map=pred.anomaly_map, findings=pred.findings)
    with pytest.raises(ValueError, match="inconsistent"):
        build_outputs(job_id=1, source=source, prediction=bad, algorithm=ALGORITHM, settings=out_settings)


@pytest.mark.parametrize("name", ["ct-single", "mr-multiframe", "ct-small"])
def test_fractional_map(name: str, tmp_path: Path, out_settings: OutputSettings, dciodvfy: str) -> None:
    source = SourceSeries.from_datasets(SOURCES[name]())
    pred = prediction_for(source, [(slice(0, 1), slice(2, 6), slice(2, 6))])
    ds = build_fractional_map(source, pred.anomaly_map, algorithm=ALGORITHM,
                              uids=uid_factory(1, source, ALGORITHM, out_settings), settings=out_settings)
    path = tmp_path / "map.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert run_dciodvfy(path, dciodvfy)[0] == []
    back = hd.seg.segread(path)
    assert back.SegmentationType == "FRACTIONAL" and back.SegmentationFractionalType == "PROBABILITY"
    assert int(back.NumberOfFrames) == source.num_slices
    decoded = decode_by_reference(back, source) / 255.0
    np.testing.assert_allclose(decoded, pred.anomaly_map, atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("name", ["mr-single", "mr-multiframe", "mr-small"])
def test_parametric_map(name: str, tmp_path: Path, out_settings: OutputSettings, dciodvfy: str) -> None:
    source = SourceSeries.from_datasets(SOURCES[name]())
    pred = prediction_for(source, [(slice(0, 1), slice(2, 6), slice(2, 6))])
    ds = build_parametric_map(source, pred.anomaly_map, algorithm=ALGORITHM,
                              uids=uid_factory(1, source, ALGORITHM, out_settings), settings=out_settings)
    path = tmp_path / "pm.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, warnings = run_dciodvfy(path, dciodvfy)
    assert errors == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    rwvm = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    stored = decode_by_reference(back, source)  # frames are in highdicom's order: use their references
    values = stored * float(rwvm.RealWorldValueSlope) + float(rwvm.RealWorldValueIntercept)
    np.testing.assert_allclose(values, pred.anomaly_map, atol=1e-7)  # float32: the engine's values
    assert back.BitsAllocated == 32 and "FloatPixelData" in back and "Laterality" not in back
    anatomy = back.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
    assert anatomy.FrameLaterality == "U" and anatomy.AnatomicRegionSequence[0].CodingSchemeDesignator == "SCT"


def test_overlay(tmp_path: Path, out_settings: OutputSettings, dciodvfy: str) -> None:
    datasets = synthetic_series(modality="CT", n=8)
    source = SourceSeries.from_datasets(datasets)
    pred = prediction_for(source, BOXES)
    settings = out_settings.model_copy(update={"overlay": True, "overlay_max_images": 3})
    written = write_outputs(build_outputs(job_id=4, source=source, prediction=pred, algorithm=ALGORITHM,
                                          settings=settings), tmp_path / "4", settings=settings)
    overlays = [w for w in written if w.kind == "overlay"]
    assert len(overlays) == 3 and [w.kind for w in written][:3] == ["seg", "sr", "map"]
    area = pred.mask.reshape(8, -1).sum(axis=1)
    chosen = []
    for w in overlays:
        ds = pydicom.dcmread(w.path)
        assert run_dciodvfy(w.path, dciodvfy)[0] == []
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.PhotometricInterpretation == "RGB"
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        z = [s.sop_instance_uid for s in source.slices].index(ref)
        chosen.append(z)
        rgb = ds.pixel_array
        red = np.all(rgb == [255, 0, 0], axis=-1)
        assert red.any() and not (red & ~pred.mask[z]).any()  # outline only on the mask
        assert "NOT FOR CLINICAL USE" in ds.ImageComments
        assert ds.PatientID == datasets[0].PatientID and ds.StudyInstanceUID == source.study_instance_uid
    assert chosen == sorted(chosen) and all(area[z] > 0 for z in chosen)
    assert len({w.series_instance_uid for w in overlays}) == 1
