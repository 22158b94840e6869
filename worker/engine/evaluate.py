"""Side-by-side evaluation of the U-Net and both baselines.

Every method runs through the same smoothing, foreground restriction, 3D
post-processing and calibrated-threshold decision. Voxel metrics are computed
over the head foreground of every study (plus any ground-truth voxel outside
it); the study-level AUROC uses normal and abnormal studies.

False positives on normal studies are reported as metrics of their own (the
``normal_*`` keys of :func:`evaluate`): the post-processed false-positive
volume per normal study, the share of normal studies with any finding, and
the voxel false-positive rate before post-processing that the threshold is
calibrated for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import BASELINE_KEYS
from .metrics import auroc, average_precision, binary_metrics, pr_curve, roc_curve
from .predictor import Predictor
from .scoring import component_keys, fuse, method_variant
from .volume import Volume

__all__ = ["evaluate", "EvalOutputs", "BASELINE_NAMES"]

log = logging.getLogger(__name__)

BASELINE_NAMES = ("intensity", "pixel_zscore")


@dataclass
class EvalOutputs:
    """Per-study outputs of :func:`evaluate`, filled in place when passed as ``outputs=``.

    Method keys are those of the evaluation: ``"unet"`` (the checkpoint's
    scoring method), ``"unet:<method>"`` (every calibrated U-Net method when
    ``compare_methods``) and ``"<baseline>:<polarity>"`` (every baseline
    variant, e.g. ``"pixel_zscore:both"``). Lists are indexed like the
    ``cases`` given to :func:`evaluate`.

    Attributes
    ----------
    thresholds:
        Calibrated threshold of each method key.
    regions:
        Per study, the evaluated voxels on the volume grid (head foreground
        plus any ground-truth voxel).
    truth:
        Per study, the ground truth of the evaluated voxels (``mask[region]``).
    scores:
        Per method key and study, the raw scores of the evaluated voxels
        (same order as ``truth``); the decision before post-processing is
        ``score >= threshold``.
    masks:
        Per method key and study, the post-processed binary prediction on the
        whole volume grid (what the voxel metrics count inside ``regions``).
    study_scores:
        Per method key and study, the study-level score.
    """

    thresholds: dict[str, float] = field(default_factory=dict)
    regions: list[np.ndarray] = field(default_factory=list)
    truth: list[np.ndarray] = field(default_factory=list)
    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)
    masks: dict[str, list[np.ndarray]] = field(default_factory=dict)
    study_scores: dict[str, list[float]] = field(default_factory=dict)

    def pooled(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Scores and truth of method ``key`` over all studies (the voxels behind AUROC / AUPRC).

        Raises
        ------
        KeyError
            For a method key that was not evaluated.
        """
        if key not in self.scores:
            raise KeyError(f"no outputs for method {key!r}; have {sorted(self.scores)}")
        return np.concatenate(self.scores[key]), np.concatenate(self.truth)


def _normal_fp(scores: list[np.ndarray], mask_ml: list[float], normal: list[bool],
               threshold: float) -> dict[str, Any]:
    """False-positive metrics over the normal studies (``None`` values when there are none)."""
    ml = np.asarray([v for v, n in zip(mask_ml, normal) if n], np.float64)
    out: dict[str, Any] = {"n_normal": int(ml.size)}
    if not ml.size:
        out.update(dict.fromkeys(("normal_fp_ml_mean", "normal_fp_ml_median", "normal_fp_ml_p95",
                                  "normal_any_finding_share", "normal_voxel_fpr")))
        return out
    out["normal_fp_ml_mean"] = float(ml.mean())
    out["normal_fp_ml_median"] = float(np.median(ml))
    out["normal_fp_ml_p95"] = float(np.percentile(ml, 95))
    out["normal_any_finding_share"] = float(np.mean(ml > 0))
    n_vox = sum(s.size for s, n in zip(scores, normal) if n)
    n_pos = sum(int(np.count_nonzero(s >= threshold)) for s, n in zip(scores, normal) if n)
    out["normal_voxel_fpr"] = float(n_pos / n_vox) if n_vox else None
    return out


