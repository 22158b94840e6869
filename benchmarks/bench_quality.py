"""Detection quality: U-Net versus both baselines on the held-out synthetic test set (issue 7 item 4).

Overall voxel metrics (AUROC, AUPRC, Dice, sensitivity, specificity, precision
at each method's calibrated threshold, study AUROC) are those of
``worker.engine.evaluate.evaluate`` on ``demo.synthetic_test_set``, i.e. of
``pacs-node evaluate --synthetic --json``; ROC and PR curves use evaluate's own
per-voxel scores (``EvalOutputs``), operating points marked. Each injected
anomaly is then scored on its exact ground truth (``SyntheticCase.anomaly_masks``):
recall and a local Dice (final mask vs the anomaly in its bounding box grown by
``--margin`` voxels, other anomalies left out), against kind, size and contrast;
false-positive components of the final masks are counted per study.

    python benchmarks/bench_quality.py [--model PATH] [--n-abnormal 24] [--n-normal 6] [--publish]

Writes ``out/quality.json``, ``out/quality/bench-quality-*.png`` and
``out/quality-section.md`` (the "Detection quality" section for
``docs/benchmarks.md``); ``--publish`` copies them to ``results/`` and ``docs/img/``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from worker.engine.evaluate import EvalOutputs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, write_json  # noqa: E402
from machine import machine_info  # noqa: E402
from paths import IMG_DIR, OUT_DIR, REPO, RESULTS_DIR  # noqa: E402

logger = logging.getLogger(__name__)

TARGETS = {"auprc": 0.90, "dice": 0.75, "dice_margin": 0.15}  # issue 7
FIRST_BAR = {"auprc": 0.80, "dice": 0.60}  # issue 3
KINDS = ("bright", "dark", "texture", "patch", "deform")
CONTRAST_UNITS = {
    "bright": "added intensity (WM ≈ 0.76)",
    "dark": "removed intensity (WM ≈ 0.76)",
    "texture": "texture amplitude",
    "patch": "blend weight α of the donor",
    "deform": "push magnitude (fraction of radius)",
}
COLORS = ("#1f5fa8", "#d9822b", "#6b9e5a")
DETECTED_RECALL = 0.1
METRICS = ("auroc", "auprc", "dice", "sensitivity", "specificity", "precision", "study_auroc")


def method_labels(res: dict[str, Any]) -> dict[str, str]:
    """Display label -> evaluate's method key: the U-Net, then each baseline at its best polarity.

    Parameters
    ----------
    res:
        The result of ``evaluate``.

    Returns
    -------
    dict
        Ordered mapping, U-Net first.

    Raises
    ------
    KeyError
        When ``res`` has no baselines (an uncalibrated baseline atlas).
    """
    if not res.get("baselines"):
        raise KeyError("evaluate() reported no baselines: the checkpoint has no calibrated baseline thresholds")
    out = {f"U-Net ({res['method']})": "unet"}
    for name, b in res["baselines"].items():
        pretty = {"intensity": "intensity outlier", "pixel_zscore": "pixel z-score"}.get(name, name)
        out[f"{pretty} ({b['polarity']})"] = f"{name}:{b['polarity']}"
    return out


def overall_table(res: dict[str, Any], labels: dict[str, str]) -> dict[str, dict[str, Any]]:
    """evaluate()'s figures per method label (threshold included)."""
    rows: dict[str, dict[str, Any]] = {}
    for label, key in labels.items():
        src = res if key == "unet" else res["baselines"][key.split(":")[0]]
        rows[label] = {k: src[k] for k in (*METRICS, "threshold")}
    return rows


def operating_points(outs: EvalOutputs, res: dict[str, Any], labels: dict[str, str]) -> dict[str, dict[str, float]]:
    """Where each method works: ``score >= threshold`` on the raw score (a point of its curves) and the
    final post-processed mask (evaluate's sensitivity / specificity / precision)."""
    from worker.engine.metrics import binary_metrics

    table = overall_table(res, labels)
    out = {}
    for label, key in labels.items():
        s, t = outs.pooled(key)
        raw = binary_metrics(s >= outs.thresholds[key], t)
        fin = table[label]
        out[label] = {"raw_recall": raw["sensitivity"], "raw_fpr": 1.0 - raw["specificity"],
                      "raw_precision": raw["precision"], "final_recall": fin["sensitivity"],
                      "final_fpr": 1.0 - fin["specificity"], "final_precision": fin["precision"]}
    return out


