"""The engine on one phantom generated at several slice spacings and in-plane sizes.

Prints the mask size and Dice against the injected truth for each geometry,
with the 2.5D neighbours taken at the checkpoint's ``preprocess.context_mm``
(the product) and, with ``--adjacent``, at adjacent slices (as before that
setting existed).

    python benchmarks/engine_geometry.py [--model PATH] [--adjacent]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paths import REPO  # noqa: E402

GEOMETRIES = [((400, 256, 256), (0.5, 0.9, 0.9)), ((100, 256, 256), (2.0, 0.9, 0.9)), ((50, 64, 64), (4.0, 3.0, 3.0))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "pacs_node" / "data" / "demo-model.pt")
    ap.add_argument("--adjacent", action="store_true", help="stack adjacent slices (ignore context_mm)")
    ap.add_argument("--seed", type=int, default=4242)
    args = ap.parse_args(argv)
    from worker.engine.predictor import Predictor
    from worker.engine.synthetic import make_case
    from worker.engine.train import set_threads

    set_threads(None)
    p = Predictor.from_checkpoint(args.model, device="cpu")
    if args.adjacent:
        p.preprocess_cfg = replace(p.preprocess_cfg, context_mm=None)
    for shape, spacing in GEOMETRIES:
        case = make_case(args.seed, anomalous=True, shape=shape, spacing=spacing)
        pred = p.predict(case.volume)
        m, t = pred.mask, case.mask
        print(json.dumps({"shape": shape, "spacing": spacing, "context_mm": p.preprocess_cfg.context_mm,
                          "mask_voxels": int(m.sum()), "truth_voxels": int(t.sum()),
                          "dice": round(float(2 * (m & t).sum() / (m.sum() + t.sum())), 3),
                          "findings": len(pred.findings)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
