"""build_outputs / write_outputs / save_output_rows: determinism, the
validation gate, the engine's own types, settings."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from scipy import ndimage
from sqlalchemy import select

from nodetest import make_settings
from outgen import ALGORITHM, SOURCES, prediction_for, synthetic_series, write_series
from pacs_node.db.models import Job, Output, Study
from pacs_node.db.session import Database
from worker.outputs.build import build_job_outputs, build_outputs, save_output_rows, uid_factory, write_outputs
from worker.outputs.settings import OutputSettings
from worker.outputs.source import SourceSeries
from worker.outputs.types import AlgorithmInfo, BuiltOutput
from worker.outputs.uids import derive_uid
from worker.outputs.validate import OutputValidationError, validate_file, volumetric_roi_groups

BOXES = [(slice(1, 3), slice(2, 7), slice(3, 9))]


def _sr(outputs: list) -> Any:
    """The SR among built or written outputs."""
    return next(o for o in outputs if o.kind == "sr")


def _uids(outputs: list[BuiltOutput]) -> list[tuple[str, str, str]]:
    return [(o.kind, o.sop_instance_uid, o.series_instance_uid) for o in outputs]


def _uidrefs(ds: pydicom.Dataset) -> set[str]:
    out: set[str] = set()
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "UIDREF":
            out.add(str(item.UID))
        out |= _uidrefs(item)
    return out


def test_deterministic_uids(out_settings: OutputSettings) -> None:
    settings = out_settings.model_copy(update={"overlay": True})
    source = SourceSeries.from_datasets(SOURCES["ct-single"]())
    pred = prediction_for(source, BOXES)
    first = build_outputs(job_id=42, source=source, prediction=pred, algorithm=ALGORITHM, settings=settings)
    again = build_outputs(job_id=42, source=source, prediction=pred, algorithm=ALGORITHM, settings=settings)
    assert _uids(first) == _uids(again)
    assert [o.kind for o in first] == ["seg", "sr", "map", "overlay", "overlay"]
    all_uids = [u for t in _uids(first) for u in t[1:]]
    assert len(set(all_uids)) == len(first) + 4  # distinct instances; overlays share one series
    other_job = build_outputs(job_id=43, source=source, prediction=pred, algorithm=ALGORITHM, settings=settings)
    other_model = build_outputs(job_id=42, source=source, prediction=pred,
                                algorithm=AlgorithmInfo(ALGORITHM.name, ALGORITHM.version + "x"), settings=settings)
    for other in (other_job, other_model):
        assert not set(all_uids) & {u for t in _uids(other) for u in t[1:]}
    # SR tracking UIDs, SEG segment tracking UID are deterministic too
    tracking = _uidrefs(_sr(first).dataset)
    assert len(tracking) >= 3 and tracking == _uidrefs(_sr(again).dataset)
    device = uid_factory(42, source, ALGORITHM, settings).device()  # the observer device: same model, same UID
    # shared with another job's report: the device and the source's frame of reference (image library)
    assert tracking & _uidrefs(_sr(other_job).dataset) == {device, source.frame_of_reference_uid}
    # a switch between map encodings never reuses a UID for another SOP class
    pm = build_outputs(job_id=42, source=source, prediction=pred, algorithm=ALGORITHM,
                       settings=settings.model_copy(update={"anomaly_map": "fractional"}))
    def _map(outputs: list[BuiltOutput]) -> BuiltOutput:
        return next(o for o in outputs if o.kind == "map")

    assert _map(pm).sop_class_uid != _map(first).sop_class_uid
    assert _map(pm).sop_instance_uid != _map(first).sop_instance_uid


def test_uid_roots() -> None:
    uid = derive_uid("2.25.", "a", 1)
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid == derive_uid("2.25.", "a", 1)
    assert derive_uid("2.25.", "a1") != derive_uid("2.25.", "a", 1)  # parts are not just concatenated
    org = derive_uid("1.2.826.0.1.3680043.8.498.", "a", 1)
    assert org.startswith("1.2.826.0.1.3680043.8.498.") and len(org) <= 64
    assert pydicom.uid.UID(org).is_valid and pydicom.uid.UID(uid).is_valid


def test_validation_gate_rejects_errors(tmp_path: Path, out_settings: OutputSettings) -> None:
    source = SourceSeries.from_datasets(SOURCES["ct-single"]())
    built = build_outputs(job_id=1, source=source, prediction=prediction_for(source, BOXES),
                          algorithm=ALGORITHM, settings=out_settings)
    seg = built[0]
    del seg.dataset.ContentLabel  # Type 1 in the SEG IOD
    with pytest.raises(OutputValidationError) as err:
        write_outputs(built, tmp_path / "1", settings=out_settings)
    assert err.value.kind == "seg" and any("Content Label" in r or "ContentLabel" in r for r in err.value.reasons)
    assert "failed validation" in str(err.value)

    # a re-read that disagrees with the build (wrong number of ROI groups)
    sr = _sr(built)
    sr.dataset.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    sr.expected["findings"] = 5
    with pytest.raises(OutputValidationError, match="ROI groups"):
        validate_file(tmp_path / "sr.dcm", sr, use_dciodvfy=False)

    # dciodvfy required but missing
    with pytest.raises(OutputValidationError, match="not installed"):
        validate_file(tmp_path / "sr.dcm", BuiltOutput("sr", sr.dataset, "sr.dcm"),
                      dciodvfy_path="/nonexistent/dciodvfy", require_dciodvfy=True)


def test_warnings_recorded(tmp_path: Path, out_settings: OutputSettings, dciodvfy: str) -> None:
    source = SourceSeries.from_datasets(SOURCES["mr-single"]())
    settings = out_settings.model_copy(update={"anomaly_map": "parametric"})
    written = write_outputs(build_outputs(job_id=1, source=source, prediction=prediction_for(source, BOXES),
                                          algorithm=ALGORITHM, settings=settings), tmp_path / "1", settings=settings)
    for w in written:
        v = json.loads(w.validation)
        assert v["reread"] == "ok" and v["dciodvfy"] == dciodvfy and v["errors"] == []
    pm = next(w for w in written if w.kind == "map")
    assert any("QUANTITY" in line for line in json.loads(pm.validation)["warnings"])


class _Predictor:
    model_name = "tiny"
    model_version = "pacs-node-engine/0.1.0+abcdef012345"
    checksum = "abcdef012345" * 5 + "abcd"


def test_with_engine_types_and_db_rows(tmp_path: Path) -> None:
    """The engine's own Prediction/Finding types and reader, then outputs rows."""
    from worker.engine.dicom_io import load_series_refs
    from worker.engine.postprocess import extract_findings
    from worker.engine.predictor import Prediction

    paths = write_series(synthetic_series(modality="MR", n=8, shuffle=True, seed=9), tmp_path / "src")
    volume, refs = load_series_refs(paths)
    mask = np.zeros(volume.shape, bool)
    mask[2:5, 4:9, 3:8] = True
    amap = np.where(mask, 0.8, 0.1).astype(np.float32)
    labels, _ = ndimage.label(mask)
    findings = extract_findings(labels, amap, volume)
    prediction = Prediction(mask=mask, anomaly_map=amap, findings=findings, study_score=1.7, threshold=0.25)

    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    settings = make_settings(tmp_path, db_url)
    settings.outputs = {"overlay": True, "uid_root": "1.2.826.0.1.3680043.8.498."}
    outputs_root = tmp_path / "outputs"
    written = build_job_outputs(job_id=9, source_paths=paths, prediction=prediction, predictor=_Predictor(),
                                settings=settings, out_dir=outputs_root / "9", order=refs)
    assert [w.kind for w in written][:2] == ["seg", "sr"]
    assert all(w.relpath.startswith("9/") and (outputs_root / w.relpath).is_file() for w in written)
    assert all(w.sop_instance_uid.startswith("1.2.826.0.1.3680043.8.498.") for w in written)
    sr = pydicom.dcmread(_sr(written).path)
    assert "threshold=0.25" in str(sr.ContentSequence)

    db = Database(db_url)
    from pacs_node.db.migrate import upgrade

    upgrade(db)
    with db.session() as s:
        study = Study(study_instance_uid="1.2.3", version=1)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, study_version=1, state="running")
        s.add(job)
        s.flush()
        job_id = job.id
        save_output_rows(s, job_id, written, outputs_root)
    with db.session() as s:  # a rebuild replaces the rows (same UIDs, no unique violation)
        save_output_rows(s, job_id, written, outputs_root)
    with db.session() as s:
        rows = s.execute(select(Output).where(Output.job_id == job_id).order_by(Output.id)).scalars().all()
        assert [r.kind for r in rows] == [w.kind for w in written]
        assert [r.path for r in rows] == [w.relpath for w in written]
        assert all(json.loads(r.validation or "{}")["errors"] == [] for r in rows)
        assert rows[0].sha256 == written[0].sha256 and rows[0].size_bytes == written[0].path.stat().st_size
    db.dispose()


