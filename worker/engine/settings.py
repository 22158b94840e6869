"""Validated ``[engine]`` settings (the ``Settings.engine`` dict of the node config).

Keys (TOML ``[engine]`` table, all optional)::

    model        = "./pacs-node-data/models/demo.pt"  # checkpoint used by the worker
    device       = "auto"        # "auto" (CUDA if present), "cpu", "cuda", "cuda:1"
    batch_size   = 32            # slices per forward pass at inference
    num_threads  = 0             # torch CPU threads; 0 = $PACS_NODE_THREADS or all cores
    amp          = "auto"        # bf16 autocast: "auto" (CUDA / native-bf16 CPUs, checked vs fp32), "on", "off"
    ct_window    = [40.0, 80.0]  # CT [level, width] HU window used when training on CT
    mr_method    = "percentile"  # MR normalisation for training: "percentile" or "zscore"
    target_fpr   = 0.0005        # voxel false-positive rate on normals for calibration (99.95th percentile)
    scoring      = ""            # force a scoring method at calibration ("residual", "ssim", "combined"); "" keeps the checkpoint's
    progress     = true          # tqdm progress bars in train/calibrate/evaluate
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

__all__ = ["EngineSettings", "load_engine_settings"]


class EngineSettings(BaseModel):
    """Engine configuration; unknown keys are rejected."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}

    model: Path = Path("./pacs-node-data/models/demo.pt")
    device: str = "auto"
    batch_size: int = Field(default=32, ge=1, le=4096)
    num_threads: int = Field(default=0, ge=0, le=1024)
    amp: Literal["auto", "on", "off"] = "auto"
    ct_window: tuple[float, float] = (40.0, 80.0)
    mr_method: Literal["percentile", "zscore"] = "percentile"
    target_fpr: float = Field(default=0.0005, gt=0.0, lt=0.5)
    scoring: Literal["", "residual", "ssim", "combined"] = ""
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v == "cuda" or v.startswith("cuda:")):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    @field_validator("ct_window")
    @classmethod
    def _check_window(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] <= 0:
            raise ValueError("window width must be positive")
        return v


def load_engine_settings(config_file: str | None = None, raw: dict[str, Any] | None = None) -> EngineSettings:
    """Validate the ``[engine]`` table.

    Parameters
    ----------
    config_file:
        Node TOML file (``--config``); ``None`` uses defaults/environment.
    raw:
        Use this dict instead of reading the node configuration.

    Returns
    -------
    EngineSettings
        Validated settings.

    Raises
    ------
    ValueError
        With a one-line message naming the offending ``engine.<key>``.
    """
    if raw is None:
        from pacs_node.config import load_settings

        raw = load_settings(config_file).engine
    try:
        return EngineSettings.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ValueError(f"invalid configuration: engine.{key}: {msg}") from None
