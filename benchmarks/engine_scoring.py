"""Scoring variants of one trained model, without retraining.

For each ``combine_with`` term and weight, the checkpoint is recalibrated on
the calibration normals (seeds 20 000+) with ``method = "combined"``, then
evaluated on the scoring-selection cases (seeds 30 000+, the set ``train``
chooses the method on) and on the held-out test set (seeds 1 000 000+);
the checkpoint's own residual method is evaluated alongside. Writes
``benchmarks/results/engine-scoring.json``.

    python benchmarks/engine_scoring.py [--model PATH] [--with feature] [--weights 0.25,0.5,1.0]
    python benchmarks/engine_scoring.py --tta --out benchmarks/results/engine-tta.json

``--tta`` instead compares the checkpoint's own method without and with
flip test-time augmentation (``scoring.tta``: the reconstruction averaged
with that of the left-right mirrored input), each recalibrated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paths import REPO, RESULTS_DIR  # noqa: E402


def _pair(r: dict) -> dict[str, float]:
    return {"auprc": round(float(r["auprc"]), 4), "dice": round(float(r["dice"]), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "pacs_node" / "data" / "demo-model.pt")
    ap.add_argument("--with", dest="combine_with", default="feature", choices=["feature", "intensity", "pixel_zscore"])
    ap.add_argument("--weights", default="0.25,0.5,1.0")
    ap.add_argument("--tta", action="store_true", help="compare scoring.tta off/on instead of combine weights")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "engine-scoring.json")
    args = ap.parse_args(argv)
    from worker.engine.calibrate import calibrate
    from worker.engine.demo import synthetic_cases, synthetic_normals, synthetic_test_set
    from worker.engine.evaluate import evaluate
    from worker.engine.predictor import Predictor
    from worker.engine.train import set_threads

    set_threads(None)
    cal = synthetic_normals("calib", 10)
    select = synthetic_cases("select", 10, 0)
    test = synthetic_test_set()
    rows = []
    variants: list[dict] = ([{"tta": False}, {"tta": True}] if args.tta else
                            [{"combine_with": args.combine_with, "combine_weight": float(w)}
                             for w in args.weights.split(",")])
    for v in variants:
        t0 = time.monotonic()
        p = Predictor.from_checkpoint(args.model, device="cpu")
        p.scoring = replace(p.scoring, **v)
        calibrate(p, cal, method=None if args.tta else "combined")
        row: dict = dict(v) if args.tta else {"combine_with": args.combine_with, "weight": v["combine_weight"]}
        for name, cases in (("selection", select), ("test", test)):
            res = evaluate(p, cases, compare_methods=True)["methods"]
            row[name] = {m: _pair(r) for m, r in res.items()}
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model.name), "command": "python benchmarks/engine_scoring.py "
                                    + " ".join(argv if argv is not None else sys.argv[1:]), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
