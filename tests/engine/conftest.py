"""Shared fixtures for the engine tests (tiny models, small images)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, calibrated tiny checkpoint (trained once per session)."""
    from worker.engine.demo import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny.pt", seed=0)
