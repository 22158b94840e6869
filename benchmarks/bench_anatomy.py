"""Detection quality on real anatomy: the demo model versus the intensity baselines (issue 12).

The held-out test set is ``worker.engine.headdemo.anatomy_test_set``: heads
generated from the MNI ICBM152 2009 template with seeds never used for
training, calibration or selection (``1_000_000..`` with lesions,
``1_500_000..`` normal), lesions from ``worker.engine.lesions``. Overall
metrics are those of ``worker.engine.evaluate.evaluate`` (``pacs-node
evaluate --anatomy --json``); each lesion is then scored on its own mask
(recall, and "detected" when at least 10 % of it is in the final mask) by
kind, size class and sequence, and the targets of issue 12 are checked.

    python benchmarks/bench_anatomy.py [--model PATH] [--n-abnormal 30] [--n-normal 20] [--publish]

Writes ``out/anatomy.json`` and ``out/anatomy-section.md``; ``--publish``
copies them to ``results/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, write_json  # noqa: E402
from machine import machine_info  # noqa: E402
from paths import OUT_DIR, REPO, RESULTS_DIR  # noqa: E402

DETECTED_RECALL = 0.1
TARGETS = {"auprc": 0.80, "dice": 0.70, "dice_margin": 0.15, "normal_fp_ml_median": 1.0,
           "normal_any_finding_share": 0.20, "fpr_ratio": 2.0}


def per_lesion(subjects: list[Any], masks: list[np.ndarray]) -> list[dict[str, Any]]:
    """Recall of every lesion in the final mask of the same study."""
    rows = []
    for s, pred in zip(subjects, masks):
        for les in s.lesions:
            rec = float(np.count_nonzero(pred & les.mask) / max(1, np.count_nonzero(les.mask)))
            rows.append({**les.to_dict(), "sequence": s.params["contrast"], "recall": rec,
                         "detected": rec >= DETECTED_RECALL, "seed": s.seed})
    return rows


def group(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """Detection rate and mean recall per value of ``key``."""
    acc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        acc[str(r[key])].append(r)
    return {k: {"n": len(v), "detection_rate": float(np.mean([r["detected"] for r in v])),
                "mean_recall": float(np.mean([r["recall"] for r in v]))} for k, v in sorted(acc.items())}


def assess(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's done-when figures and whether each holds."""
    base = res["baseline"]
    ratio = (res["normal_voxel_fpr"] or 0.0) / res["target_fpr"] if res.get("target_fpr") else None
    rows = {
        "auprc": (res["auprc"], res["auprc"] is not None and res["auprc"] >= TARGETS["auprc"]),
        "dice": (res["dice"], res["dice"] >= TARGETS["dice"]),
        "dice_margin_vs_stronger_baseline": (res["dice"] - base["dice"], res["dice"] - base["dice"] >= TARGETS["dice_margin"]),
        "normal_fp_ml_median": (res["normal_fp_ml_median"], (res["normal_fp_ml_median"] or 0) <= TARGETS["normal_fp_ml_median"]),
        "normal_any_finding_share": (res["normal_any_finding_share"],
                                     (res["normal_any_finding_share"] or 0) <= TARGETS["normal_any_finding_share"]),
        "voxel_fpr_over_target": (ratio, ratio is not None and 1 / TARGETS["fpr_ratio"] <= ratio <= TARGETS["fpr_ratio"]),
    }
    return {k: {"value": v, "met": bool(m)} for k, (v, m) in rows.items()}