def _without_times(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy without what differs between two builds: creation dates and times,
    and highdicom's random Dimension Organization UID."""
    ds = ds.copy()

    def strip(d: pydicom.Dataset) -> None:
        for elem in list(d):
            if elem.VR in ("DA", "TM", "DT") or elem.keyword == "DimensionOrganizationUID":
                del d[elem.tag]
            elif elem.VR == "SQ":
                for item in elem.value:
                    strip(item)

    strip(ds)
    return ds


def test_build_from_the_loaders_headers_equals_build_from_the_files(tmp_path: Path) -> None:
    """The worker passes the headers ``load_series_headers`` read (no Pixel Data)
    instead of reading every file again; the outputs are the same, overlays
    (which need the source pixels) included."""
    from worker.engine.dicom_io import load_series_headers
    from worker.engine.postprocess import extract_findings
    from worker.engine.predictor import Prediction

    paths = write_series(synthetic_series(modality="MR", n=8, shuffle=True, seed=11), tmp_path / "src")
    volume, refs, headers = load_series_headers(paths)
    assert len(headers) == len(paths) and all("PixelData" not in ds for ds in headers)
    mask = np.zeros(volume.shape, bool)
    mask[2:5, 4:9, 3:8] = True
    amap = np.where(mask, 0.8, 0.1).astype(np.float32)
    labels, _ = ndimage.label(mask)
    prediction = Prediction(mask=mask, anomaly_map=amap, findings=extract_findings(labels, amap, volume),
                            study_score=1.7, threshold=0.25)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    settings.outputs = {"overlay": True}
    common = dict(job_id=5, source_paths=paths, prediction=prediction, predictor=_Predictor(), settings=settings,
                  order=refs)
    from_files = build_job_outputs(out_dir=tmp_path / "a", **common)  # type: ignore[arg-type]
    from_headers = build_job_outputs(out_dir=tmp_path / "b", source_headers=headers, **common)  # type: ignore[arg-type]
    assert [w.kind for w in from_headers] == [w.kind for w in from_files] and "overlay" in [w.kind for w in from_files]
    for a, b in zip(from_files, from_headers):
        assert _without_times(pydicom.dcmread(a.path)) == _without_times(pydicom.dcmread(b.path)), a.kind
    with pytest.raises(ValueError):
        build_job_outputs(out_dir=tmp_path / "c", source_headers=headers[:-1], **common)  # type: ignore[arg-type]


def test_output_settings_validation() -> None:
    s = OutputSettings.model_validate({})
    assert s.uid_root == "2.25." and s.anomaly_map == "parametric" and s.seg_omit_empty_frames is False
    assert s.seg_segments == "per_finding" and s.sr_ohif_tracking is True and s.source_header_fixes == "fix"
    for bad in ({"uid_root": "1.2.3"}, {"uid_root": "1.02.3."}, {"anomaly_map": "heat"}, {"unknown": 1},
                {"seg_segments": "each"}, {"source_header_fixes": "drop"},
                {"seg_series_description": "x" * 65}, {"overlay_color": [300, 0, 0]}):
        with pytest.raises(ValidationError):
            OutputSettings.model_validate(bad)


def test_engine_predictor_identity() -> None:
    info = AlgorithmInfo.from_predictor(SimpleNamespace(model_name="m", model_version="v", checksum="c"), 0.5)
    assert info == AlgorithmInfo("m", "v", "c", 0.5)
    assert info.parameters() == {"model_sha256": "c", "threshold": "0.5"}


@pytest.mark.parametrize("boxes", [[], BOXES, BOXES + [(slice(5, 7), slice(10, 14), slice(10, 14))]])
def test_roi_group_count_matches_highdicom(tmp_path: Path, out_settings: OutputSettings,
                                           boxes: list[tuple[slice, slice, slice]]) -> None:
    import highdicom as hd

    source = SourceSeries.from_datasets(SOURCES["mr-single"]())
    built = build_outputs(job_id=1, source=source, prediction=prediction_for(source, boxes),
                          algorithm=ALGORITHM, settings=out_settings)
    sr = _sr(built)
    sr.dataset.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    report = hd.sr.srread(tmp_path / "sr.dcm")
    if boxes:
        expected = len(report.content.get_volumetric_roi_measurement_groups())  # type: ignore[attr-defined]
    else:  # an empty Imaging Measurements container: highdicom's finder needs a Content Sequence
        expected = 0
    assert expected == len(boxes)
    assert volumetric_roi_groups(report) == expected
    assert volumetric_roi_groups(pydicom.dcmread(tmp_path / "sr.dcm")) == expected


def test_a_jpeg_lossless_source_goes_through_the_worker(tmp_path: Path, dciodvfy: str) -> None:
    """JPEG Lossless SV1 (1.2.840.10008.1.2.4.70) source files: the worker's
    loader decodes them, the outputs reference them, and the overlay (which
    draws the source pixels again) decodes them too."""
    import subprocess

    from nodetest import require_tool
    from worker.engine.dicom_io import load_series_headers
    from worker.engine.postprocess import extract_findings
    from worker.engine.predictor import Prediction

    plain = write_series(synthetic_series(modality="CT", n=6, seed=3), tmp_path / "plain")
    encoded = []
    for p in plain:
        out = tmp_path / f"jpeg-{p.name}"
        subprocess.run([require_tool("dcmcjpeg"), "+e1", str(p), str(out)], check=True, capture_output=True, timeout=60)
        assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
        encoded.append(out)
    volume, refs, headers = load_series_headers(encoded)
    mask = np.zeros(volume.shape, bool)
    mask[2:4, 5:10, 4:9] = True
    amap = np.where(mask, 0.8, 0.1).astype(np.float32)
    labels, _ = ndimage.label(mask)
    prediction = Prediction(mask=mask, anomaly_map=amap, findings=extract_findings(labels, amap, volume),
                            study_score=1.4, threshold=0.3)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    settings.outputs = {"overlay": True, "require_dciodvfy": True}
    written = build_job_outputs(job_id=6, source_paths=encoded, prediction=prediction, predictor=_Predictor(),
                                settings=settings, out_dir=tmp_path / "out" / "6", order=refs, source_headers=headers)
    assert [w.kind for w in written][:3] == ["seg", "sr", "map"]
    overlays = [pydicom.dcmread(w.path) for w in written if w.kind == "overlay"]
    assert len(overlays) == 2 and all(o.pixel_array.shape[-1] == 3 for o in overlays)
    plain_pixels = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p).pixel_array for p in plain}
    for o in overlays:  # the grey picture is the source's (lossless: the same pixels as uncompressed)
        src = plain_pixels[str(o.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        grey = o.pixel_array[..., 1].astype(int)
        assert np.corrcoef(grey[src > 0].ravel(), src[src > 0].ravel())[0, 1] > 0.9
