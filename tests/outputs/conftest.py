"""Fixtures of the output tests (helpers live in ``outgen.py``)."""

from __future__ import annotations

import os

import pytest

from nodetest import require, require_tool
from outgen import PIXELMED_JAR
from worker.outputs.settings import OutputSettings


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    return require_tool("dciodvfy")


@pytest.fixture(scope="session")
def pixelmed() -> str:
    """PixelMed's jar (Debian's libpixelmed-java), for :func:`outgen.run_pixelmed_sr`."""
    require_tool("java")
    require(os.path.exists(PIXELMED_JAR), f"PixelMed ({PIXELMED_JAR}, libpixelmed-java)")
    return PIXELMED_JAR


@pytest.fixture
def out_settings(dciodvfy: str) -> OutputSettings:
    return OutputSettings(require_dciodvfy=True, dciodvfy_path=dciodvfy)