def per_anomaly(seeds: list[int], test_masks: list[np.ndarray], outs: EvalOutputs, labels: dict[str, str],
                margin: int) -> list[dict[str, Any]]:
    """One row per injected anomaly: kind, size, contrast and, per method, recall and local Dice.

    Parameters
    ----------
    seeds, test_masks:
        Seeds of the abnormal test studies in ``evaluate``'s case order, and the masks ``evaluate`` saw
        for them (checked against the regenerated cases).
    outs, labels:
        ``EvalOutputs`` of the same evaluation; display label -> method key.
    margin:
        Voxels added on every side of an anomaly's bounding box for the local Dice.

    Returns
    -------
    list of dict
        Rows in case order.

    Raises
    ------
    RuntimeError
        When a regenerated case's mask differs from the evaluated one (the test set changed underneath).
    """
    from worker.engine.metrics import binary_metrics
    from worker.engine.synthetic import make_case

    rows: list[dict[str, Any]] = []
    for i, (seed, gt) in enumerate(zip(seeds, test_masks)):
        case = make_case(seed)
        if not np.array_equal(case.mask, gt):
            raise RuntimeError(f"make_case({seed}) no longer matches the evaluated test study {i}")
        amasks = case.anomaly_masks()
        vox_mm3 = case.volume.voxel_volume_mm3
        for j, (a, am) in enumerate(zip(case.anomalies, amasks)):
            if not am.any():
                logger.info("case %d anomaly %d (%s) has no voxels; skipped", i, j, a.kind)
                continue
            others = np.zeros_like(am)
            for k, om in enumerate(amasks):
                if k != j:
                    others |= om
            idx = np.argwhere(am)
            lo, hi = np.maximum(idx.min(0) - margin, 0), np.minimum(idx.max(0) + margin + 1, am.shape)
            box = tuple(slice(int(b0), int(b1)) for b0, b1 in zip(lo, hi))
            keep = ~(others[box] & ~am[box])
            truth = am[box][keep]
            row: dict[str, Any] = {
                "case": i, "seed": seed, "index": j, "kind": a.kind, "center_zyx": list(a.center_zyx),
                "voxels": int(am.sum()), "volume_mm3": round(float(am.sum() * vox_mm3), 1),
                "contrast": round(float(a.contrast), 4), "intensity_detectable": bool(a.intensity_detectable),
                "overlaps_other": bool((others & am).any()),
            }
            for label, key in labels.items():
                bm = binary_metrics(outs.masks[key][i][box][keep], truth)
                row[label] = {"recall": round(bm["sensitivity"], 4), "dice": round(bm["dice"], 4)}
            rows.append(row)
    return rows


def false_positive_components(cases: list[tuple[Any, np.ndarray | None]], outs: EvalOutputs,
                              labels: dict[str, str]) -> dict[str, dict[str, float]]:
    """Connected components (26-connected) of each final mask that touch no ground-truth voxel."""
    from scipy import ndimage as ndi

    out: dict[str, dict[str, float]] = {}
    for label, key in labels.items():
        n_ab: list[int] = []
        n_no: list[int] = []
        mm3 = 0.0
        for (vol, gt), mask in zip(cases, outs.masks[key]):
            lab, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
            hit = set(np.unique(lab[gt]).tolist()) if gt is not None else set()
            fp = [c for c in range(1, n + 1) if c not in hit]
            mm3 += float(np.isin(lab, fp).sum() * vol.voxel_volume_mm3) if fp else 0.0
            (n_ab if gt is not None and gt.any() else n_no).append(len(fp))
        out[label] = {"per_abnormal_study": round(float(np.mean(n_ab)), 3) if n_ab else float("nan"),
                      "per_normal_study": round(float(np.mean(n_no)), 3) if n_no else float("nan"),
                      "normal_studies_with_fp": round(float(np.mean([n > 0 for n in n_no])), 3) if n_no else float("nan"),
                      "fp_volume_mm3_per_study": round(mm3 / max(len(n_ab) + len(n_no), 1), 1)}
    return out


