"""The bundled demo model: installed on first `serve` at the default path,
never over an operator's model, and loadable by the worker's predictor."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodetest import make_settings
from pacs_node.serve import BUNDLED_DEMO_MODEL, DEFAULT_MODEL, provision_demo_model


def test_bundled_model_installed_at_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'n.db'}")
    installed = provision_demo_model(settings)
    assert installed == DEFAULT_MODEL and DEFAULT_MODEL.read_bytes() == BUNDLED_DEMO_MODEL.read_bytes()
    assert provision_demo_model(settings) is None  # already there: untouched
    from worker.engine.predictor import Predictor

    p = Predictor.from_checkpoint(DEFAULT_MODEL, device="cpu")
    assert p.meta["scoring"]["threshold"] is not None  # calibrated


def test_operator_model_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "mine.pt"
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'n.db'}", engine__model=str(own))
    assert provision_demo_model(settings) is None
    assert not own.exists() and not DEFAULT_MODEL.exists()
