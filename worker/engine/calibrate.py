"""Threshold calibration on held-out normal studies.

For the checkpoint's scoring method and for every baseline variant, the
threshold is the ``1 - target_fpr`` quantile of the voxel scores inside the
scoring region of normal studies (e.g. the 99.5th percentile for 0.5 %).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from typing import Any

import numpy as np

from .predictor import Predictor
from .scoring import ScoringConfig, calibrate_threshold, component_keys, fuse, method_variant
from .volume import Volume

__all__ = ["BASELINE_KEYS", "calibrate", "volumes_hash", "collect_normal_scores"]

log = logging.getLogger(__name__)

BASELINE_KEYS = (
    "intensity:bright", "intensity:dark", "intensity:both",
    "pixel_zscore:bright", "pixel_zscore:dark", "pixel_zscore:both",
)
ALL_UNET_KEYS = ("residual", "ssim")
#: weights of the combined method's second term that are calibrated too, so the
#: selection can choose between them (``method_thresholds["combined@W"]``)
COMBINE_WEIGHTS = (0.25, 1.0, 2.0)


def volumes_hash(volumes: list[Volume]) -> str:
    """sha256 over voxel data and geometry (identifies a data set, reveals nothing)."""
    h = hashlib.sha256()
    for v in volumes:
        h.update(np.ascontiguousarray(v.array).tobytes())
        h.update(np.asarray(v.spacing + v.origin, np.float64).tobytes())
    return h.hexdigest()


def collect_normal_scores(predictor: Predictor, volumes: list[Volume], keys: list[str],
                          measures: list[dict[str, float]] | None = None) -> dict[str, np.ndarray]:
    """Concatenated in-region scores per component over normal volumes.

    When ``measures`` is given, each volume's training-domain measures
    (:func:`~worker.engine.domain.describe`) are appended to it.
    """
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for vol in volumes:
        comp = predictor.components(vol, keys)
        for k in keys:
            out[k].append(comp.maps[k][comp.region])
        if measures is not None and comp.measures:
            measures.append(comp.measures)
    return {k: np.concatenate(v) for k, v in out.items()}


def calibrate(
    predictor: Predictor,
    normals: list[Volume],
    *,
    method: str | None = None,
    target_fpr: float | None = None,
    polarity: str | None = None,
    combine_with: str | None = None,
    combine_weight: float | None = None,
    description: str = "",
) -> dict[str, Any]:
    """Calibrate thresholds in place on ``predictor`` and return the metadata update.

    Parameters
    ----------
    predictor:
        Loaded model; its ``scoring`` and ``meta`` are updated.
    normals:
        Held-out normal volumes (never used for training).
    method, target_fpr, polarity, combine_with, combine_weight:
        Override the scoring settings before calibrating.
    description:
        Free-text description of the calibration data (no patient data).

    Returns
    -------
    dict
        ``{"scoring": ..., "baselines": ...}`` as stored in the checkpoint.

    Raises
    ------
    ValueError
        When no normal volume is given or settings are invalid.
    """
    if not normals:
        raise ValueError("calibration needs at least one normal volume")
    scfg = predictor.scoring
    upd: dict[str, Any] = {}
    if method is not None:
        upd["method"] = method
    if target_fpr is not None:
        upd["target_fpr"] = float(target_fpr)
    if polarity is not None:
        upd["polarity"] = polarity
    if combine_with is not None:
        upd["combine_with"] = combine_with
    if combine_weight is not None:
        upd["combine_weight"] = float(combine_weight)
    scfg = ScoringConfig.from_dict({**scfg.to_dict(), **upd})
    predictor.scoring = scfg
    keys = list(dict.fromkeys(["residual", *component_keys(replace(scfg, method="combined")), *component_keys(scfg),
                               *[k for k in BASELINE_KEYS if predictor.atlas is not None or not k.startswith("pixel")]]))
    measured: list[dict[str, float]] = []
    scores = collect_normal_scores(predictor, normals, keys, measured)
    scfg.scales = {k: float(np.quantile(v, 0.99)) for k, v in scores.items()}
    final = fuse(scores, scfg)
    scfg.threshold = calibrate_threshold(final, scfg.target_fpr)
    scfg.calibration = {
        "method": "quantile",
        "quantile": 1.0 - scfg.target_fpr,
        "target_fpr": scfg.target_fpr,
        "n_volumes": len(normals),
        "n_voxels": int(final.size),
        "data_sha256": volumes_hash(normals),
        "description": description,
    }
    baselines = {k: calibrate_threshold(scores[k], scfg.target_fpr) for k in BASELINE_KEYS if k in scores}
    unet_thresholds = {}
    for m in ("residual", "combined", *(f"combined@{w:g}" for w in COMBINE_WEIGHTS)):
        alt = method_variant(scfg, m)
        unet_thresholds[m] = calibrate_threshold(fuse(scores, alt), scfg.target_fpr)
    if measured and predictor.meta.get("domain"):
        # the threshold holds for the calibration series too: the domain spans both sets
        # (the training ranges joined with this calibration set's: recalibrating starts again from
        # the training ranges, so an earlier calibration set never widens the domain for good)
        dom = predictor.meta["domain"]
        base = dom.get("train_ranges", dom["ranges"])
        dom["train_ranges"] = {k: list(v) for k, v in base.items()}
        for k, (lo, hi) in base.items():
            vals = [m[k] for m in measured if k in m]
            dom["ranges"][k] = [float(min(lo, min(vals))), float(max(hi, max(vals)))] if vals else [lo, hi]
        dom["n_calibration_series"] = len(measured)
    predictor.meta["scoring"] = scfg.to_dict()
    predictor.meta["baselines"] = {"thresholds": baselines, "target_fpr": scfg.target_fpr}
    predictor.meta["method_thresholds"] = unet_thresholds
    log.info("calibrated %s threshold %.5f on %d normal volumes", scfg.method, scfg.threshold, len(normals))
    return {"scoring": predictor.meta["scoring"], "baselines": predictor.meta["baselines"]}
