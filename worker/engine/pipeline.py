"""Train → atlas → calibrate → (select scoring) → save: the full model build."""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import CODE_VERSION
from .baselines import ZScoreAtlas
from .brainmask import BrainMasker
from .calibrate import calibrate, volumes_hash
from .checkpoint import save_checkpoint
from .domain import describe, domain_record
from .evaluate import evaluate
from .model import UNetConfig
from .orient import to_axial
from .predictor import Predictor
from .preprocess import PreprocessConfig, preprocess
from .scoring import ScoringConfig, method_variant
from .train import TrainConfig, build_slices, train
from .volume import Volume

__all__ = ["fit", "save_predictor", "select_method", "record_evaluation"]

log = logging.getLogger(__name__)


def save_predictor(predictor: Predictor, path: Path) -> str:
    """Write the predictor's weights, metadata and atlas to one checkpoint file.

    Returns
    -------
    str
        sha256 of the file (also stored in ``predictor.checksum``).
    """
    tensors = predictor.atlas.to_tensors() if predictor.atlas is not None else {}
    if predictor.brain_masker is not None:
        entry, bt = predictor.brain_masker.to_parts()
        predictor.meta["brain_mask"] = entry
        tensors.update(bt)
    predictor.meta["scoring"] = predictor.scoring.to_dict()
    sd = {k: v.detach().cpu() for k, v in predictor.model.state_dict().items()}
    sha = save_checkpoint(Path(path), sd, predictor.meta, tensors)
    predictor.checksum = sha
    return sha


def select_method(predictor: Predictor, cases: list[tuple[Volume, np.ndarray | None]],
                  normals: list[Volume] | None = None) -> dict[str, Any]:
    """Pick the calibrated U-Net scoring method with the best AUPRC + Dice on validation cases.

    The cases must be disjoint from training and test data. ``normals``
    (the calibration normals) join them as normal studies, so a method's
    false positives on normal studies lower its pooled Dice; their
    false-positive figures are recorded too.
    """
    all_cases = list(cases) + [(v, None) for v in normals or []]
    res = evaluate(predictor, all_cases, compare_methods=True)
    ranking = {m: (r["auprc"] or 0.0) + r["dice"] for m, r in res.get("methods", {}).items()}
    best = max(ranking, key=lambda m: ranking[m])
    thr = predictor.meta["method_thresholds"][best]
    predictor.scoring = replace(method_variant(predictor.scoring, best), threshold=float(thr))
    if best.startswith("combined@"):
        # plain "combined" now means the chosen weight: keep its threshold consistent
        predictor.meta["method_thresholds"]["combined"] = float(thr)
    predictor.meta["scoring"] = predictor.scoring.to_dict()
    keep = ("auroc", "auprc", "dice", "normal_fp_ml_median", "normal_fp_ml_mean", "normal_any_finding_share",
            "normal_voxel_fpr")
    sel = {"chosen": best, "criterion": "auprc+dice on held-out normals with injected lesions",
           "n_cases": len(cases), "n_normals": len(normals or []),
           "scores": {m: {k: r.get(k) for k in keep} for m, r in res["methods"].items()},
           "baseline": {k: res["baseline"].get(k) for k in (*keep, "name", "polarity")} if "baseline" in res else None}
    predictor.meta["selection"] = sel
    log.info("scoring method %s selected (%s)", best, ", ".join(f"{m}={v:.3f}" for m, v in ranking.items()))
    return sel


def record_evaluation(predictor: Predictor, cases: list[tuple[Volume, np.ndarray | None]], description: str) -> dict[str, Any]:
    """Evaluate the finished model on held-out cases and record the figures in ``meta["evaluation"]``.

    Nothing is chosen on these cases: the model, threshold and method are fixed before.
    """
    res = evaluate(predictor, cases, compare_methods=False)
    keep = ("auroc", "auprc", "dice", "dice_per_study_mean", "sensitivity", "precision", "study_auroc", "n_normal",
            "normal_fp_ml_mean", "normal_fp_ml_median", "normal_fp_ml_p95", "normal_any_finding_share",
            "normal_voxel_fpr", "n_studies", "n_abnormal")
    rec: dict[str, Any] = {"description": description, **{k: res.get(k) for k in keep}}
    if "baseline" in res:
        rec["baseline"] = {k: res["baseline"].get(k) for k in (*keep, "name", "polarity") if k in res["baseline"]}
    predictor.meta["evaluation"] = rec
    return rec


