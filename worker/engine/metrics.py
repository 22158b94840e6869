"""Voxel- and study-level metrics implemented with numpy (no scikit-learn).

Every function is exact under ties and safe on extreme class imbalance
(int64 counts, float64 accumulation); the test-suite compares them with
scikit-learn.
"""

from __future__ import annotations

import numpy as np

__all__ = ["confusion", "binary_metrics", "roc_curve", "pr_curve", "auroc", "average_precision"]


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """Return ``(tp, fp, fn, tn)`` for boolean arrays of equal shape.

    Raises
    ------
    ValueError
        When the shapes differ.
    """
    p, t = np.asarray(pred, bool).ravel(), np.asarray(truth, bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {t.shape}")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return tp, fp, fn, int(p.size - tp - fp - fn)


def binary_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity, precision, F1 and Dice at a fixed decision.

    Undefined ratios (zero denominator) are 0, except Dice/F1 of two empty
    masks, which is 1.
    """
    tp, fp, fn, tn = confusion(pred, truth)

    def div(a: float, b: float, empty: float = 0.0) -> float:
        return float(a / b) if b else empty

    sens = div(tp, tp + fn)
    prec = div(tp, tp + fp)
    dice = div(2 * tp, 2 * tp + fp + fn, 1.0)
    return {
        "sensitivity": sens,
        "specificity": div(tn, tn + fp),
        "precision": prec,
        "f1": dice,
        "dice": dice,
        "tp": float(tp), "fp": float(fp), "fn": float(fn), "tn": float(tn),
    }


def _distinct_counts(score: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(score, np.float64).ravel()
    t = np.asarray(truth, bool).ravel()
    if s.shape != t.shape:
        raise ValueError(f"shape mismatch {s.shape} vs {t.shape}")
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tps = np.cumsum(t, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps, fps, s[last]


def roc_curve(score: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` starting at (0, 0).

    Raises
    ------
    ValueError
        When only one class is present.
    """
    tps, fps, thr = _distinct_counts(score, truth)
    p, n = tps[-1], fps[-1]
    if p == 0 or n == 0:
        raise ValueError("ROC needs both positive and negative samples")
    return np.r_[0.0, fps / n], np.r_[0.0, tps / p], np.r_[np.inf, thr]


def auroc(score: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal over distinct thresholds; ties count half).

    Raises
    ------
    ValueError
        When only one class is present.
    """
    fpr, tpr, _ = roc_curve(score, truth)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def pr_curve(score: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision–recall points ``(precision, recall, thresholds)`` by decreasing threshold.

    Raises
    ------
    ValueError
        When there is no positive sample.
    """
    tps, fps, thr = _distinct_counts(score, truth)
    if tps[-1] == 0:
        raise ValueError("precision-recall needs at least one positive sample")
    return tps / (tps + fps), tps / tps[-1], thr


def average_precision(score: np.ndarray, truth: np.ndarray) -> float:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` (the step-wise AUPRC).

    Raises
    ------
    ValueError
        When there is no positive sample.
    """
    prec, rec, _ = pr_curve(score, truth)
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))