def _summary(scores: list[np.ndarray], truth: list[np.ndarray], preds: list[np.ndarray],
             study: list[float], study_truth: list[bool], threshold: float,
             mask_ml: list[float]) -> dict[str, Any]:
    """Metrics of one method key from its per-study outputs.

    Parameters
    ----------
    scores, truth, preds:
        Per study, the raw scores, ground truth and post-processed decision of
        the evaluated voxels (same order).
    study:
        Per study, the study-level score.
    study_truth:
        Per study, whether it is abnormal (any ground-truth voxel).
    threshold:
        The method's calibrated threshold on the raw score.
    mask_ml:
        Per study, the volume in mL of the post-processed mask on the whole
        volume grid (what the node would report).

    Returns
    -------
    dict
        See :func:`evaluate`.

    Raises
    ------
    ValueError
        When the per-study lists differ in length.
    """
    n = len(study_truth)
    if not len(scores) == len(truth) == len(preds) == len(study) == len(mask_ml) == n:
        raise ValueError("per-study lists differ in length")
    s, t, p = np.concatenate(scores), np.concatenate(truth), np.concatenate(preds)
    out: dict[str, Any] = {"threshold": float(threshold)}
    if t.any() and not t.all():
        out["auroc"] = auroc(s, t)
        out["auprc"] = average_precision(s, t)
    else:
        out["auroc"] = out["auprc"] = None
    bm = binary_metrics(p, t)
    out.update({k: bm[k] for k in ("dice", "f1", "sensitivity", "specificity", "precision")})
    dices = [binary_metrics(pi, ti)["dice"] for pi, ti, a in zip(preds, truth, study_truth) if a]
    out["dice_per_study_mean"] = float(np.mean(dices)) if dices else None
    out["study_auroc"] = auroc(np.asarray(study), np.asarray(study_truth)) if 0 < sum(study_truth) < n else None
    out.update(_normal_fp(scores, mask_ml, [not a for a in study_truth], threshold))
    return out