def fit(
    train_volumes: list[Volume],
    val_volumes: list[Volume],
    calib_volumes: list[Volume],
    *,
    ucfg: UNetConfig,
    tcfg: TrainConfig,
    pcfg: PreprocessConfig,
    scfg: ScoringConfig,
    model_name: str,
    data_description: str,
    device: str = "auto",
    state_path: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    select_cases: list[tuple[Volume, np.ndarray | None]] | None = None,
    brain_masker: BrainMasker | None = None,
) -> Predictor:
    """Build a calibrated model from normal volumes.

    Parameters
    ----------
    train_volumes, val_volumes, calib_volumes:
        Disjoint sets of normal volumes: training, validation (early
        stopping) and threshold calibration.
    ucfg, tcfg, pcfg, scfg:
        Architecture, training, preprocessing and scoring configuration.
    model_name:
        Name recorded in the checkpoint.
    data_description:
        Non-identifying description of the training data.
    device:
        Training/inference device (``"auto"``).
    state_path, resume:
        Per-epoch training state file and whether to resume from it.
    progress:
        Show progress bars.
    select_cases:
        Optional validation cases with anomalies used to choose between the
        ``residual`` and ``combined`` scoring methods.
    brain_masker:
        Brain-mask network, required when ``pcfg.region == "brain"``; it is
        stored in the checkpoint and masks every series the model sees.

    Returns
    -------
    Predictor
        Calibrated predictor whose ``meta`` is complete (save it with
        :func:`save_predictor`).

    Raises
    ------
    ValueError
        When a data set is empty.
    """
    if not train_volumes or not val_volumes or not calib_volumes:
        raise ValueError("training, validation and calibration sets must all be non-empty")
    if pcfg.region == "brain" and brain_masker is None:
        raise ValueError("a brain-region model needs a brain-mask network")
    if pcfg.reorient:
        train_volumes, val_volumes, calib_volumes = ([to_axial(v)[0] for v in vs]
                                                     for vs in (train_volumes, val_volumes, calib_volumes))
    ucfg = replace(ucfg, in_channels=2 * pcfg.context + 1)
    if pcfg.context and pcfg.context_mm is None:
        # The 2.5D neighbours are defined in mm: the training data's typical
        # slice spacing, so thinner series are sampled at the same distance.
        pcfg = replace(pcfg, context_mm=float(np.median([v.spacing[0] for v in train_volumes])))
    def regions(vs: list[Volume]) -> list[np.ndarray] | None:
        return [brain_masker.predict(v) for v in vs] if brain_masker is not None and pcfg.region == "brain" else None

    tr_regions = regions(train_volumes)
    tr = build_slices(train_volumes, pcfg, tcfg.min_fg_fraction, tr_regions)
    va = build_slices(val_volumes, pcfg, tcfg.min_fg_fraction, regions(val_volumes))
    log.info("training on %d slices from %d volumes (%d validation slices)", len(tr.x), len(train_volumes), len(va.x))
    result = train(tr, va, ucfg, tcfg, device=device, state_path=state_path, resume=resume, progress=progress)
    pres = [preprocess(v, pcfg, region=tr_regions[i] if tr_regions is not None else None)
            for i, v in enumerate(train_volumes)]
    atlas = ZScoreAtlas.fit([p.image for p in pres])
    domain = domain_record([describe(v, p.fg_source, p.image[p.fg]) for v, p in zip(train_volumes, pres)],
                           sources=data_description)
    meta: dict[str, Any] = {
        "model_name": model_name,
        "arch": ucfg.to_dict(),
        "preprocess": pcfg.to_dict(),
        "scoring": scfg.to_dict(),
        "code_version": CODE_VERSION,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "training": {
            "config": tcfg.to_dict(),
            "data_description": data_description,
            "data_sha256": volumes_hash(train_volumes),
            "n_train_volumes": len(train_volumes),
            "n_val_volumes": len(val_volumes),
            "n_train_slices": int(len(tr.x)),
            "epochs_run": result.epochs_run,
            "stopped": result.stopped,
            "seconds": round(result.seconds, 1),
            "history": result.history,
        },
        "validation": {"val_loss": result.best_val_loss, "val_data_sha256": volumes_hash(val_volumes)},
        "domain": {**domain, "train_ranges": {k: list(v) for k, v in domain["ranges"].items()}},
    }
    tensors = atlas.to_tensors()
    if brain_masker is not None:
        entry, bt = brain_masker.to_parts()
        meta["brain_mask"] = entry
        tensors.update(bt)
    predictor = Predictor(result.model, meta, tensors, device=device)
    calibrate(predictor, calib_volumes, description=f"held-out normals: {data_description}")
    if select_cases:
        select_method(predictor, select_cases, calib_volumes)
    return predictor
