"""The validation gate on real-world headers: repair what the standard allows,
let through what the source got wrong, fail only on what the node got wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from nodetest import make_settings
from outgen import (ALGORITHM, HEADER_DEFECTS, HEADER_MISSING, prediction_for, synthetic_series, with_header_defects,
                    write_series)
from worker.outputs.build import JobOutputs, build_job_outputs, build_outputs, check_and_fix_source, write_outputs
from worker.outputs.gate import classify, redact
from worker.outputs.headers import fix_headers
from worker.outputs.settings import OutputSettings
from worker.outputs.source import SourceSeries
from worker.outputs.validate import OutputValidationError

BOXES = [(slice(1, 3), slice(2, 7), slice(3, 9))]
#: the values of the corpus, none of which may appear in a record or an error (patient data)
SECRETS = ("Doe_John", "2026-01-01", "ACC-2026-000123456", "male", "Sponsor SSS", "42>")


class _Predictor:
    model_name = "tiny"
    model_version = "pacs-node-engine/0.1.0+abcdef012345"
    checksum = "abcdef012345" * 5 + "abcd"


def _job(tmp_path: Path, outputs: dict[str, object]) -> tuple[list[Path], JobOutputs]:
    paths = write_series(with_header_defects(synthetic_series(modality="MR", n=6, seed=4)), tmp_path / "src")
    source = SourceSeries.from_files(paths)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    settings.outputs = {"require_dciodvfy": True, "overlay": True, **outputs}
    written = build_job_outputs(job_id=3, source_paths=paths, prediction=prediction_for(source, BOXES),
                                predictor=_Predictor(), settings=settings, out_dir=tmp_path / "out" / "3")
    assert isinstance(written, JobOutputs)
    return paths, written


def test_defect_corpus_passes_the_gate_repaired(tmp_path: Path, dciodvfy: str) -> None:
    """AS without unit, DA with separators, PN with "_", over-long LO/SH, bad CS,
    missing Type 2: every output passes dciodvfy's gate; what could be repaired
    is repaired in the outputs only, and recorded; the unrepairable Type 1 value
    is let through as inherited."""
    paths, written = _job(tmp_path, {})
    assert [w.kind for w in written][:3] == ["seg", "sr", "map"] and "overlay" in [w.kind for w in written]
    record = written.validation()
    actions = {(f["attribute"], f["action"]) for f in record["fixes"]}
    assert actions == {
        ("PatientAge", "removed"), ("StudyDescription", "removed"),
        ("StudyDate", "emptied"), ("AccessionNumber", "emptied"), ("PatientSex", "emptied"),
        ("PatientBirthDate", "added empty"), ("ReferringPhysicianName", "added empty"),
        ("ClinicalTrialSponsorName", "kept"),
    }
    types = {f["attribute"]: f["type"] for f in record["fixes"]}
    assert types["PatientAge"] == "3" and types["StudyDate"] == "2" and types["ClinicalTrialSponsorName"] == "1"
    for w in written:
        ds = pydicom.dcmread(w.path)
        assert "PatientAge" not in ds and "StudyDescription" not in ds, w.kind
        for keyword in ("StudyDate", "AccessionNumber", "PatientSex", *HEADER_MISSING):
            assert keyword in ds and not ds[keyword].value, (w.kind, keyword)
        assert str(ds.PatientName) == "Doe_John"  # a warning only: kept as received
        assert "BodyPartExamined" not in ds or ds.BodyPartExamined != "head and neck region"
        report = json.loads(w.validation)
        assert report["errors"] == [], w.kind
        if w.kind != "overlay":  # highdicom's SC image copies no Clinical Trial modules
            assert ds.ClinicalTrialSponsorName == HEADER_DEFECTS["ClinicalTrialSponsorName"][0]
            # the one error dciodvfy still finds is the source's own
            assert any("Clinical Trial Sponsor Name" in line for line in report["inherited"]), (w.kind, report)
    assert set(record["inherited"]) == {"seg", "sr", "map"}
    assert record["source"]["errors"] and record["source"]["dciodvfy"] == dciodvfy
    text = json.dumps(record) + "".join(w.validation for w in written)
    assert not [s for s in SECRETS if s in text], "patient data in the validation record"
    # the source files are untouched
    assert pydicom.dcmread(paths[0]).PatientAge == "42"


def test_keep_mode_lets_every_source_error_through_as_inherited(tmp_path: Path, dciodvfy: str) -> None:
    """``source_header_fixes = "keep"``: outputs copy the invalid values as
    they are, and the gate still passes them (inherited) instead of failing."""
    _, written = _job(tmp_path, {"source_header_fixes": "keep", "overlay": False})
    record = written.validation()
    # highdicom refuses an invalid Patient's Sex or Study Date: those are repaired in either mode
    assert {(f["attribute"], f["action"]) for f in record["fixes"] if f["action"] not in ("kept", "added empty")} == {
        ("PatientSex", "emptied"), ("StudyDate", "emptied")}
    seg = pydicom.dcmread(written[0].path)
    assert seg.PatientAge == "42" and seg.AccessionNumber == HEADER_DEFECTS["AccessionNumber"][0]
    inherited = record["inherited"]["seg"]
    for name in ("Patient's Age", "Accession Number", "Study Description", "Clinical Trial Sponsor Name"):
        assert any(name in line for line in inherited), name
    assert any("invalid data values" in line for line in inherited)
    assert all(json.loads(w.validation)["errors"] == [] for w in written)


def test_an_error_the_node_makes_still_fails(tmp_path: Path, dciodvfy: str) -> None:
    """With a defective source and its check in hand, an error the source does
    not have (a SEG without its Type 1 Content Label) fails the gate; the
    reasons carry no values."""
    datasets = with_header_defects(synthetic_series(modality="CT", n=5))
    settings = OutputSettings(require_dciodvfy=True, dciodvfy_path=dciodvfy, source_header_fixes="keep")
    source = SourceSeries.from_datasets(datasets, repair_headers=False)
    check = check_and_fix_source(source, settings)
    assert check is not None and check.errors
    built = build_outputs(job_id=1, source=source, prediction=prediction_for(source, BOXES), algorithm=ALGORITHM,
                          settings=settings)
    del built[0].dataset.ContentLabel
    with pytest.raises(OutputValidationError) as err:
        write_outputs(built, tmp_path / "1", settings=settings, source_check=check)
    assert err.value.kind == "seg"
    assert any("ContentLabel" in r or "Content Label" in r for r in err.value.reasons)
    assert not any("Patient's Age" in r for r in err.value.reasons)  # inherited, not a reason
    assert not [s for s in SECRETS if s in str(err.value)]


def test_classification_and_redaction() -> None:
    from worker.outputs.gate import SourceCheck

    src = SourceCheck(dciodvfy="/usr/bin/dciodvfy", errors=[
        "Error - Value invalid for this VR - (0x0010,0x1010) AS Patient's Age  AS [1] = <42> - Length invalid",
        "Error - Missing attribute Type 2 Required Element=<PatientSex> Module=<Patient>",
        "Error - Dicom dataset contains invalid data values for Value Representations",
    ])
    out = [
        "Error - Value invalid for this VR - (0x0010,0x1010) AS Patient's Age  AS [1] = <42> - Length invalid",
        "Error - Missing attribute Type 2 Required Element=<PatientSex> Module=<GeneralStudy>",  # other module name
        "Error - Dicom dataset contains invalid data values for Value Representations",
        "Error - Missing attribute Type 1 Required Element=<ContentLabel> Module=<Segmentation>",
    ]
    introduced, inherited = classify(out, src)
    assert introduced == [out[3]] and inherited == out[:3]
    # a value error of the node's own makes the summary line the node's too
    own = "Error - Value invalid for this VR - (0x0008,0x0070) LO Manufacturer  LO [1] = <x> - Length invalid"
    introduced, _ = classify([out[2], own], src)
    assert introduced == [own, out[2]]
    assert classify(out, None) == (out, [])  # no source check: every error counts
    assert redact(out[0]) == ("Error - Value invalid for this VR - (0x0010,0x1010) AS Patient's Age  AS [1] = <…> "
                              "- Length invalid")
    assert redact("Error - Unrecognized enumerated value <male> for value 1 of attribute <Patient's Sex>") == (
        "Error - Unrecognized enumerated value <…> for value 1 of attribute <Patient's Sex>")


def test_fix_headers_never_touches_the_given_data_sets() -> None:
    datasets = with_header_defects(synthetic_series(modality="CT", n=3))
    fixed, fixes = fix_headers(datasets)
    assert all(ds.PatientAge == "42" and "PatientBirthDate" not in ds for ds in datasets)
    assert all("PatientAge" not in ds and "PatientBirthDate" in ds and not ds.PatientBirthDate for ds in fixed)
    assert len(fixes) == len({(f.keyword, f.action) for f in fixes})  # once per attribute, not per instance
    clean = synthetic_series(modality="CT", n=2)
    again, none = fix_headers(clean)
    assert none == [] and all(a is b for a, b in zip(again, clean))  # nothing to do: the same objects
