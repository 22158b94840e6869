"""The demo model on real anatomy: heads generated from the MNI ICBM152 template.

``pacs-node train --anatomy`` builds it:

1. a brain-mask network (:mod:`.brainmask`) on generated heads with exact
   brain labels, half of them with random per-tissue contrast;
2. the anomaly U-Net at 128 x 128 (1.6 mm pixels), trained on normal
   generated heads only (T1w, T2w, FLAIR, PD), skull-stripped by that network;
3. the threshold, calibrated on other normal subjects (other seeds,
   contrasts, slice thicknesses, coverage);
4. the scoring method, selected on held-out normals with injected lesions
   (:mod:`.lesions`), never on the test set.

Seed ranges keep every split disjoint (:data:`SEEDS`); the held-out test set
(``1_000_000..`` abnormal, ``1_500_000..`` normal) is never used for training,
calibration or selection.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .anatomy import CONTRASTS, Subject, SubjectConfig, make_subject
from .corruption import ALL_LOCAL_KINDS
from .brainmask import BrainMaskConfig, BrainMasker, brain_slices, mask_dice, train_brain_masker
from .lesions import make_lesion_subject
from .model import UNetConfig
from .pipeline import fit, record_evaluation, save_predictor
from .preprocess import PreprocessConfig
from .scoring import ScoringConfig
from .train import TrainConfig
from .volume import Volume

__all__ = ["SEEDS", "AnatomyConfig", "anatomy_config", "anatomy_normals", "anatomy_subjects", "anatomy_cases",
           "anatomy_test_set",
           "build_brain_masker", "train_anatomy"]

log = logging.getLogger(__name__)

#: part of the subject-cache key: bump it whenever anatomy.py or lesions.py changes what a seed draws
GENERATOR_VERSION = "2"

SEEDS = {"train": 0, "val": 10_000, "calib": 20_000, "select": 30_000, "brain": 40_000, "brain_val": 45_000,
         "test": 1_000_000, "test_normal": 1_500_000}


@dataclass
class AnatomyConfig:
    """Everything that defines a real-anatomy model build."""

    n_train: int = 36
    n_val: int = 4
    n_calib: int = 12
    n_select: int = 12
    n_brain: int = 36
    n_brain_val: int = 4
    brain_steps: int = 1200
    n_report_abnormal: int = 30  # the held-out test set, evaluated once the model is final (meta["evaluation"])
    n_report_normal: int = 20
    subjects: SubjectConfig = field(default_factory=SubjectConfig)
    brain: BrainMaskConfig = field(default_factory=BrainMaskConfig)
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(depth=5, base=16))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=30, steps_per_epoch=100, batch_size=16, noise_res=(8, 16, 32), noise_std=0.15, local_prob=0.7,
        local_kinds=ALL_LOCAL_KINDS, local_radius=(0.04, 0.22), rotate_deg=6.0, scale=(0.95, 1.05), patience=6,
        min_fg_fraction=0.02))
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(
        size=(128, 128), region="brain", pixel_mm=1.6, reorient=True, mr_percentiles=(1.0, 99.0),
        clip=(-0.5, 2.0)))
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(
        erode_mm=3.0, min_volume_mm3=150.0, smooth_sigma=0.7, median_size=(1, 3, 3), target_fpr=0.0005,
        slice_offset=True))


def anatomy_config(fast: bool = False) -> AnatomyConfig:
    """Demo defaults; ``fast`` is a few-minute build for smoke tests (much weaker)."""
    cfg = AnatomyConfig()
    if fast:
        cfg.n_train, cfg.n_val, cfg.n_calib, cfg.n_select, cfg.n_brain, cfg.n_brain_val = 4, 1, 2, 2, 4, 1
        cfg.n_report_abnormal, cfg.n_report_normal = 0, 0
        cfg.brain_steps = 40
        cfg.subjects = replace(cfg.subjects, inplane_spacing=(1.2, 2.0), slice_thickness=(3.0, 6.0))
        cfg.train = replace(cfg.train, epochs=2, steps_per_epoch=10)
        cfg.unet = UNetConfig(depth=4, base=8)
        cfg.brain = replace(cfg.brain, arch=UNetConfig(in_channels=1, depth=3, base=8).to_dict())
    return cfg


def _cached(key: str, make: Any) -> Any:
    """``make()``, kept as a pickle under ``$PACS_NODE_ANATOMY_CACHE`` when that is set.

    Subjects are a pure function of seed and configuration; caching them only
    saves the generation time of repeated builds and benchmarks.
    """
    import hashlib
    import os
    import pickle

    d = os.environ.get("PACS_NODE_ANATOMY_CACHE")
    if not d:
        return make()
    path = Path(d) / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".pkl")
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return out


def _subject(seed: int, cfg: SubjectConfig | None, lesions: bool = False, **kw: Any) -> Subject:
    key = f"{GENERATOR_VERSION}|{'lesion' if lesions else 'normal'}|{seed}|{cfg or SubjectConfig()}|{sorted(kw.items())}"
    if lesions:
        return _cached(key, lambda: make_lesion_subject(seed, cfg, **kw))
    return _cached(key, lambda: make_subject(seed, cfg, **kw))


def anatomy_normals(split: str, n: int, cfg: SubjectConfig | None = None) -> list[Volume]:
    """``n`` normal generated heads of a split (see :data:`SEEDS`)."""
    base = SEEDS[split]
    return [_subject(base + i, cfg).volume for i in range(n)]


def anatomy_subjects(split: str, n_abnormal: int, n_normal: int, cfg: SubjectConfig | None = None,
                     kinds: dict[str, float] | None = None) -> list[Subject]:
    """Abnormal (with lesions, their records in ``Subject.lesions``) then normal subjects of a split."""
    base = SEEDS[split]
    out = [_subject(base + i, cfg, lesions=True, kinds=kinds) for i in range(n_abnormal)]
    normal_base = SEEDS["test_normal"] if split == "test" else base + 500_000
    out += [_subject(normal_base + i, cfg) for i in range(n_normal)]
    return out


def anatomy_cases(split: str, n_abnormal: int, n_normal: int, cfg: SubjectConfig | None = None,
                  kinds: dict[str, float] | None = None) -> list[tuple[Volume, np.ndarray | None]]:
    """Abnormal then normal ``(volume, mask)`` pairs of a split (``None``: normal)."""
    return [(s.volume, s.mask if s.lesions else None) for s in anatomy_subjects(split, n_abnormal, n_normal, cfg, kinds)]


def anatomy_test_set(n_abnormal: int = 30, n_normal: int = 20, cfg: SubjectConfig | None = None) -> list[tuple[Volume, np.ndarray | None]]:
    """The held-out real-anatomy test set (seeds never used for training, calibration or selection)."""
    return anatomy_cases("test", n_abnormal, n_normal, cfg)


def build_brain_masker(cfg: AnatomyConfig, *, device: str = "cpu", seed: int = 0) -> tuple[BrainMasker, dict[str, Any]]:
    """Train the brain-mask network on generated heads and measure it on held-out ones.

    Returns
    -------
    tuple
        The masker and a summary (``dice_mean``, ``dice_min`` on the held-out
        heads, counts, steps) for the checkpoint.
    """
    t0 = time.monotonic()
    sub = replace(cfg.subjects, inplane_spacing=(max(cfg.subjects.inplane_spacing[0], 0.9), 2.0), max_matrix=256)
    vols, brains = [], []
    for i in range(cfg.n_brain):
        # half the heads with random per-tissue contrast, half with the four sequences; every
        # fourth one already skull-stripped (as many research and challenge data sets are), so
        # the network keeps the whole brain when there is no skull around it
        # another training seed draws other heads, far from every split's seed range
        s = _subject(SEEDS["brain"] + i + seed * 100_000_000, sub, contrast="random" if i % 2 else None)
        vol = s.volume
        if i % 4 == 3:
            vol = vol.with_array(np.where(s.brain, vol.array, 0.0).astype(np.float32))
        vols.append(vol)
        brains.append(s.brain)
    x, y = brain_slices(vols, brains, cfg.brain)
    log.info("brain mask: %d slices from %d generated heads", len(x), len(vols))
    masker = train_brain_masker(x, y, cfg.brain, steps=cfg.brain_steps, seed=seed, device=device)
    dices = []
    for i in range(cfg.n_brain_val):
        s = _subject(SEEDS["brain_val"] + i, cfg.subjects, contrast=CONTRASTS[i % len(CONTRASTS)])
        vol = s.volume
        if i % 4 == 3:  # one in four skull-stripped, as in training
            vol = vol.with_array(np.where(s.brain, vol.array, 0.0).astype(np.float32))
        dices.append(mask_dice(masker.predict(vol), s.brain))
    summary = {"n_train_heads": cfg.n_brain, "steps": cfg.brain_steps, "n_val_heads": cfg.n_brain_val,
               "dice_mean": float(np.mean(dices)) if dices else None, "dice_min": float(np.min(dices)) if dices else None,
               "seconds": round(time.monotonic() - t0, 1)}
    log.info("brain mask: held-out Dice mean %.3f min %.3f", summary["dice_mean"] or 0, summary["dice_min"] or 0)
    return masker, summary


def train_anatomy(out: Path, cfg: AnatomyConfig, *, device: str = "auto", progress: bool = True,
                  resume: bool = False, model_name: str = "anatomy-demo") -> Path:
    """Build, calibrate, select and save the real-anatomy model.

    Returns
    -------
    Path
        ``out``.
    """
    t0 = time.monotonic()
    out = Path(out)
    seed = cfg.train.seed
    masker, brain_summary = build_brain_masker(cfg, device="cpu", seed=seed)
    log.info("generating %d training, %d validation, %d calibration normals and %d selection cases",
             cfg.n_train, cfg.n_val, cfg.n_calib, cfg.n_select)
    train_v = anatomy_normals("train", cfg.n_train, cfg.subjects)
    val_v = anatomy_normals("val", cfg.n_val, cfg.subjects)
    cal_v = anatomy_normals("calib", cfg.n_calib, cfg.subjects)
    sel = anatomy_cases("select", cfg.n_select, 0, cfg.subjects) if cfg.n_select else None
    pred = fit(
        train_v, val_v, cal_v, ucfg=cfg.unet, tcfg=cfg.train, pcfg=cfg.preprocess, scfg=cfg.scoring,
        model_name=model_name,
        data_description=(f"{cfg.n_train} normal heads generated from the MNI ICBM152 2009c template "
                          f"(contrasts {', '.join(cfg.subjects.contrasts)}; slice thickness "
                          f"{cfg.subjects.slice_thickness[0]}-{cfg.subjects.slice_thickness[1]} mm; seeds "
                          f"{SEEDS['train']}..{SEEDS['train'] + cfg.n_train - 1})"),
        device=device, state_path=out.with_name(out.name + ".state"), resume=resume, progress=progress,
        select_cases=sel, brain_masker=masker,
    )
    pred.meta["brain_mask_training"] = brain_summary
    pred.meta["training"]["total_build_seconds"] = round(time.monotonic() - t0, 1)
    if cfg.n_report_abnormal or cfg.n_report_normal:
        record_evaluation(pred, anatomy_test_set(cfg.n_report_abnormal, cfg.n_report_normal, cfg.subjects),
                          f"held-out test set: anatomy_test_set({cfg.n_report_abnormal}, {cfg.n_report_normal})")
    save_predictor(pred, out)
    log.info("model written to %s in %.0f s", out, time.monotonic() - t0)
    return out
