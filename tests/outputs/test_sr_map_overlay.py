"""TID 1500 SR, anomaly maps (FRACTIONAL SEG / Parametric Map) and the SC overlay."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from outgen import (ALGORITHM, OUT_OF_DOMAIN, SOURCES, Prediction, decode_by_reference, prediction_for, run_pixelmed_sr,
                    synthetic_series)
from worker.outputs.anomaly_map import PM_SCALE, build_fractional_map, build_parametric_map
from worker.outputs.build import build_outputs, uid_factory, write_outputs
from worker.outputs.settings import OutputSettings
from worker.outputs.source import SourceSeries
from worker.outputs.sr import DOMAIN_WARNING, IN_TRAINING_DOMAIN, PRIVATE_SCHEME
from worker.outputs.validate import run_dciodvfy

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
    sr = hd.sr.srread(kinds["sr"].path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription

    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(pred.findings)
    for group, finding in zip(groups, sorted(pred.findings, key=lambda f: f.label)):
        ref = group.referenced_segment
        assert ref is not None
        assert ref[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg_uid
        assert int(ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber) == 1
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
        assert m["Score (attribute)/Maximum"] == pytest.approx(finding.max_score)
        assert m["Score (attribute)/Mean"] == pytest.approx(finding.mean_score)
        assert str(group.tracking_identifier) == f"Anomaly {finding.label}"
        points = [i for i in group[0].ContentSequence if i.ValueType == "SCOORD3D"]
        assert len(points) == 1 and points[0].ConceptNameCodeSequence[0].CodeValue == codes.DCM.CenterOfMass.value
        np.testing.assert_allclose([float(v) for v in points[0].GraphicData], finding.centroid_patient, atol=1e-4)
        assert points[0].ReferencedFrameOfReferenceUID == source.frame_of_reference_uid

    # study-level group: score + presence; algorithm identity with checksum and threshold
    study = sr.content.get_image_measurement_groups()
    assert len(study) == 1
    assert float(study[0].get_measurements()[0].value) == pytest.approx(pred.study_score)
    assert study[0].get_qualitative_evaluations()[0].value == codes.SCT.Present
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


def test_nothing_found(tmp_path: Path, out_settings: OutputSettings, dciodvfy: str) -> None:
    source = SourceSeries.from_datasets(SOURCES["mr-single"]())
    pred = prediction_for(source, [])
    settings = out_settings.model_copy(update={"overlay": True})
    written = write_outputs(build_outputs(job_id=2, source=source, prediction=pred, algorithm=ALGORITHM,
                                          settings=settings), tmp_path / "2", settings=settings)
    assert [w.kind for w in written] == ["sr", "map"]  # SEG omitted, no overlay
    sr = hd.sr.srread(written[0].path)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    ev = sr.content.get_image_measurement_groups()[0].get_qualitative_evaluations()[0]
    assert ev.name == codes.SCT.MorphologicallyAbnormalStructure and ev.value == codes.SCT.Absent
    assert run_dciodvfy(written[0].path, dciodvfy)[0] == []

    # seg_when_empty = "empty": an empty SEG with every frame; no map when anomaly_map_when_empty = false
    settings = out_settings.model_copy(update={"seg_when_empty": "empty", "anomaly_map_when_empty": False})
    written = write_outputs(build_outputs(job_id=2, source=source, prediction=pred, algorithm=ALGORITHM,
                                          settings=settings), tmp_path / "2", settings=settings)
    assert [w.kind for w in written] == ["seg", "sr"]
    seg = hd.seg.segread(written[0].path)
    assert int(seg.NumberOfFrames) == source.num_slices and not seg.pixel_array.any()
    assert sorted(p.name for p in (tmp_path / "2").iterdir()) == ["seg.dcm", "sr.dcm"]  # stale map.dcm removed


def _domain_container(sr: pydicom.Dataset) -> pydicom.Dataset | None:
    """The document-level Qualitative Evaluations container (TID 1500 row 12), if any."""
    found = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"
             and i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert len(found) <= 1
    return found[0] if found else None


def test_sr_states_training_domain(tmp_path: Path, out_settings: OutputSettings, dciodvfy: str,
                                   pixelmed: str) -> None:
    source = SourceSeries.from_datasets(SOURCES["ct-single"]())
    pred = prediction_for(source, BOXES[:1])
    pred.domain = OUT_OF_DOMAIN
    # write_outputs' gate: re-read by highdicom + dciodvfy (required here)
    written = write_outputs(build_outputs(job_id=5, source=source, prediction=pred, algorithm=ALGORITHM,
                                          settings=out_settings), tmp_path / "5", settings=out_settings)
    path = next(w.path for w in written if w.kind == "sr")
    sr = hd.sr.srread(path)
    container = _domain_container(sr)
    assert container is not None and container.RelationshipType == "CONTAINS"
    assert container.ConceptNameCodeSequence[0].CodingSchemeDesignator == "UMLS"
    code, *texts = container.ContentSequence
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
    assert sr.content.get_image_measurement_groups()[0].get_qualitative_evaluations()[0].value == codes.SCT.Present

    errors, warnings = run_dciodvfy(path, dciodvfy)
    assert errors == []
    # dciodvfy only notes that a private scheme is not one of PS3.16's
    assert all("Unrecognized defined term <99PACSNODE>" in w for w in warnings if PRIVATE_SCHEME in w)
    # PixelMed: nothing it reports concerns the new items (PixelMed 2022 has
    # its own complaints about the ROI groups, with or without this container)
    errors, warnings = run_pixelmed_sr(path, pixelmed)
    assert [x for x in errors + warnings if "C0034375" in x or PRIVATE_SCHEME in x or "Qualitative Evaluations" in x] == []

    # in the domain: Yes, no warning; not checked (older model): no container, no private scheme
    for domain, value in (({"in_domain": True, "warnings": [], "checks": {}}, codes.SCT.Yes), ({}, None)):
        pred.domain = domain
        (sr_built,) = [o.dataset for o in build_outputs(job_id=5, source=source, prediction=pred, algorithm=ALGORITHM,
                                                        settings=out_settings) if o.kind == "sr"]
        container = _domain_container(sr_built)
        if value is None:
            assert container is None and "CodingSchemeIdentificationSequence" not in sr_built
        else:
            assert container is not None and len(container.ContentSequence) == 1
            assert container.ContentSequence[0].ConceptCodeSequence[0].CodeValue == value.value


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
    np.testing.assert_allclose(values, pred.anomaly_map, atol=0.5 / PM_SCALE + 1e-6)


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
