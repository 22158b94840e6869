"""Step timings of the worker's hot path on one 400-slice study, for one or
two git revisions in the same run (interleaved, each in its own process).

Per round and revision, on the engine phantom ``make_case(4242, shape=(N,
256, 256))`` and on a DICOM MR series of the same size (``common.mr_volume``):

* ``foreground_normalize``: ``foreground_mask`` + ``normalize``;
* ``clean_mask``: the 3D clean-up of the thresholded score;
* ``predict``: ``Predictor.predict`` (shipped demo model), median of 3 calls;
* ``build_gc`` / ``build_nogc``: ``build_job_outputs`` (SEG, SR, map, written
  and validated) with Python's cyclic garbage collector on / paused;
* ``build_headers``: the same, from the headers ``load_series_headers``
  already read (revisions that have it), collector paused.

    python benchmarks/engine_steps.py [--slices 400] [--rounds 3] [--baseline REV] [--publish]

Prints one JSON object (medians per revision and step) and writes
``out/engine-steps.json`` (``--publish``: ``results/engine-steps.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, export_tree, machine_info, mr_volume, write_json, write_mr_series  # noqa: E402
from paths import REPO, RESULTS_DIR  # noqa: E402

MODEL = REPO / "pacs_node" / "data" / "demo-model.pt"


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(slices: int) -> dict[str, float]:
    """One round of every step in this process (the revision on PYTHONPATH)."""
    import torch

    from pacs_node.config import load_settings
    from worker.engine import dicom_io
    from worker.engine.postprocess import clean_mask
    from worker.engine.predictor import Predictor
    from worker.engine.preprocess import PreprocessConfig, foreground_mask, normalize
    from worker.engine.scoring import fuse
    from worker.engine.synthetic import make_case
    from worker.outputs.build import build_job_outputs

    torch.set_num_threads(2)
    out: dict[str, float] = {}
    vol = make_case(4242, anomalous=True, shape=(slices, 256, 256), spacing=(200 / slices, 0.9, 0.9)).volume
    cfg = PreprocessConfig()
    out["foreground_normalize"] = _timed(lambda: normalize(vol.array, foreground_mask(vol.array, "MR", cfg), "MR", cfg))
    p = Predictor.from_checkpoint(MODEL)
    comp = p.components(vol)
    mask = fuse(comp.maps, p.scoring) >= float(p.scoring.threshold or 0.0)
    sc = p.scoring
    out["clean_mask"] = _timed(lambda: clean_mask(mask, vol.spacing, sc.min_volume_mm3, sc.closing, sc.fill_holes))
    out["predict"] = median(_timed(lambda: p.predict(vol)) for _ in range(3))

    work = Path(tempfile.mkdtemp(prefix="engine-steps-", dir=OUT_DIR))
    try:
        spacing = (200 / slices, 0.9, 0.9)
        _, paths = write_mr_series(mr_volume(slices, size=256, spacing=spacing), work / "series", spacing=spacing)
        series, refs = dicom_io.load_series_refs(paths)
        pred = p.predict(series)
        settings = load_settings(None)

        def build(headers: list[Any] | None = None) -> None:
            shutil.rmtree(work / "out", ignore_errors=True)
            extra = {"source_headers": headers} if headers is not None else {}
            build_job_outputs(job_id=1, source_paths=paths, prediction=pred, predictor=p, settings=settings,
                              out_dir=work / "out", order=refs, **extra)

        build()  # warm-up (dciodvfy, lazy imports)
        out["build_gc"] = _timed(build)
        gc.disable()
        try:
            out["build_nogc"] = _timed(build)
            if hasattr(dicom_io, "load_series_headers"):
                _, _, headers = dicom_io.load_series_headers(paths)
                out["build_headers"] = _timed(lambda: build(headers))
        finally:
            gc.enable()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default="", help="git revision to time in the same run")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # child process: one round
    ap.add_argument("--publish", action="store_true")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.slices)))
        return 0

    trees: dict[str, Path | None] = {"current": None}
    if args.baseline:
        trees[args.baseline] = export_tree(args.baseline, ("pacs_node", "worker", "alembic"))
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, src in trees.items():
            env = {**os.environ, "PYTHONPATH": str(src)} if src is not None else dict(os.environ)
            res = subprocess.run([sys.executable, __file__, "--measure", "--slices", str(args.slices)],
                                 capture_output=True, text=True, env=env, cwd=REPO, check=True)
            rounds[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r} {name}: {rounds[name][-1]}", file=sys.stderr, flush=True)
    summary = {name: {k: round(median(x[k] for x in rs), 3) for k in rs[0]} for name, rs in rounds.items()}
    payload = {"benchmark": "engine-steps", "command": "python benchmarks/engine_steps.py " + " ".join(argv or sys.argv[1:]),
               "machine": machine_info(), "slices": args.slices, "median_s": summary, "rounds": rounds}
    path = write_json("engine-steps.json", payload)
    if args.publish:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, RESULTS_DIR / path.name)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
