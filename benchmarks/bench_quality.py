"""Detection quality: U-Net versus both baselines on the held-out synthetic test set.

Overall voxel metrics (AUROC, AUPRC, Dice, sensitivity, specificity,
precision at each method's calibrated threshold) and the ROC / PR curves come
from ``worker.engine.evaluate.evaluate`` itself, so they equal
``pacs-node evaluate --synthetic --json``. On top, every injected anomaly is
scored on its own (``Anomaly.voxels``): its recall (share of its voxels in the
post-processed mask) and a local Dice (mask restricted to the anomaly's
bounding box grown by 3 voxels), against its kind, size and contrast.

    python benchmarks/bench_quality.py [--model PATH] [--n-abnormal 24] [--n-normal 6] [--publish]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, md_table, write_json  # noqa: E402
from machine import machine_info  # noqa: E402
from paths import IMG_DIR, OUT_DIR, REPO, RESULTS_DIR  # noqa: E402

TARGETS = {"auprc": 0.90, "dice": 0.75, "dice_margin": 0.15}
FIRST_BAR = {"auprc": 0.80, "dice": 0.60}
KINDS = ("bright", "dark", "texture", "patch", "deform")


def per_anomaly(predictor: Any, n_abnormal: int, methods: dict[str, tuple[Any, float]]) -> list[dict[str, Any]]:
    """One row per injected anomaly with recall and local Dice for every method."""
    from worker.engine.demo import SEEDS
    from worker.engine.scoring import component_keys, fuse
    from worker.engine.synthetic import make_case

    keys = list(dict.fromkeys(k for cfg, _ in methods.values() for k in component_keys(cfg)))
    rows = []
    for i in range(n_abnormal):
        case = make_case(SEEDS["test"] + i)
        vol = case.volume
        comp = predictor.components(vol, keys)
        masks = {m: predictor.finalize(vol, fuse(comp.maps, cfg), thr)[0] for m, (cfg, thr) in methods.items()}
        for a in case.anomalies:
            if not len(a.voxels):
                continue
            truth = np.zeros(vol.shape, bool)
            truth.flat[a.voxels] = True
            idx = np.argwhere(truth)
            lo, hi = np.maximum(idx.min(0) - 3, 0), idx.max(0) + 4
            box = tuple(slice(int(a_), int(b_)) for a_, b_ in zip(lo, hi))
            row: dict[str, Any] = {"case": i, "kind": a.kind, "voxels": int(len(a.voxels)),
                                   "volume_mm3": float(len(a.voxels) * vol.voxel_volume_mm3),
                                   "contrast": float(a.contrast), "intensity_detectable": a.intensity_detectable}
            for m, mask in masks.items():
                hit = int(mask.flat[a.voxels].sum())
                local = int(mask[box].sum())
                row[m] = {"recall": hit / len(a.voxels), "dice": 2 * hit / (local + len(a.voxels))}
            rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per kind, size tercile and contrast tercile: voxel recall, mean local Dice, share detected."""
    def agg(sel: list[dict[str, Any]]) -> dict[str, Any]:
        vox = sum(r["voxels"] for r in sel)
        return {"n": len(sel), "voxels": vox, **{m: {
            "voxel_recall": round(sum(r[m]["recall"] * r["voxels"] for r in sel) / max(vox, 1), 3),
            "mean_dice": round(float(np.mean([r[m]["dice"] for r in sel])), 3) if sel else None,
            "detected": round(float(np.mean([r[m]["recall"] >= 0.1 for r in sel])), 3) if sel else None,
        } for m in names}}

    out: dict[str, Any] = {"by_kind": {k: agg([r for r in rows if r["kind"] == k]) for k in KINDS}}
    sizes = np.array([r["volume_mm3"] for r in rows])
    edges = np.quantile(sizes, [0, 1 / 3, 2 / 3, 1])
    out["by_size"] = {f"{edges[i]:.0f}-{edges[i + 1]:.0f} mm3": agg(
        [r for r in rows if edges[i] <= r["volume_mm3"] <= edges[i + 1] and (i == 0 or r["volume_mm3"] > edges[i])])
        for i in range(3)}
    out["by_contrast"] = {}
    for k in KINDS:
        sel = [r for r in rows if r["kind"] == k]
        if len(sel) < 2:
            continue
        c = np.abs([r["contrast"] for r in sel])
        mid = float(np.median(c))
        out["by_contrast"][k] = {f"|c| <= {mid:.2f}": agg([r for r in sel if abs(r["contrast"]) <= mid]),
                                 f"|c| > {mid:.2f}": agg([r for r in sel if abs(r["contrast"]) > mid])}
    out["intensity_detectable"] = {str(v): agg([r for r in rows if r["intensity_detectable"] == v]) for v in (True, False)}
    return out