def _agg(sel: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Count, voxels and per method: voxel-weighted recall, mean recall, mean local Dice, share detected."""
    vox = sum(r["voxels"] for r in sel)
    out: dict[str, Any] = {"n": len(sel), "voxels": vox}
    for m in names:
        out[m] = {
            "voxel_recall": round(sum(r[m]["recall"] * r["voxels"] for r in sel) / vox, 3) if vox else None,
            "mean_recall": round(float(np.mean([r[m]["recall"] for r in sel])), 3) if sel else None,
            "mean_dice": round(float(np.mean([r[m]["dice"] for r in sel])), 3) if sel else None,
            "detected": round(float(np.mean([r[m]["recall"] >= DETECTED_RECALL for r in sel])), 3) if sel else None,
        }
    return out


def _quantile_bins(values: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Index arrays of ``n_bins`` equal-count bins of ``values`` (ascending)."""
    order = np.argsort(values, kind="mergesort")
    return [b for b in np.array_split(order, max(1, min(n_bins, len(values)))) if len(b)]


def summarise(rows: list[dict[str, Any]], names: list[str], size_bins: int) -> dict[str, Any]:
    """Per kind, per size bin (equal-count, by mm³), per contrast bin within each kind, and by
    intensity-detectability: voxel recall, mean recall, mean local Dice, share detected."""
    out: dict[str, Any] = {"detected_means_recall_at_least": DETECTED_RECALL, "all": _agg(rows, names)}
    out["by_kind"] = {k: _agg([r for r in rows if r["kind"] == k], names) for k in KINDS}
    sizes = np.array([r["volume_mm3"] for r in rows])
    out["by_size"] = {}
    for b in _quantile_bins(sizes, size_bins):
        sel = [rows[i] for i in b]
        lo, hi = float(sizes[b].min()), float(sizes[b].max())
        kinds = {k: sum(r["kind"] == k for r in sel) for k in KINDS if any(r["kind"] == k for r in sel)}
        out["by_size"][f"{lo:.0f}-{hi:.0f} mm3"] = {"lo_mm3": lo, "hi_mm3": hi, "kinds": kinds, **_agg(sel, names)}
    out["by_contrast"] = {}
    for k in KINDS:
        sel = [r for r in rows if r["kind"] == k]
        if not sel:
            continue
        c = np.abs([r["contrast"] for r in sel])
        bins = _quantile_bins(c, 3 if len(sel) >= 9 else 2 if len(sel) >= 4 else 1)
        out["by_contrast"][k] = {f"|c| {c[b].min():.3f}-{c[b].max():.3f}": {
            "lo": float(c[b].min()), "hi": float(c[b].max()), **_agg([sel[i] for i in b], names)} for b in bins}
    out["intensity_detectable"] = {str(v): _agg([r for r in rows if r["intensity_detectable"] == v], names)
                                   for v in (True, False)}
    return out


def assess_targets(res: dict[str, Any], overall: dict[str, dict[str, Any]], unet: str) -> dict[str, Any]:
    """Issue 7 and issue 3 bars. "Stronger baseline" is taken per metric (the best baseline value),
    which is never easier than evaluate()'s single stronger baseline (ranked by AUPRC)."""
    base = [v for k, v in overall.items() if k != unet]
    best_auprc = max((b["auprc"] or 0.0) for b in base)
    best_dice = max(b["dice"] for b in base)
    u = overall[unet]
    margin = u["dice"] - best_dice
    checks = [
        ("issue 7", "AUPRC ≥ 0.90", f"{u['auprc']:.3f}", (u["auprc"] or 0.0) >= TARGETS["auprc"]),
        ("issue 7", "Dice ≥ 0.75", f"{u['dice']:.3f}", u["dice"] >= TARGETS["dice"]),
        ("issue 7", "≥ 0.15 Dice ahead of the stronger baseline", f"{margin:+.3f} ({u['dice']:.3f} vs {best_dice:.3f})",
         margin >= TARGETS["dice_margin"]),
        ("issue 3", "AUPRC ≥ 0.80", f"{u['auprc']:.3f}", (u["auprc"] or 0.0) >= FIRST_BAR["auprc"]),
        ("issue 3", "Dice ≥ 0.60", f"{u['dice']:.3f}", u["dice"] >= FIRST_BAR["dice"]),
        ("issue 3", "beats the stronger baseline on AUPRC and Dice",
         f"AUPRC {u['auprc']:.3f} vs {best_auprc:.3f}, Dice {u['dice']:.3f} vs {best_dice:.3f}",
         (u["auprc"] or 0.0) > best_auprc and u["dice"] > best_dice),
    ]
    return {"checks": [{"issue": i, "target": t, "measured": m, "met": bool(ok)} for i, t, m, ok in checks],
            "stronger_baseline_by_auprc": res["baseline"]["name"], "best_baseline_dice": best_dice,
            "best_baseline_auprc": best_auprc, "dice_margin": margin,
            "evaluate_beats_baseline": res.get("beats_baseline")}


# ---------------------------------------------------------------- plots
def _thin(n: int, keep: int = 8000) -> np.ndarray:
    """About ``keep`` evenly spaced indices of ``n`` curve points, first and last included."""
    return np.unique(np.r_[np.arange(0, n, max(1, n // keep)), n - 1])


def plot_curves(outs: EvalOutputs, labels: dict[str, str], ops: dict[str, dict[str, float]], d: Path) -> list[Path]:
    """ROC (log false-positive rate) and PR curves of all methods, operating points marked."""
    from worker.engine.metrics import auroc, average_precision, pr_curve, roc_curve

    fig_r, ax_r = plt.subplots(figsize=(6, 5))
    fig_p, ax_p = plt.subplots(figsize=(6, 5))
    for (label, key), color in zip(labels.items(), COLORS):
        s, t = outs.pooled(key)
        fpr, tpr, _ = roc_curve(s, t)
        prec, rec, _ = pr_curve(s, t)
        ir, ip = _thin(len(fpr)), _thin(len(rec))
        ax_r.plot(np.maximum(fpr[ir], 1e-6), tpr[ir], color=color, label=f"{label}  AUROC {auroc(s, t):.3f}")
        ax_p.plot(rec[ip], prec[ip], color=color, label=f"{label}  AP {average_precision(s, t):.3f}")
        op = ops[label]
        ax_r.plot(max(op["raw_fpr"], 1e-6), op["raw_recall"], "o", mfc="none", color=color, ms=8)
        ax_r.plot(max(op["final_fpr"], 1e-6), op["final_recall"], "*", color=color, ms=11)
        ax_p.plot(op["raw_recall"], op["raw_precision"], "o", mfc="none", color=color, ms=8)
        ax_p.plot(op["final_recall"], op["final_precision"], "*", color=color, ms=11)
    for ax in (ax_r, ax_p):
        ax.plot([], [], "o", mfc="none", color="gray", label="calibrated threshold, raw score")
        ax.plot([], [], "*", color="gray", ms=10, label="final mask (post-processed)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=7)
    ax_r.set(xscale="log", xlim=(1e-5, 1), ylim=(0, 1.01), xlabel="false-positive rate (voxels, log)",
             ylabel="sensitivity", title="Voxel ROC, held-out synthetic test set")
    ax_p.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
             title="Voxel precision-recall, held-out synthetic test set")
    files = [d / "bench-quality-roc.png", d / "bench-quality-pr.png"]
    for fig, f in zip((fig_r, fig_p), files):
        fig.savefig(f, dpi=100, bbox_inches="tight")
        plt.close(fig)
    return files


def plot_size(rows: list[dict[str, Any]], names: list[str], summary: dict[str, Any], d: Path) -> Path:
    """Local Dice and recall vs anomaly volume: equal-count bins (mean, bin extent) over the anomalies."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    x = np.array([r["volume_mm3"] for r in rows])
    bins = list(summary["by_size"].values())
    lo, hi = np.array([b["lo_mm3"] for b in bins]), np.array([b["hi_mm3"] for b in bins])
    for j, (m, color) in enumerate(zip(names, COLORS)):
        jit = 1.0 + 0.04 * (j - 1)  # side by side on the log axis
        gm = np.sqrt(lo * hi) * jit
        for ax, metric, key in ((axes[0], "dice", "mean_dice"), (axes[1], "recall", "mean_recall")):
            ax.scatter(x * jit, [r[m][metric] for r in rows], s=10, alpha=0.3, color=color)
            ax.errorbar(gm, [b[m][key] for b in bins], xerr=[np.maximum(gm - lo, 0), np.maximum(hi - gm, 0)],
                        fmt="o-", color=color, ms=7, capsize=3, lw=1.5, label=m)
    n = len(summary["by_size"])
    axes[0].set(xscale="log", ylim=(-0.02, 1.02), xlabel="anomaly volume (mm³, log)", ylabel="local Dice",
                title=f"Dice vs anomaly size ({n} equal-count bins; dots: anomalies)")
    axes[1].set(xscale="log", ylim=(-0.02, 1.02), xlabel="anomaly volume (mm³, log)",
                ylabel="recall (share of the anomaly's voxels found)", title="Recall vs anomaly size")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8, loc="lower right")
    f = d / "bench-quality-size.png"
    fig.savefig(f, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f


def plot_contrast(rows: list[dict[str, Any]], names: list[str], summary: dict[str, Any], d: Path) -> Path:
    """Local Dice vs |contrast|, one panel per kind (contrast units differ per kind)."""
    kinds = [k for k in KINDS if k in summary["by_contrast"]]
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(3.7 * max(len(kinds), 1), 4), sharey=True,
                             squeeze=False)
    for ax, k in zip(axes[0], kinds):
        sel = [r for r in rows if r["kind"] == k]
        bins = list(summary["by_contrast"][k].values())
        for j, (m, color) in enumerate(zip(names, COLORS)):
            ax.scatter([abs(r["contrast"]) for r in sel], [r[m]["dice"] for r in sel], s=12, alpha=0.3, color=color)
            mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
            ax.errorbar(mids, [b[m]["mean_dice"] for b in bins], xerr=[[mm - b["lo"] for mm, b in zip(mids, bins)],
                        [b["hi"] - mm for mm, b in zip(mids, bins)]], fmt="o-", color=color, ms=6, capsize=3,
                        label=m)
        ax.set(title=f"{k} (n={len(sel)}, {len(bins)} bin{'s' if len(bins) > 1 else ''})",
               xlabel=f"|contrast|\n{CONTRAST_UNITS[k]}")
        ax.grid(alpha=0.3)
    axes[0][0].set(ylabel="local Dice (bin mean; dots: anomalies)", ylim=(-0.02, 1.02))
    handles, labs = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=len(names), fontsize=8, bbox_to_anchor=(0.5, -0.17))
    f = d / "bench-quality-contrast.png"
    fig.savefig(f, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f


def plot_kinds(names: list[str], summary: dict[str, Any], d: Path) -> Path:
    """Voxel recall and mean local Dice per anomaly kind, one bar per method."""
    groups = [k for k in KINDS if summary["by_kind"][k]["n"]] + ["all"]
    get = {**summary["by_kind"], "all": summary["all"]}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    x = np.arange(len(groups))
    w = 0.8 / len(names)
    for ax, key, title in ((axes[0], "voxel_recall", "Voxel recall per anomaly kind"),
                           (axes[1], "mean_dice", "Mean local Dice per anomaly kind")):
        for j, (m, color) in enumerate(zip(names, COLORS)):
            vals = [get[g][m][key] or 0.0 for g in groups]
            bars = ax.bar(x + (j - (len(names) - 1) / 2) * w, vals, w, label=m, color=color)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.set_xticks(x, [f"{g}\n(n={get[g]['n']})" for g in groups])
        ax.set(ylim=(0, 1.08), title=title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("at the calibrated threshold, final mask")
    axes[0].legend(fontsize=7, loc="upper right")
    f = d / "bench-quality-kinds.png"
    fig.savefig(f, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f


# ---------------------------------------------------------------- Markdown
def _f(v: float | None, nd: int = 3) -> str:
    """``v`` with ``nd`` decimals, or a dash for an undefined value."""
    return "–" if v is None else f"{v:.{nd}f}"


def _findings(p: dict[str, Any]) -> list[str]:
    """Data-driven observations for the section (so a re-run with another model rewrites them)."""
    names, s, tg = list(p["methods"]), p["summary"], p["targets"]
    u, bases = names[0], names[1:]
    ov = p["overall"]
    best_b = max(bases, key=lambda m: ov[m]["dice"])
    missed = [f"{c['target']} ({c['issue']})" for c in tg["checks"] if not c["met"]]
    out = [f"Overall the U-Net reaches AUPRC {_f(ov[u]['auprc'])} and Dice {_f(ov[u]['dice'])} against "
           f"{_f(tg['best_baseline_auprc'])} and {_f(tg['best_baseline_dice'])} for the better baseline "
           f"(Dice {tg['dice_margin']:+.3f}). " + (f"Not met: {'; '.join(missed)}." if missed else "All targets met.")]
    kinds = {k: v for k, v in s["by_kind"].items() if v["n"]}
    rec = {k: v[u]["voxel_recall"] for k, v in kinds.items()}
    order = sorted(rec, key=lambda k: rec[k])
    out.append("Per kind (U-Net voxel recall): " + ", ".join(f"{k} {rec[k]:.2f} (n={kinds[k]['n']})" for k in
               reversed(order)) + f"; weakest: {order[0]}.")
    beaten = [f"{k} ({m}: {kinds[k][m]['voxel_recall']:.2f} vs {rec[k]:.2f})" for k in order for m in bases
              if (kinds[k][m]["voxel_recall"] or 0) > (rec[k] or 0)]
    if beaten:
        out.append("A baseline finds more of the voxels than the U-Net for: " + "; ".join(beaten) + ".")
    nd = s["intensity_detectable"]
    if nd["False"]["n"]:
        out.append(f"Anomalies that intensity thresholding cannot find (n={nd['False']['n']}): U-Net recall "
                   f"{_f(nd['False'][u]['voxel_recall'], 2)}, mean Dice {_f(nd['False'][u]['mean_dice'], 2)}; "
                   f"{best_b}: {_f(nd['False'][best_b]['voxel_recall'], 2)} / {_f(nd['False'][best_b]['mean_dice'], 2)}.")
    sb = list(s["by_size"].items())
    if len(sb) >= 2:
        (lo_k, lo), (hi_k, hi) = sb[0], sb[-1]
        out.append(f"Size: the smallest bin ({lo_k.replace('mm3', 'mm³')}) has U-Net mean Dice {_f(lo[u]['mean_dice'], 2)}"
                   f" with {lo[u]['detected']:.0%} of anomalies detected, the largest ({hi_k.replace('mm3', 'mm³')}) "
                   f"{_f(hi[u]['mean_dice'], 2)} / {hi[u]['detected']:.0%}; the smallest bin holds "
                   + ", ".join(f"{n} {k}" for k, n in lo["kinds"].items()) + ".")
    parts = []
    for k, bins in s["by_contrast"].items():
        if len(bins) >= 2:
            vals = list(bins.values())
            parts.append(f"{k} {' → '.join(_f(b[u]['mean_dice'], 2) for b in vals)}")
    if parts:
        out.append("Contrast (U-Net mean Dice from the lowest to the highest |contrast| bin of each kind): "
                   + "; ".join(parts) + ". The bins hold a few anomalies each, of mixed sizes: read them with the "
                   "size breakdown and the misses below.")
    miss = sorted((r for r in p["anomalies"] if r[u]["recall"] < DETECTED_RECALL), key=lambda r: (r["kind"],
                  r["volume_mm3"]))
    if miss:
        out.append(f"Missed by the U-Net (recall < {DETECTED_RECALL}), {len(miss)} of {len(p['anomalies'])}: "
                   + ", ".join(f"{r['kind']} {r['volume_mm3']:,.0f} mm³ (|c| {abs(r['contrast']):.2f})"
                               for r in miss) + ".")
    fp = p["false_positive_components"][u]
    out.append(f"False positives (U-Net): {fp['per_normal_study']:.2f} spurious components per normal study, "
               f"{fp['per_abnormal_study']:.2f} per abnormal study ({fp['fp_volume_mm3_per_study']:.0f} mm³ per study).")
    return out


def markdown_section(p: dict[str, Any]) -> str:
    """The "Detection quality" section of ``docs/benchmarks.md`` from the benchmark's payload."""
    names, s, m, mod, ts = list(p["methods"]), p["summary"], p["machine"], p["model"], p["test_set"]
    u = names[0]
    cal = mod["scoring"].get("target_fpr")
    lines = ["## Detection quality", "", "```sh", p["command"], "```", "",
             f"`{p['command']}` — {m['date']}, commit {m['git_commit']}: {m['nproc']} cores ({m['cpu']}), "
             f"load average at start {m['loadavg_at_start']}; model `{mod['name']}` "
             f"(`{Path(mod['path']).name}`, sha256 `{mod['sha256'][:8]}…`, scoring method `{mod['scoring']['method']}`"
             + (f", thresholds calibrated at {cal * 100:g} % voxel FPR on normal studies" if cal else "") + "); "
             f"the held-out synthetic test set (`demo.synthetic_test_set`: {ts['n_abnormal']} abnormal studies with "
             f"{ts['n_anomalies']} anomalies, {ts['n_normal']} normal studies; {ts['eval_voxels']:,} evaluated "
             f"voxels, {ts['positive_voxels']:,} anomalous); evaluation {p['seconds']['evaluate']:.0f} s; "
             "`benchmarks/results/quality.json`.", "",
             "The overall figures are `worker.engine.evaluate.evaluate`'s (the same as `pacs-node evaluate "
             "--synthetic --json`): voxels of the head foreground of every study, each method through the same "
             "post-processing at its own calibrated threshold, baselines at their best polarity. Each anomaly is "
             "then scored on its own exact ground truth (`SyntheticCase.anomaly_masks()`): recall = "
             f"{p['definitions']['recall']}; local Dice = {p['definitions']['local_dice']}; detected = "
             f"{p['definitions']['detected']}.", "",
             "| method | AUROC | AUPRC | Dice | sensitivity | specificity | precision | study AUROC |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in p["overall"].items():
        cells = [_f(r[c]) for c in METRICS]
        if name == u:
            cells = [f"**{c}**" for c in cells[:3]] + cells[3:]
        lines.append(f"| {'**' + name + '**' if name == u else name} | " + " | ".join(cells) + " |")
    lines += ["", "| issue | target | measured | met? |", "|---|---|---|---|"]
    lines += [f"| {c['issue']} | {c['target']} | {c['measured']} | {'yes' if c['met'] else '**no**'} |"
              for c in p["targets"]["checks"]]
    lines += ["", "\"Stronger baseline\" is taken per metric (the better of the two baselines on that metric); "
              f"`evaluate` ranks {p['targets']['stronger_baseline_by_auprc']} first by AUPRC.", "",
              "Operating points (voxel recall / precision): calibrated threshold on the raw score → final mask:", ""]
    lines += ["* " + "; ".join(f"{n}: {o['raw_recall']:.3f} / {o['raw_precision']:.3f} → {o['final_recall']:.3f} / "
                               f"{o['final_precision']:.3f}" for n, o in p["operating_points"].items()), ""]
    lines += ["| method | false-positive components per abnormal study | per normal study | normal studies with one "
              "or more | false-positive volume per study |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {f['per_abnormal_study']:.2f} | {f['per_normal_study']:.2f} | {f['normal_studies_with_fp']:.0%} "
              f"| {f['fp_volume_mm3_per_study']:.0f} mm³ |" for n, f in p["false_positive_components"].items()]
    hdr = "| {} | n | " + " | ".join(names) + " |"
    sep = "|---|---|" + "---|" * len(names)
    lines += ["", "Per anomaly kind (voxel recall / mean local Dice / share detected):", "", hdr.format("kind"), sep]
    groups = [(k, v) for k, v in s["by_kind"].items() if v["n"]] + [
        ("*intensity-detectable*", s["intensity_detectable"]["True"]),
        ("*not intensity-detectable*", s["intensity_detectable"]["False"]), ("**all**", s["all"])]
    for k, v in groups:
        lines.append(f"| {k} | {v['n']} | " + " | ".join(
            f"{_f(v[n]['voxel_recall'], 2)} / {_f(v[n]['mean_dice'], 2)} / {_f(v[n]['detected'], 2)}"
            if v["n"] else "–" for n in names) + " |")
    lines += ["", "By anomaly volume (equal-count bins; mean recall / mean local Dice / share detected):", "",
              hdr.format("volume"), sep]
    for k, v in s["by_size"].items():
        lines.append(f"| {k.replace('mm3', 'mm³')} | {v['n']} | " + " | ".join(
            f"{_f(v[n]['mean_recall'], 2)} / {_f(v[n]['mean_dice'], 2)} / {_f(v[n]['detected'], 2)}"
            for n in names) + " |")
    lines += ["", "By contrast magnitude within each kind (equal-count bins; units per kind; mean local Dice):", "",
              "| kind | contrast magnitude | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for k, bins in s["by_contrast"].items():
        for b in bins.values():
            lines.append(f"| {k} | {b['lo']:.3f}–{b['hi']:.3f} {CONTRAST_UNITS[k]} | {b['n']} | "
                         + " | ".join(_f(b[n]["mean_dice"], 2) for n in names) + " |")
    lines += ["", "Findings:", ""] + [f"* {x}" for x in _findings(p)]
    lines += ["", "![ROC](img/bench-quality-roc.png) ![PR](img/bench-quality-pr.png)", "",
              "![Dice vs size](img/bench-quality-size.png)", "![Dice vs contrast](img/bench-quality-contrast.png)",
              "![Recall per kind](img/bench-quality-kinds.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code.

    Raises
    ------
    FileNotFoundError
        When the model file does not exist.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "pacs_node" / "data" / "demo-model.pt")
    ap.add_argument("--n-abnormal", type=int, default=24, help="abnormal test studies (as pacs-node evaluate)")
    ap.add_argument("--n-normal", type=int, default=6, help="normal test studies (as pacs-node evaluate)")
    ap.add_argument("--margin", type=int, default=3, help="voxels around an anomaly's box for its local Dice")
    ap.add_argument("--size-bins", type=int, default=4, help="equal-count anomaly-size bins")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--publish", action="store_true", help="copy JSON/Markdown to results/, PNGs to docs/img/")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.model.is_file():
        raise FileNotFoundError(f"no model at {args.model}")

    from worker.engine.demo import SEEDS, synthetic_test_set
    from worker.engine.evaluate import EvalOutputs, evaluate
    from worker.engine.predictor import Predictor
    from worker.engine.train import set_threads

    machine = machine_info()
    threads = set_threads(None)
    t0 = time.perf_counter()
    pred = Predictor.from_checkpoint(args.model, device=args.device)
    cases = synthetic_test_set(args.n_abnormal, args.n_normal)
    log(f"evaluating {args.model.name} on {args.n_abnormal} abnormal + {args.n_normal} normal test studies")
    outs = EvalOutputs()
    res = evaluate(pred, cases, outputs=outs)
    t_eval = time.perf_counter() - t0
    labels = method_labels(res)
    names = list(labels)  # U-Net first
    overall = overall_table(res, labels)
    ops = operating_points(outs, res, labels)
    log("per-anomaly analysis")
    seeds = [SEEDS["test"] + i for i in range(args.n_abnormal)]
    rows = per_anomaly(seeds, [np.asarray(m, bool) for _, m in cases[:args.n_abnormal]], outs, labels, args.margin)
    summary = summarise(rows, names, args.size_bins)
    fp = false_positive_components(cases, outs, labels)
    targets = assess_targets(res, overall, names[0])
    cmd = "python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload: dict[str, Any] = {
        "benchmark": "quality", "command": cmd.strip(), "machine": machine, "threads": threads,
        "seconds": {"evaluate": round(t_eval, 1)},
        "model": {"path": str(args.model), "file_sha256": hashlib.sha256(args.model.read_bytes()).hexdigest(),
                  "sha256": pred.checksum, "name": pred.model_name, "version": pred.model_version,
                  "scoring": pred.scoring.to_dict()},
        "test_set": {"source": "worker.engine.demo.synthetic_test_set", "n_abnormal": args.n_abnormal,
                     "n_normal": args.n_normal, "seeds_abnormal": [seeds[0], seeds[-1]] if seeds else [],
                     "n_anomalies": len(rows), "eval_voxels": int(sum(len(t) for t in outs.truth)),
                     "positive_voxels": int(sum(int(t.sum()) for t in outs.truth))},
        "definitions": {"local_dice": f"final mask vs the anomaly inside its bounding box grown by {args.margin} "
                                      "voxels, other anomalies' voxels excluded",
                        "recall": "share of the anomaly's voxels in the final mask",
                        "detected": f"recall >= {DETECTED_RECALL}",
                        "stronger_baseline": "per metric, the better of the two baselines (best polarity each)"},
        "methods": labels, "overall": overall, "evaluate": res, "operating_points": ops,
        "false_positive_components": fp, "targets": targets, "summary": summary, "anomalies": rows,
    }
    plot_dir = OUT_DIR / "quality"
    plot_dir.mkdir(parents=True, exist_ok=True)
    files = [*plot_curves(outs, labels, ops, plot_dir), plot_size(rows, names, summary, plot_dir),
             plot_contrast(rows, names, summary, plot_dir), plot_kinds(names, summary, plot_dir)]
    payload["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    path = write_json("quality.json", payload)
    md, section = OUT_DIR / "quality-section.md", markdown_section(payload)
    md.write_text(section)
    print(section)
    print(f"JSON: {path}\nMarkdown: {md}\nPNG: {', '.join(str(f) for f in files)}")
    if args.publish:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, RESULTS_DIR / "quality.json")
        shutil.copy(md, RESULTS_DIR / "quality-section.md")
        for f in files:
            shutil.copy(f, IMG_DIR / f.name)
        print("published: benchmarks/results/quality.json, quality-section.md, docs/img/bench-quality-*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
