"""The engine subcommands, dispatched the way pacs_node.cli does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from worker.cli import register
from worker.engine.settings import EngineSettings, load_engine_settings


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pacs-node")
    parser.add_argument("--config", default=None)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_evaluate_json(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run(["evaluate", "--model", str(tiny_ckpt), "--synthetic", "--json", "--n-abnormal", "2", "--n-normal", "1",
               "--plots", str(tmp_path / "plots"), "--threads", "2"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("auroc", "auprc", "dice", "sensitivity", "specificity", "precision", "f1", "threshold"):
        assert key in out and key in out["baselines"]["intensity"] and key in out["baselines"]["pixel_zscore"]
        assert key in out["baseline"]
    assert out["baseline"]["name"] in ("intensity", "pixel_zscore")
    assert 0.0 <= out["auroc"] <= 1.0 and out["n_studies"] == 3
    assert {"roc.png", "pr.png", "overlay_0.png"} <= {p.name for p in (tmp_path / "plots").iterdir()}


def test_calibrate_updates_threshold(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_model = tmp_path / "recal.pt"
    rc = _run(["calibrate", "--model", str(tiny_ckpt), "--synthetic", "--target-fpr", "0.02", "--out", str(out_model)])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["target_fpr"] == 0.02 and info["n_volumes"] == 10
    from worker.engine.predictor import Predictor

    p = Predictor.from_checkpoint(out_model)
    assert p.scoring.target_fpr == 0.02 and p.scoring.threshold == pytest.approx(info["threshold"])


def test_calibrate_combined_with_feature_residual(tiny_ckpt: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``--method combined --combine-with feature``: residual + feature-space residual, calibrated and usable."""
    import numpy as np

    from worker.engine.predictor import Predictor
    from worker.engine.synthetic import make_case

    out_model = tmp_path / "feature.pt"
    rc = _run(["calibrate", "--model", str(tiny_ckpt), "--synthetic", "--method", "combined",
               "--combine-with", "feature", "--combine-weight", "0.25", "--out", str(out_model)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["method"] == "combined"
    p = Predictor.from_checkpoint(out_model)
    assert (p.scoring.method, p.scoring.combine_with, p.scoring.combine_weight) == ("combined", "feature", 0.25)
    assert set(p.scoring.scales) >= {"residual", "feature"} and p.scoring.scales["feature"] > 0
    vol = make_case(4242, anomalous=True, shape=(12, 40, 48), spacing=(4.0, 3.0, 3.0)).volume
    comp = p.components(vol, ["residual", "feature"])
    feat = comp.maps["feature"]
    assert feat.shape == vol.shape and feat.min() >= 0 and feat.max() > 0
    assert not feat[~comp.region].any()  # restricted to the scoring region, like every component
    res = p.predict(vol)
    assert res.mask.shape == vol.shape and np.isfinite(res.study_score)
    assert _run(["calibrate", "--model", str(tiny_ckpt), "--synthetic", "--combine-weight", "-1",
                 "--out", str(tmp_path / "bad.pt")]) == 1


def test_cli_combine_choices_are_the_scoring_ones() -> None:
    from worker.cli import COMBINE_WITH_CHOICES
    from worker.engine.scoring import COMBINE_WITH

    assert COMBINE_WITH_CHOICES == COMBINE_WITH


def test_bad_model_and_bad_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    assert _run(["evaluate", "--model", str(bad), "--synthetic"]) == 1
    assert "error" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("[engine]\nbatch_size = 0\n")
    assert _run(["--config", str(cfg), "evaluate", "--model", str(bad), "--synthetic"]) == 2
    assert "engine.batch_size" in capsys.readouterr().err


def test_train_synthetic_tiny(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    rc = _run(["train", "--synthetic", "--fast", "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2",
               "--batch-size", "4", "--depth", "2", "--base", "4", "--size", "32", "--scoring", "residual"])
    assert rc == 0 and out.exists() and (tmp_path / "m.pt.state").exists()
    from worker.engine.predictor import Predictor

    p = Predictor.from_checkpoint(out)
    assert p.meta["arch"]["depth"] == 2 and p.meta["preprocess"]["size"] == [32, 32]
    assert p.scoring.threshold is not None


def test_engine_settings() -> None:
    s = EngineSettings()
    assert s.device == "auto" and str(s.model).endswith("models/demo.pt")
    assert load_engine_settings(raw={"device": "cuda:1", "batch_size": 8}).batch_size == 8
    with pytest.raises(ValueError, match="engine.device"):
        load_engine_settings(raw={"device": "tpu"})
    with pytest.raises(ValueError, match="unknown key"):
        load_engine_settings(raw={"nope": 1})


def _write_mr_series(directory: Path, seed: int, anomalous: bool) -> tuple[str, object]:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from worker.engine.synthetic import make_case

    case = make_case(seed, anomalous=anomalous, shape=(10, 32, 40), spacing=(8.0, 6.0, 5.0))
    series = generate_uid()
    arr = np.clip(case.volume.array, 0, 4000).astype(np.uint16)
    for z in range(arr.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", series, "1.2.3"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.Rows, ds.Columns = arr.shape[1:]
        ds.ImagePositionPatient = [0.0, 0.0, 8.0 * z]
        ds.ImageOrientationPatient = [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing = [6.0, 5.0]
        ds.InstanceNumber = z + 1
        ds.PixelData = arr[z].tobytes()
        ds.save_as(directory / f"{series}-{z}.dcm", enforce_file_format=True)
    return series, case


def test_train_and_evaluate_on_dicom_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import SimpleITK as sitk

    normals, tests, masks = tmp_path / "normals", tmp_path / "tests", tmp_path / "masks"
    for d in (normals, tests, masks):
        d.mkdir()
    for seed in range(4):
        _write_mr_series(normals, seed, anomalous=False)
    uid, case = _write_mr_series(tests, 1_000_001, anomalous=True)
    _write_mr_series(tests, 1_500_000, anomalous=False)  # no mask file: counts as normal
    mask = sitk.GetImageFromArray(case.mask.astype("uint8"))
    mask.SetSpacing((5.0, 6.0, 8.0))
    sitk.WriteImage(mask, str(masks / f"{uid}.nii.gz"))
    model = tmp_path / "local.pt"
    assert _run(["train", "--data", str(normals), "--out", str(model), "--epochs", "1", "--steps-per-epoch", "2",
                 "--batch-size", "4", "--depth", "2", "--base", "4", "--size", "32", "--scoring", "residual"]) == 0
    capsys.readouterr()
    assert _run(["evaluate", "--model", str(model), "--data", str(tests), "--masks", str(masks), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_studies"] == 2 and out["n_abnormal"] == 1
    assert out["model"]["name"] == "local-normals"
    assert _run(["evaluate", "--model", str(model), "--data", str(tests)]) == 2  # --masks required with --data
