"""A series with real-world header defects goes through ``pacs-node serve`` to
delivery with the validation gate on (dciodvfy required) and no setting
changed for it: dcmtk's storescu as the PACS, dcmtk's storescp as the archive.

The process helpers are the end-to-end tests' own (``tests/test_e2e_jobs.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_factory import series_from_volume, write_files
from nodetest import require_tool
from outgen import HEADER_DEFECTS, with_header_defects
from test_e2e_jobs import COMPREHENSIVE_3D_SR, SEG, Proc, _cli, _config, _received, _send, _wait_jobs, _wait_port
from test_e2e_jobs import storescp as storescp  # noqa: F401 - the archive fixture

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"

pytestmark = pytest.mark.timeout(240)


def test_defective_headers_are_delivered_with_the_gate_on(tmp_path: Path, tiny_model: Path,
                                                           storescp: tuple[int, Path]) -> None:  # noqa: F811
    from worker.engine.synthetic import make_case

    require_tool("dciodvfy")
    dest_port, received = storescp
    cfg, dicom_port, _ = _config(tmp_path, db_url=f"sqlite:///{tmp_path / 'node.db'}", broker="embedded",
                                 model=tiny_model, dest_port=dest_port, start_worker=True)
    # the shipped output defaults (Parametric Map, one segment per finding), with
    # a missing dciodvfy an error rather than a skipped check
    text = cfg.read_text().replace('anomaly_map = "none"\n', 'require_dciodvfy = true\n')
    cfg.write_text(text)
    case = make_case(9100, anomalous=True, shape=(12, 32, 32), spacing=(8.0, 6.0, 6.0))
    datasets = with_header_defects(series_from_volume(case.volume.array, spacing=(8.0, 6.0, 6.0)))
    files = write_files(datasets, tmp_path / "study")
    node = Proc(["--config", str(cfg), "serve"], tmp_path / "node.log")
    try:
        _wait_port(dicom_port, node)
        _send(files, dicom_port)
        (job,) = _wait_jobs(cfg, 1, {"done"}, [tmp_path / "node.log"])
        detail = json.loads(_cli(cfg, "jobs", "show", str(job["id"]), "--json").stdout)
    finally:
        node.stop()
    kinds = _received(received)
    assert len(kinds.get(SEG, [])) == 1 and len(kinds.get(COMPREHENSIVE_3D_SR, [])) == 1, kinds
    assert len(kinds.get(PARAMETRIC_MAP, [])) == 1, kinds
    # what the archive got: repaired copies, the name as sent, the unrepairable value as sent
    for f in received.rglob("*"):
        if not f.is_file():
            continue
        ds = dcmread(f, stop_before_pixels=True)
        assert "PatientAge" not in ds and not ds.StudyDate and not ds.PatientSex, ds.SOPClassUID
        assert str(ds.PatientName) == "Doe_John"
        assert ds.ClinicalTrialSponsorName == HEADER_DEFECTS["ClinicalTrialSponsorName"][0]
    # the job records what was repaired and what was inherited, and says so in its history
    validation = detail["findings"]["validation"]
    assert {(f["attribute"], f["action"]) for f in validation["fixes"]} >= {
        ("PatientAge", "removed"), ("StudyDate", "emptied"), ("ClinicalTrialSponsorName", "kept")}
    assert set(validation["inherited"]) == {"seg", "sr", "map"}
    delivering = [e for e in detail["events"] if e["to_state"] == "delivering"]
    assert "source header value(s) repaired" in delivering[0]["message"]
    assert "source error(s) inherited" in delivering[0]["message"]
    assert "Doe_John" not in json.dumps(validation) and "2026-01-01" not in json.dumps(validation)