def evaluate(
    predictor: Predictor,
    cases: list[tuple[Volume, np.ndarray | None]],
    *,
    plots_dir: Path | None = None,
    compare_methods: bool = True,
    outputs: EvalOutputs | None = None,
) -> dict[str, Any]:
    """Evaluate on studies with ground-truth masks.

    Parameters
    ----------
    predictor:
        Calibrated model.
    cases:
        ``(volume, mask)`` pairs; ``mask`` is boolean on the volume grid, or
        ``None`` / all-false for a normal study.
    plots_dir:
        When given, ROC and PR curves and overlay PNGs are written there.
    compare_methods:
        Also report every calibrated U-Net scoring method under ``methods``.
    outputs:
        When given, cleared and filled with every method's per-study scores,
        truth and post-processed masks (see :class:`EvalOutputs`); the
        returned dictionary is the same with or without it.

    Returns
    -------
    dict
        Metrics of the checkpoint's method at top level, plus ``method``,
        ``n_studies`` and ``n_abnormal``; the same metrics for every U-Net
        method under ``methods`` (when ``compare_methods``), for
        ``intensity`` and ``pixel_zscore`` (best polarity of each, with
        ``polarity``) under ``baselines``, for the stronger baseline (by
        AUPRC, with ``name``) under ``baseline``, and ``beats_baseline``
        (``auprc`` and ``dice`` comparisons). The metrics of a method:

        - ``threshold``: its calibrated threshold on the raw score;
        - ``auroc``, ``auprc``: voxel ROC / precision-recall areas over the
          evaluated voxels of all studies (``None`` without both classes);
        - ``dice`` (= ``f1``), ``sensitivity``, ``specificity``,
          ``precision``: of the post-processed masks, voxels of all studies
          pooled;
        - ``dice_per_study_mean``: mean over the abnormal studies of each
          study's Dice (``None`` without abnormal studies);
        - ``study_auroc``: AUROC of the study scores, abnormal vs normal
          studies (``None`` without both);
        - ``n_normal``: number of normal studies;
        - ``normal_fp_ml_mean``, ``normal_fp_ml_median``,
          ``normal_fp_ml_p95``: mean, median and 95th percentile (linear
          interpolation) of the false-positive volume per normal study, in
          mL: voxels of the post-processed mask on the whole grid (what the
          node would report) times the voxel volume;
        - ``normal_any_finding_share``: share of normal studies whose
          post-processed mask has any voxel;
        - ``normal_voxel_fpr``: share of the evaluated voxels of the normal
          studies with ``score >= threshold``, before post-processing (the
          rate the threshold is calibrated for).

        The ``normal_*`` values are ``None`` when there is no normal study.

    Raises
    ------
    ValueError
        When the model is not calibrated, or a mask's shape differs from its volume.
    """
    if predictor.scoring.threshold is None:
        raise ValueError("model is not calibrated")
    bthr: dict[str, float] = predictor.meta.get("baselines", {}).get("thresholds", {})
    mthr: dict[str, float] = predictor.meta.get("method_thresholds", {}) if compare_methods else {}
    methods: dict[str, tuple[Any, float]] = {"unet": (predictor.scoring, float(predictor.scoring.threshold))}
    for m, thr in mthr.items():
        methods[f"unet:{m}"] = (method_variant(predictor.scoring, m), float(thr))
    for k, thr in bthr.items():
        name, _, pol = k.partition(":")
        methods[k] = (replace(predictor.scoring, method=name, polarity=pol), float(thr))
    keys: list[str] = list(dict.fromkeys(k for cfg, _ in methods.values() for k in component_keys(cfg)))
    acc: dict[str, dict[str, list[Any]]] = {m: {"s": [], "t": [], "p": [], "study": [], "ml": []} for m in methods}
    if outputs is not None:
        outputs.thresholds = {m: thr for m, (_, thr) in methods.items()}
        outputs.regions, outputs.truth = [], []
        outputs.scores = {m: acc[m]["s"] for m in methods}
        outputs.masks = {m: [] for m in methods}
        outputs.study_scores = {m: acc[m]["study"] for m in methods}
    study_truth: list[bool] = []
    overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for vol, gt in cases:
        gt = np.zeros(vol.shape, bool) if gt is None else np.asarray(gt, bool)
        if gt.shape != vol.shape:
            raise ValueError(f"mask shape {gt.shape} differs from volume shape {vol.shape}")
        comp = predictor.components(vol, keys)
        region = comp.pre.fg_source | gt
        study_truth.append(bool(gt.any()))
        if outputs is not None:
            outputs.regions.append(region)
            outputs.truth.append(gt[region])
        for m, (cfg, thr) in methods.items():
            score = fuse(comp.maps, cfg)
            mask, amap, _, sscore = predictor.finalize(vol, score, thr)
            a = acc[m]
            a["s"].append(score[region])
            a["t"].append(gt[region])
            a["p"].append(mask[region])
            a["study"].append(sscore)
            a["ml"].append(float(np.count_nonzero(mask)) * vol.voxel_volume_mm3 / 1000.0)
            if outputs is not None:
                outputs.masks[m].append(mask)
            if m == "unet" and plots_dir is not None and gt.any() and len(overlays) < 4:
                overlays.append((comp.pre.fg_source * vol.array, gt, mask, amap))
    results = {m: _summary(a["s"], a["t"], a["p"], a["study"], study_truth, methods[m][1], a["ml"])
               for m, a in acc.items()}
    out: dict[str, Any] = dict(results["unet"])
    out["method"] = predictor.scoring.method
    out["n_studies"] = len(cases)
    out["n_abnormal"] = int(sum(study_truth))
    if mthr:
        out["methods"] = {m.split(":", 1)[1]: results[m] for m in methods if m.startswith("unet:")}

    def rank(r: dict[str, Any]) -> tuple[float, float]:
        return (r["auprc"] or 0.0, r["dice"])

    baselines: dict[str, Any] = {}
    for name in BASELINE_NAMES:
        variants = {k.split(":")[1]: results[k] for k in methods if k.startswith(name + ":")}
        if variants:
            pol = max(variants, key=lambda p: rank(variants[p]))
            baselines[name] = {**variants[pol], "polarity": pol}
    out["baselines"] = baselines
    if baselines:
        best = max(baselines, key=lambda n: rank(baselines[n]))
        out["baseline"] = {**baselines[best], "name": best}
        out["beats_baseline"] = {
            "auprc": (out["auprc"] or 0.0) > (out["baseline"]["auprc"] or 0.0),
            "dice": out["dice"] > out["baseline"]["dice"],
        }
    if plots_dir is not None:
        _plots(Path(plots_dir), acc, methods, baselines, overlays)
    return out