def plots(rows: list[dict[str, Any]], names: list[str], summary: dict[str, Any], d: Path) -> list[Path]:
    """Dice vs size, Dice vs contrast per kind, recall per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(names, ("#d9822b", "#4682b4", "#8fbc8f")))
    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in names:
        ax.scatter([r["volume_mm3"] for r in rows], [r[m]["dice"] for r in rows], s=18, alpha=0.75, label=m, color=colors[m])
    ax.set(xscale="log", xlabel="anomaly volume (mm³)", ylabel="local Dice", title="Dice vs anomaly size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    files.append(d / "bench-quality-size.png")
    fig.savefig(files[-1], dpi=90, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(KINDS), figsize=(18, 3.8), sharey=True)
    for ax, k in zip(axes, KINDS):
        sel = [r for r in rows if r["kind"] == k]
        for m in names:
            ax.scatter([abs(r["contrast"]) for r in sel], [r[m]["dice"] for r in sel], s=18, alpha=0.75, color=colors[m],
                       label=m)
        ax.set(title=f"{k} (n={len(sel)})", xlabel="|contrast| (kind's own units)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("local Dice")
    axes[0].legend(fontsize=7)
    files.append(d / "bench-quality-contrast.png")
    fig.savefig(files[-1], dpi=80, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(KINDS))
    for j, m in enumerate(names):
        ax.bar(x + (j - 1) * 0.27, [summary["by_kind"][k][m]["voxel_recall"] for k in KINDS], 0.27, label=m,
               color=colors[m])
    ax.set_xticks(x, [f"{k}\n({summary['by_kind'][k]['n']})" for k in KINDS])
    ax.set(ylabel="voxel recall at the calibrated threshold", ylim=(0, 1), title="Recall per anomaly kind")
    ax.legend(fontsize=8)
    files.append(d / "bench-quality-kinds.png")
    fig.savefig(files[-1], dpi=90, bbox_inches="tight")
    plt.close(fig)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "pacs_node" / "data" / "demo-model.pt")
    ap.add_argument("--n-abnormal", type=int, default=24)
    ap.add_argument("--n-normal", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--publish", action="store_true")
    args = ap.parse_args(argv)

    from worker.engine.demo import synthetic_test_set
    from worker.engine.evaluate import evaluate
    from worker.engine.predictor import Predictor
    from worker.engine.train import set_threads

    set_threads(None)
    pred = Predictor.from_checkpoint(args.model, device=args.device)
    plot_dir = OUT_DIR / "quality"
    log(f"evaluating {args.model.name} on {args.n_abnormal} abnormal + {args.n_normal} normal test studies")
    res = evaluate(pred, synthetic_test_set(args.n_abnormal, args.n_normal), plots_dir=plot_dir)
    bthr = pred.meta["baselines"]["thresholds"]
    methods: dict[str, tuple[Any, float]] = {"U-Net": (pred.scoring, float(pred.scoring.threshold or 0.0))}
    for name, r in res["baselines"].items():
        key = f"{name}:{r['polarity']}"
        methods[f"{name} ({r['polarity']})"] = (replace(pred.scoring, method=name, polarity=r["polarity"]), float(bthr[key]))
    names = list(methods)
    log("per-anomaly analysis")
    rows = per_anomaly(pred, args.n_abnormal, methods)
    summary = summarise(rows, names)
    cols = ("auroc", "auprc", "dice", "sensitivity", "specificity", "precision", "study_auroc")
    overall = {"U-Net": {k: res[k] for k in (*cols, "threshold")}, **{
        f"{n} ({r['polarity']})": {k: r[k] for k in (*cols, "threshold")} for n, r in res["baselines"].items()}}
    base = res["baseline"]
    targets = {
        "auprc>=0.90": res["auprc"] >= TARGETS["auprc"],
        "dice>=0.75": res["dice"] >= TARGETS["dice"],
        "dice>=baseline+0.15": res["dice"] - base["dice"] >= TARGETS["dice_margin"],
        "issue3: auprc>=0.80": res["auprc"] >= FIRST_BAR["auprc"],
        "issue3: dice>=0.60": res["dice"] >= FIRST_BAR["dice"],
        "issue3: beats stronger baseline on both": bool(res["beats_baseline"]["auprc"] and res["beats_baseline"]["dice"]),
    }
    payload = {
        "benchmark": "quality",
        "command": "python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "model": {"path": str(args.model), "name": pred.model_name, "version": pred.model_version,
                  "sha256": pred.checksum, "scoring": pred.scoring.to_dict()},
        "test_set": {"n_abnormal": args.n_abnormal, "n_normal": args.n_normal, "n_anomalies": len(rows)},
        "overall": overall, "stronger_baseline": base["name"], "dice_margin": res["dice"] - base["dice"],
        "targets": targets, "summary": summary, "anomalies": rows,
    }
    path = write_json("quality.json", payload)
    files = plots(rows, names, summary, plot_dir)
    print(md_table(["method", *cols], [[m, *(f"{v[c]:.3f}" if v[c] is not None else "-" for c in cols)]
                                       for m, v in overall.items()]))
    print(md_table(["kind", "n", *[f"{m} recall" for m in names], *[f"{m} Dice" for m in names]],
                   [[k, s["n"], *[s[m]["voxel_recall"] for m in names], *[s[m]["mean_dice"] for m in names]]
                    for k, s in summary["by_kind"].items()]))
    print("targets:", targets)
    print(f"JSON: {path}\nPNG: {plot_dir}")
    if args.publish:
        shutil.copy(path, RESULTS_DIR / "quality.json")
        for f in files:
            shutil.copy(f, IMG_DIR / f.name)
        shutil.copy(plot_dir / "roc.png", IMG_DIR / "bench-quality-roc.png")
        shutil.copy(plot_dir / "pr.png", IMG_DIR / "bench-quality-pr.png")
        print(f"published: {RESULTS_DIR / 'quality.json'} and docs/img/bench-quality-*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
