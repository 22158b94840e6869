"""The synthetic demo model and a tiny checkpoint for integration tests.

Seed ranges keep the synthetic splits disjoint: training ``0..``, validation
``10_000..``, calibration ``20_000..``, scoring-method selection
``30_000..`` and the held-out test set ``1_000_000..``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .model import UNetConfig
from .pipeline import fit, save_predictor
from .preprocess import PreprocessConfig
from .scoring import ScoringConfig
from .synthetic import DEFAULT_SHAPE, DEFAULT_SPACING, make_case
from .train import TrainConfig
from .volume import Volume

__all__ = ["DemoConfig", "SEEDS", "demo_config", "synthetic_normals", "synthetic_cases", "synthetic_test_set",
           "tiny_checkpoint", "train_synthetic"]

log = logging.getLogger(__name__)

SEEDS = {"train": 0, "val": 10_000, "calib": 20_000, "select": 30_000, "test": 1_000_000}


@dataclass
class DemoConfig:
    """Everything that defines a synthetic model build."""

    shape: tuple[int, int, int] = DEFAULT_SHAPE
    spacing: tuple[float, float, float] = DEFAULT_SPACING
    n_train: int = 40
    n_val: int = 6
    n_calib: int = 10
    n_select: int = 10
    unet: UNetConfig = field(default_factory=UNetConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=16, steps_per_epoch=100,
                                                                   noise_res=(8, 16, 32), noise_std=0.12,
                                                                   local_prob=0.5))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(smooth_sigma=0.0))


def demo_config(fast: bool = False) -> DemoConfig:
    """Demo defaults; ``fast`` is a ~1 minute build for smoke tests (weaker)."""
    cfg = DemoConfig()
    if fast:
        cfg.n_train, cfg.n_val, cfg.n_calib, cfg.n_select = 12, 3, 4, 4
        cfg.train = TrainConfig(epochs=3, steps_per_epoch=40, noise_res=(8, 16, 32), noise_std=0.12, local_prob=0.5)
    return cfg


def synthetic_normals(split: str, n: int, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                      spacing: tuple[float, float, float] = DEFAULT_SPACING) -> list[Volume]:
    """``n`` normal volumes of a split (see :data:`SEEDS`)."""
    base = SEEDS[split]
    return [make_case(base + i, anomalous=False, shape=shape, spacing=spacing).volume for i in range(n)]


def synthetic_cases(split: str, n_abnormal: int, n_normal: int, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                    spacing: tuple[float, float, float] = DEFAULT_SPACING) -> list[tuple[Volume, np.ndarray | None]]:
    """Abnormal then normal ``(volume, mask)`` pairs of a split."""
    base = SEEDS[split]
    out: list[tuple[Volume, np.ndarray | None]] = []
    for i in range(n_abnormal):
        c = make_case(base + i, anomalous=True, shape=shape, spacing=spacing)
        out.append((c.volume, c.mask))
    for i in range(n_normal):
        c = make_case(base + 500_000 + i, anomalous=False, shape=shape, spacing=spacing)
        out.append((c.volume, None))
    return out


def synthetic_test_set(n_abnormal: int = 24, n_normal: int = 6) -> list[tuple[Volume, np.ndarray | None]]:
    """The held-out synthetic test set (seeds never used for training or calibration)."""
    return synthetic_cases("test", n_abnormal, n_normal)


def train_synthetic(out: Path, cfg: DemoConfig, *, device: str = "auto", progress: bool = True,
                    resume: bool = False, model_name: str = "synthetic-demo") -> Path:
    """Build, calibrate and save a model on synthetic normals.

    Returns
    -------
    Path
        ``out``.
    """
    t0 = time.monotonic()
    out = Path(out)
    train_v = synthetic_normals("train", cfg.n_train, cfg.shape, cfg.spacing)
    val_v = synthetic_normals("val", cfg.n_val, cfg.shape, cfg.spacing)
    cal_v = synthetic_normals("calib", cfg.n_calib, cfg.shape, cfg.spacing)
    sel = synthetic_cases("select", cfg.n_select, 0, cfg.shape, cfg.spacing) if cfg.n_select else None
    pred = fit(
        train_v, val_v, cal_v, ucfg=cfg.unet, tcfg=cfg.train, pcfg=cfg.preprocess, scfg=cfg.scoring,
        model_name=model_name,
        data_description=(f"synthetic head phantoms, {cfg.n_train} normal volumes {cfg.shape} "
                          f"spacing {cfg.spacing} mm, seeds {SEEDS['train']}..{SEEDS['train'] + cfg.n_train - 1}"),
        device=device, state_path=out.with_name(out.name + ".state"), resume=resume, progress=progress,
        select_cases=sel,
    )
    pred.meta["training"]["total_build_seconds"] = round(time.monotonic() - t0, 1)
    save_predictor(pred, out)
    log.info("model written to %s in %.0f s", out, time.monotonic() - t0)
    return out


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Train and calibrate a tiny model in a few seconds (for integration tests).

    The model is real (U-Net, calibrated threshold, baseline atlas) but far
    too small to be accurate. Volumes are ``(12, 32, 32)`` with 6 mm pixels.

    Returns
    -------
    Path
        ``path``.
    """
    cfg = DemoConfig(
        shape=(12, 32, 32), spacing=(8.0, 6.0, 6.0), n_train=4, n_val=1, n_calib=2, n_select=0,
        unet=UNetConfig(depth=3, base=8),
        train=TrainConfig(epochs=2, steps_per_epoch=4, batch_size=8, warmup_steps=2, seed=seed, noise_res=(4, 8)),
        preprocess=PreprocessConfig(size=(32, 32)),
        scoring=ScoringConfig(erode_mm=6.0, min_volume_mm3=300.0),
    )
    return train_synthetic(Path(path), cfg, device="cpu", progress=False, model_name="tiny-test")
