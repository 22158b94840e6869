"""The engine subcommands, dispatched the way pacs_node.cli does."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.cli import register
from worker.engine.settings import EngineSettings, load_engine_settings


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="pacs-node")
    parser.add_argument("--config", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return parser, dict(sub.choices)


def _run(argv: list[str]) -> int:
    args = _parser()[0].parse_args(argv)
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
    for key in ("normal_fp_ml_mean", "normal_fp_ml_median", "normal_fp_ml_p95", "normal_any_finding_share",
                "normal_voxel_fpr", "dice_per_study_mean"):
        for r in (out, out["baselines"]["intensity"], out["baselines"]["pixel_zscore"], out["baseline"]):
            assert isinstance(r[key], float) and r[key] >= 0.0
    assert out["n_normal"] == 1 and out["normal_any_finding_share"] in (0.0, 1.0)
    assert 0.0 <= out["normal_voxel_fpr"] <= 1.0
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


def test_piped_training_logs_its_progress(tmp_path: Path) -> None:
    """A run piped to a file is never silent: progress goes to the log (stderr), not only to tqdm."""
    import subprocess
    import sys

    out = tmp_path / "m.pt"
    res = subprocess.run([sys.executable, "-m", "pacs_node", "train", "--synthetic", "--fast", "--out", str(out),
                          "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "4", "--depth", "2", "--base", "4",
                          "--size", "32", "--scoring", "residual", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "epoch 1: train" in res.stderr and "epoch 2: train" in res.stderr, res.stderr[-2000:]
    assert "calibrated residual threshold" in res.stderr
    assert res.stdout.startswith("model written to")


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
                 "--batch-size", "4", "--depth", "2", "--base", "4", "--size", "32", "--scoring", "residual",
                 "--region", "head"]) == 0
    capsys.readouterr()
    assert _run(["evaluate", "--model", str(model), "--data", str(tests), "--masks", str(masks), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_studies"] == 2 and out["n_abnormal"] == 1
    assert out["model"]["name"] == "local-normals"
    assert _run(["evaluate", "--model", str(model), "--data", str(tests)]) == 2  # --masks required with --data


def _flat_help(p: argparse.ArgumentParser) -> str:
    return " ".join(p.format_help().split())


def test_help_shows_every_default() -> None:
    _, subs = _parser()
    for name in ("train", "calibrate", "evaluate"):
        p = subs[name]
        fmt = p._get_formatter()
        one_of = {a for g in p._mutually_exclusive_groups if g.required for a in g._group_actions}
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            text = fmt._get_help_string(a) or ""  # what --help prints for the option
            assert text, f"{name} {a.option_strings}: no help"
            if a.required or a in one_of or isinstance(a.default, bool):
                continue  # required options (--synthetic or --data) and flags have no default
            assert "(default: " in text, f"{name} {a.option_strings}: no default in {text!r}"
        assert "None" not in p.format_help()
    train, cal, ev = (_flat_help(subs[n]) for n in ("train", "calibrate", "evaluate"))
    assert ("training epochs (default: 30 with --anatomy or --data, 16 with --synthetic; with --fast 2 (--anatomy) "
            "/ 3 (--synthetic))") in train
    assert "batches per epoch (default: 100; with --fast 10 (--anatomy) / 40 (--synthetic))" in train
    assert "peak learning rate (default: 0.002)" in train
    assert "(default: 128 with --anatomy or --data, 64 with --synthetic)" in train
    assert ("auto: choose between residual and combined on held-out normals with injected synthetic lesions" in train
            and "(default: auto)" in train)
    assert "with --anatomy, synthetic-demo with --synthetic, local-<DIR name> with --data)" in train
    eng = EngineSettings()
    for text in (train, cal, ev):
        assert f"(default: [engine] device, {eng.device!r} unless configured)" in text
        assert f"(default: [engine] num_threads, {eng.num_threads} unless configured;" in text
    assert f"(default: [engine] target_fpr, {eng.target_fpr} unless configured)" in cal
    assert "(default: the checkpoint's)" in cal and "(default: update MODEL in place)" in cal
    assert "abnormal test studies of --anatomy / --synthetic (default: 30 / 24)" in ev and "(default: no plots)" in ev


def _flat_defaults(cfg: Any) -> dict[str, Any]:
    """The training options' values in a demo configuration, keyed like the CLI's default tables."""
    assert cfg.preprocess.size[0] == cfg.preprocess.size[1]
    t, u, s = cfg.train, cfg.unet, cfg.scoring
    return {"epochs": t.epochs, "steps_per_epoch": t.steps_per_epoch, "batch_size": t.batch_size, "lr": t.lr,
            "objective": t.objective, "loss": t.loss, "local_prob": t.local_prob, "depth": u.depth,
            "base": u.base, "norm": u.norm, "context": cfg.preprocess.context, "size": cfg.preprocess.size[0],
            "combine_with": s.combine_with, "combine_weight": s.combine_weight}


@pytest.mark.parametrize("source", ["synthetic", "anatomy"])
def test_cli_defaults_are_the_demo_configurations(source: str) -> None:
    from worker import cli
    from worker.engine.demo import demo_config
    from worker.engine.headdemo import anatomy_config

    make = demo_config if source == "synthetic" else anatomy_config
    full, fast = ((cli.DEMO_DEFAULTS, cli.DEMO_FAST_DEFAULTS) if source == "synthetic"
                  else (cli.ANATOMY_DEFAULTS, cli.ANATOMY_FAST_DEFAULTS))
    assert _flat_defaults(make(False)) == full
    assert {k: v for k, v in _flat_defaults(make(True)).items() if v != full[k]} == fast


def test_building_the_parser_imports_neither_torch_nor_scipy() -> None:
    code = ("import argparse, sys\n"
            "from worker.cli import register\n"
            "sub = argparse.ArgumentParser().add_subparsers()\n"
            "register(sub)\n"
            "for p in sub.choices.values(): p.format_help()\n"
            "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_train_has_no_wall_clock_budget(capsys: pytest.CaptureFixture[str]) -> None:
    parser, subs = _parser()
    assert "minutes" not in subs["train"].format_help()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["train", "--synthetic", "--out", "m.pt", "--max-minutes", "5"])
    assert exc.value.code == 2 and "--max-minutes" in capsys.readouterr().err


def test_split_guarantees_two_training_one_validation_one_calibration_series() -> None:
    from worker.cli import _split

    for n in range(4):
        with pytest.raises(ValueError, match=rf"at least 4 normal series \(2 training, 1 validation, 1 calibration\), "
                                             rf"found {n}$"):
            _split(list(range(n)), 0)
    for n in range(4, 41):
        for seed in (0, 1):
            tr, val, cal = _split(list(range(n)), seed)
            assert len(tr) >= 2 and len(val) >= 1 and len(cal) >= 1, (n, seed)
            assert sorted(tr + val + cal) == list(range(n))
    assert [len(x) for x in _split(list(range(4)), 0)] == [2, 1, 1]
    assert [len(x) for x in _split(list(range(20)), 0)] == [14, 3, 3]


def test_train_on_too_few_series_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import worker.engine.pipeline as pipeline

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started on an impossible split")

    monkeypatch.setattr(pipeline, "fit", no_fit)
    normals = tmp_path / "normals"
    normals.mkdir()
    for seed in range(3):
        _write_mr_series(normals, seed, anomalous=False)
    model = tmp_path / "m.pt"
    assert _run(["train", "--data", str(normals), "--out", str(model), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert "at least 4 normal series (2 training, 1 validation, 1 calibration), found 3" in err
    assert not model.exists() and not (tmp_path / "m.pt.state").exists()


def test_evaluate_table_columns(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli import _table

    res = {"method": "residual", "n_abnormal": 2, "n_normal": 4, "auroc": 0.9, "auprc": 0.5, "dice": 0.25,
           "sensitivity": 0.5, "specificity": 0.99, "precision": 0.4, "study_auroc": None,
           "normal_fp_ml_median": 1.25, "normal_any_finding_share": 0.75,
           "baselines": {"intensity": {"polarity": "bright", "auroc": 0.6, "auprc": 0.1, "dice": 0.05,
                                       "sensitivity": 0.1, "specificity": 0.9, "precision": 0.05,
                                       "study_auroc": 0.5, "normal_fp_ml_median": None,
                                       "normal_any_finding_share": 1.0}}}
    lines = _table(res).splitlines()
    assert lines[0].split()[-4:] == ["mL", "med", "FP", "normals"]
    assert lines[1].split()[-3:] == ["-", "1.2500", "0.7500"]
    assert lines[2].split()[-3:] == ["0.5000", "-", "1.0000"]
    assert "(4 normal, 2 abnormal studies)" in lines[-1]

    assert _run(["evaluate", "--model", str(tiny_ckpt), "--synthetic", "--n-abnormal", "1", "--n-normal", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "FP mL med" in out[0] and "FP normals" in out[0]
    unet = out[1].split()
    assert unet[0] == "U-Net" and len(unet) == 2 + 9 and unet[-1] in ("0.0000", "1.0000")
    assert "(1 normal, 1 abnormal studies)" in out[-1]
