"""Anomaly-detection engine: U-Net trained on normal images, residual scoring.

Modules are split by concern; import what you need, for example::

    from worker.engine.predictor import Predictor
    from worker.engine.volume import Volume
"""

from __future__ import annotations

__all__ = ["CODE_VERSION"]

try:  # the package version is the code version recorded in checkpoints
    from pacs_node import __version__ as _pkg_version
except Exception:  # noqa: BLE001 - engine must work without the node package
    _pkg_version = "0.0.0"

CODE_VERSION: str = f"pacs-node-engine/{_pkg_version}"
