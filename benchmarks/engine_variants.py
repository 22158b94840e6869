"""Build one variant of the synthetic demo model and evaluate it (engine ablations).

Each run is a full ``train --synthetic`` build (``worker.engine.demo``) with a
few settings overridden, followed by an evaluation on the held-out synthetic
test set. The scoring-method selection scores on the separate selection cases
(seeds 30 000+) are reported beside the test figures: variants are compared
on the selection column.

Usage::

    python benchmarks/engine_variants.py NAME '{"train.local_prob": 0.5, "train.seed": 1}'

Override keys: ``train.<TrainConfig field>``, ``unet.<UNetConfig field>``,
``scoring.<ScoringConfig field>``, ``preprocess.<PreprocessConfig field>``
and ``n_train``. training budgets are step counts,
so results do not depend on machine load. One JSON line per run is appended
to ``benchmarks/out/engine-variants.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from paths import OUT_DIR, REPO

sys.path.insert(0, str(REPO))

from worker.engine.demo import DemoConfig, demo_config, synthetic_test_set, train_synthetic  # noqa: E402
from worker.engine.evaluate import evaluate  # noqa: E402
from worker.engine.predictor import Predictor  # noqa: E402
from worker.engine.train import set_threads  # noqa: E402

log = logging.getLogger(__name__)

_TUPLES = {"noise_res", "local_kinds", "local_radius", "scale", "intensity_jitter", "size", "median_size"}


def _section(over: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {k[len(prefix):]: v for k, v in over.items() if k.startswith(prefix)}
    return {k: tuple(v) if k in _TUPLES else v for k, v in out.items()}


def apply_overrides(cfg: DemoConfig, over: dict[str, Any]) -> DemoConfig:
    """Return ``cfg`` with the dotted overrides applied.

    Raises
    ------
    TypeError
        For an unknown field name.
    """
    cfg.train = replace(cfg.train, **_section(over, "train."))
    cfg.unet = replace(cfg.unet, **_section(over, "unet."))
    cfg.scoring = replace(cfg.scoring, **_section(over, "scoring."))
    cfg.preprocess = replace(cfg.preprocess, **_section(over, "preprocess."))
    if "n_train" in over:
        cfg.n_train = int(over["n_train"])
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="variant name (model written to benchmarks/out/variants/NAME.pt)")
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON object of dotted overrides")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    over = json.loads(args.overrides)
    cfg = apply_overrides(demo_config(), over)
    out = OUT_DIR / "variants" / f"{args.name}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    train_synthetic(out, cfg, device="cpu", progress=False, model_name=args.name)
    build_s = time.monotonic() - t0
    pred = Predictor.from_checkpoint(out, device="cpu")
    res = evaluate(pred, synthetic_test_set(24, 6))
    summary = {
        "name": args.name,
        "overrides": over,
        "build_seconds": round(build_s, 1),
        "method": res["method"],
        "test": {m: {k: r[k] for k in ("auprc", "dice")} for m, r in res.get("methods", {}).items()},
        "baseline": {k: res["baseline"][k] for k in ("name", "auprc", "dice")},
        "selection": pred.meta.get("selection", {}).get("scores"),
        "training": {k: pred.meta["training"][k] for k in ("epochs_run", "stopped", "seconds")},
    }
    print(json.dumps(summary))
    with open(OUT_DIR / "engine-variants.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
