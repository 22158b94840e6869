"""Checkpoint round-trip and refusal of bad files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.engine.checkpoint import CheckpointError, file_sha256, load_checkpoint
from worker.engine.pipeline import save_predictor
from worker.engine.predictor import Predictor
from worker.engine.synthetic import make_case


def _blob(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_round_trip_predicts_identically(tiny_ckpt: Path, tmp_path: Path) -> None:
    p1 = Predictor.from_checkpoint(tiny_ckpt, device="cpu")
    assert p1.checksum == file_sha256(tiny_ckpt)
    assert p1.model_name == "tiny-test" and p1.checksum[:12] in p1.model_version
    meta = p1.meta
    for key in ("arch", "preprocess", "scoring", "training", "validation", "code_version", "baselines"):
        assert key in meta
    assert meta["scoring"]["threshold"] > 0 and meta["scoring"]["calibration"]["n_volumes"] == 2
    assert len(meta["training"]["data_sha256"]) == 64
    copy = tmp_path / "copy.pt"
    save_predictor(p1, copy)
    p2 = Predictor.from_checkpoint(copy, device="cpu")
    vol = make_case(3, shape=(12, 32, 32), spacing=(8.0, 6.0, 6.0)).volume
    a, b = p1.predict(vol), p2.predict(vol)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert a.threshold == b.threshold


def test_refuses_missing_truncated_and_garbage(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    data = tiny_ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        Predictor.from_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "garbage.pt")


def test_refuses_tampered_weights(tiny_ckpt: Path, tmp_path: Path) -> None:
    blob = _blob(tiny_ckpt)
    name = next(iter(blob["state_dict"]))
    blob["state_dict"][name] = blob["state_dict"][name] + 1.0
    torch.save(blob, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="integrity"):
        load_checkpoint(tmp_path / "tampered.pt")


def test_refuses_incompatible(tiny_ckpt: Path, tmp_path: Path) -> None:
    blob = _blob(tiny_ckpt)
    blob["format_version"] = 99
    torch.save(blob, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "v99.pt")
    blob = _blob(tiny_ckpt)
    meta = json.loads(blob["meta"])
    meta["arch"]["base"] = 16  # weights no longer fit the architecture
    blob["meta"] = json.dumps(meta)
    torch.save(blob, tmp_path / "arch.pt")
    with pytest.raises(CheckpointError, match="incompatible"):
        Predictor.from_checkpoint(tmp_path / "arch.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pacs-node"):
        load_checkpoint(tmp_path / "other.pt")


class _Evil:
    def __reduce__(self):  # pragma: no cover - must never run
        return (exec, ("raise SystemExit('pwned')",))


def test_refuses_pickled_code(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"format": "pacs-node-anomaly", "x": _Evil()}, buf)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")


def test_uncalibrated_model_refuses_to_predict(tiny_ckpt: Path) -> None:
    p = Predictor.from_checkpoint(tiny_ckpt, device="cpu")
    p.scoring.threshold = None
    with pytest.raises(CheckpointError, match="calibrat"):
        p.predict(make_case(1, shape=(12, 32, 32), spacing=(8.0, 6.0, 6.0)).volume)
