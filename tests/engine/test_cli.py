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