def _f(v: Any, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown(p: dict[str, Any]) -> str:
    """The "Detection quality on real anatomy" section of docs/benchmarks.md."""
    res = p["evaluate"]
    out = [f"Command: `{p['command']}` — model `{p['model']['name']}` ({p['model']['version']}), "
           f"{p['n_abnormal']} studies with lesions and {p['n_normal']} normal studies, "
           f"{p['seconds']:.0f} s on {p['machine'].get('cpu', 'this host')}.", ""]
    out.append("| method | AUROC | AUPRC | Dice | Dice per study | median FP mL (normals) | normals with a finding | "
               "voxel FPR on normals | study AUROC |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    rows = [(f"U-Net ({res['method']})", res)] + [(f"{n} ({r['polarity']})", r) for n, r in res["baselines"].items()]
    rows += [(f"U-Net {m}", r) for m, r in res.get("methods", {}).items() if m != res["method"]]
    for name, r in rows:
        out.append(f"| {name} | {_f(r['auroc'])} | {_f(r['auprc'])} | {_f(r['dice'])} | {_f(r.get('dice_per_study_mean'))} | "
                   f"{_f(r.get('normal_fp_ml_median'), 2)} | {_f(r.get('normal_any_finding_share'), 2)} | "
                   f"{_f(r.get('normal_voxel_fpr'), 5)} | {_f(r.get('study_auroc'))} |")
    out += ["", f"Calibration target: voxel FPR {res['target_fpr']} on normals; threshold {res['threshold']:.4f}.", ""]
    out.append("| done-when figure | value | met |")
    out.append("|---|---|---|")
    for k, v in p["targets"].items():
        out.append(f"| {k} | {_f(v['value'], 4)} | {'yes' if v['met'] else 'no'} |")
    for key, title in (("kind", "Per lesion kind"), ("size", "Per size (< 1 mL small, 1–10 mL medium, > 10 mL large)"),
                       ("sequence", "Per sequence")):
        out += ["", f"{title} (U-Net, detected = ≥ {DETECTED_RECALL:.0%} of the lesion in the final mask):", "",
                "| " + key + " | lesions | detected | mean recall |", "|---|---|---|---|"]
        for k, g in p["per_lesion"][key].items():
            out.append(f"| {k} | {g['n']} | {g['detection_rate']:.2f} | {g['mean_recall']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "pacs_node" / "data" / "demo-model.pt")
    ap.add_argument("--n-abnormal", type=int, default=30)
    ap.add_argument("--n-normal", type=int, default=20)
    ap.add_argument("--publish", action="store_true")
    args = ap.parse_args(argv)
    from worker.engine.evaluate import EvalOutputs, evaluate
    from worker.engine.headdemo import anatomy_subjects
    from worker.engine.predictor import Predictor
    from worker.engine.train import set_threads

    set_threads()
    t0 = time.monotonic()
    pred = Predictor.from_checkpoint(args.model, device="cpu")
    log(f"generating {args.n_abnormal} + {args.n_normal} test subjects")
    subjects = anatomy_subjects("test", args.n_abnormal, args.n_normal)
    cases = [(s.volume, s.mask if s.lesions else None) for s in subjects]
    outs = EvalOutputs()
    log("evaluating")
    res = evaluate(pred, cases, outputs=outs)
    res["target_fpr"] = pred.scoring.target_fpr
    rows = per_lesion(subjects[:args.n_abnormal], outs.masks["unet"][:args.n_abnormal])
    payload = {
        "command": "python benchmarks/bench_anatomy.py" + (f" --n-abnormal {args.n_abnormal}" if args.n_abnormal != 30 else "")
                   + (f" --n-normal {args.n_normal}" if args.n_normal != 20 else ""),
        "model": {"name": pred.model_name, "version": pred.model_version, "path": str(args.model)},
        "n_abnormal": args.n_abnormal, "n_normal": args.n_normal,
        "evaluate": res, "targets": assess(res),
        "per_lesion": {"kind": group(rows, "kind"), "size": group(rows, "size"), "sequence": group(rows, "sequence")},
        "lesions": rows, "seconds": time.monotonic() - t0, "machine": machine_info(),
        "selection": pred.meta.get("selection"), "brain_mask_training": pred.meta.get("brain_mask_training"),
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_json("anatomy.json", payload)
    md = markdown(payload)
    (OUT_DIR / "anatomy-section.md").write_text(md)
    print(md)
    if args.publish:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(OUT_DIR / "anatomy.json", RESULTS_DIR / "anatomy.json")
        shutil.copy(OUT_DIR / "anatomy-section.md", RESULTS_DIR / "anatomy-section.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