def _plots(d: Path, acc: dict[str, dict[str, list[Any]]], methods: dict[str, Any], baselines: dict[str, Any],
           overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d.mkdir(parents=True, exist_ok=True)
    curves = {"U-Net": "unet"}
    for name, r in baselines.items():
        curves[f"{name} ({r['polarity']})"] = f"{name}:{r['polarity']}"
    fig_r, ax_r = plt.subplots(figsize=(5, 5))
    fig_p, ax_p = plt.subplots(figsize=(5, 5))
    for label, key in curves.items():
        s, t = np.concatenate(acc[key]["s"]), np.concatenate(acc[key]["t"])
        if not t.any() or t.all():
            continue
        fpr, tpr, _ = roc_curve(s, t)
        prec, rec, _ = pr_curve(s, t)
        step = max(1, len(fpr) // 5000)
        ax_r.plot(fpr[::step], tpr[::step], label=f"{label} AUROC={auroc(s, t):.3f}")
        step = max(1, len(rec) // 5000)
        ax_p.plot(rec[::step], prec[::step], label=f"{label} AP={average_precision(s, t):.3f}")
    ax_r.set(xlabel="false-positive rate", ylabel="sensitivity", title="Voxel ROC")
    ax_p.set(xlabel="recall", ylabel="precision", title="Voxel precision-recall")
    for ax in (ax_r, ax_p):
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig_r.savefig(d / "roc.png", dpi=100, bbox_inches="tight")
    fig_p.savefig(d / "pr.png", dpi=100, bbox_inches="tight")
    plt.close(fig_r)
    plt.close(fig_p)
    for i, (img, gt, mask, amap) in enumerate(overlays):
        z = int(np.argmax(gt.sum(axis=(1, 2))))
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        axes[0].imshow(img[z], cmap="gray")
        axes[0].contour(gt[z], levels=[0.5], colors="lime", linewidths=1)
        axes[0].contour(mask[z], levels=[0.5], colors="red", linewidths=1)
        axes[0].set_title(f"slice {z}: truth (green), prediction (red)")
        axes[1].imshow(amap[z], cmap="magma", vmin=0, vmax=1)
        axes[1].set_title("anomaly map (0.5 = threshold)")
        axes[2].imshow(img[z], cmap="gray")
        axes[2].imshow(np.ma.masked_where(amap[z] < 0.5, amap[z]), cmap="autumn", alpha=0.6, vmin=0.5, vmax=1)
        axes[2].set_title("overlay")
        for ax in axes:
            ax.axis("off")
        fig.savefig(d / f"overlay_{i}.png", dpi=80, bbox_inches="tight")
        plt.close(fig)
