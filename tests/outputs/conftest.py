"""Fixtures of the output tests (helpers live in ``outgen.py``)."""

from __future__ import annotations

import pytest

from nodetest import require_tool
from worker.outputs.settings import OutputSettings


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    return require_tool("dciodvfy")


@pytest.fixture
def out_settings(dciodvfy: str) -> OutputSettings:
    return OutputSettings(require_dciodvfy=True, dciodvfy_path=dciodvfy)
