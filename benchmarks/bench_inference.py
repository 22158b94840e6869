"""Inference: the production predictor versus the raw U-Net forward pass, same process.

Raw model variants (the checkpoint's U-Net alone, random smooth inputs of the
model's shape, ``torch.inference_mode()``): fp32 in contiguous and
channels_last memory format, bf16 autocast (when it runs; whether the CPU has
native bf16 is recorded), batch sizes, and ``torch.compile``. GFLOP/s come
from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs of one slice's
forward × slices/s).

The production path is ``Predictor.predict(volume)`` on a synthetic MR study
read from DICOM files (preprocessing, batched forward, scoring, 3D
post-processing, findings), followed by building and validating the outputs
(SEG, fractional map, SR: ``worker.outputs.build.build_job_outputs``). Each
round measures the best raw variant and the predictor back to back, so the
ratio predictor ÷ raw is taken inside one round (the machine is shared).

    python benchmarks/bench_inference.py [--slices 200] [--size 256] [--rounds 3] [--no-compile] [--publish]

On CUDA when a GPU is present (``--device auto``), else on the CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, md_table, median, mr_volume, write_json, write_mr_series  # noqa: E402
from machine import machine_info  # noqa: E402
from paths import IMG_DIR, OUT_DIR, REPO, RESULTS_DIR  # noqa: E402

TARGET = 0.90


def _flops_per_slice(model: torch.nn.Module, shape: tuple[int, int, int], device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand((1, *shape), device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(x)
    return float(fc.get_total_flops())


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _runner(model: torch.nn.Module, x: torch.Tensor, n_slices: int, amp: torch.dtype | None,
            device: torch.device) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for _ in range(max(1, n_slices // x.shape[0])):
                model(x)
    return run


def raw_variants(model: torch.nn.Module, shape: tuple[int, int, int], device: torch.device, batches: list[int],
                 compile_model: bool) -> dict[str, dict[str, Any]]:
    """Build the variants: name -> {model, amp, memory_format, batch}."""
    import copy

    from worker.engine.train import cpu_has_bf16

    contiguous = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    out: dict[str, dict[str, Any]] = {}
    for b in batches:
        out[f"fp32 contiguous b{b}"] = {"model": contiguous, "amp": None, "cl": False, "batch": b}
        out[f"fp32 channels_last b{b}"] = {"model": cl, "amp": None, "cl": True, "batch": b}
    bmax = max(batches)
    bf16_ok = device.type == "cuda" or cpu_has_bf16()
    out[f"bf16 autocast channels_last b{bmax}"] = {"model": cl, "amp": torch.bfloat16, "cl": True, "batch": bmax,
                                                  "native_bf16": bf16_ok}
    if compile_model:
        try:
            comp = torch.compile(copy.deepcopy(cl))
            x = torch.rand((bmax, *shape), device=device).contiguous(memory_format=torch.channels_last)
            t = time.perf_counter()
            with torch.inference_mode():
                comp(x)
            out[f"fp32 channels_last torch.compile b{bmax}"] = {"model": comp, "amp": None, "cl": True, "batch": bmax,
                                                               "compile_s": round(time.perf_counter() - t, 1)}
        except Exception as exc:  # noqa: BLE001 - record why compile is unavailable
            out["torch.compile"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


def measure_raw(v: dict[str, Any], shape: tuple[int, int, int], device: torch.device, n_slices: int) -> float:
    """Slices/s of one variant (one warm-up call, then ``n_slices`` slices)."""
    x = torch.nn.functional.avg_pool2d(torch.rand((v["batch"], *shape)), 5, 1, 2).to(device)
    if v["cl"]:
        x = x.contiguous(memory_format=torch.channels_last)
    run = _runner(v["model"], x, n_slices, v["amp"], device)
    _runner(v["model"], x, v["batch"], v["amp"], device)()  # warm-up
    n = max(1, n_slices // v["batch"]) * v["batch"]
    return n / _timed(run, device)


def production(predictor: Any, paths: list[Path], settings: Any, work: Path) -> dict[str, float]:
    """Load the series, predict, build + validate outputs; seconds per stage."""
    from worker.engine.dicom_io import load_series_refs
    from worker.outputs.build import build_job_outputs

    t0 = time.perf_counter()
    vol, refs = load_series_refs(paths)
    t1 = time.perf_counter()
    pred = predictor.predict(vol)
    t2 = time.perf_counter()
    out_dir = work / "outputs"
    shutil.rmtree(out_dir, ignore_errors=True)
    build_job_outputs(job_id=1, source_paths=paths, prediction=pred, predictor=predictor, settings=settings,
                      out_dir=out_dir, order=refs)
    t3 = time.perf_counter()
    return {"load": t1 - t0, "predict": t2 - t1, **{k: float(v) for k, v in pred.timings.items()},
            "build_outputs": t3 - t2, "findings": float(len(pred.findings))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "pacs_node" / "data" / "demo-model.pt")
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 slices of 128 x 128, 1 round, no compile")
    ap.add_argument("--publish", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.slices, args.size, args.rounds, args.no_compile = 40, 128, 1, True

    from pacs_node.config import load_settings
    from worker.engine.predictor import Predictor
    from worker.engine.train import cpu_has_bf16, set_threads

    threads = set_threads(None)
    predictor = Predictor.from_checkpoint(args.model, device=args.device)
    device = predictor.device
    shape = (predictor.model.cfg.in_channels, *predictor.preprocess_cfg.size)
    flops = _flops_per_slice(predictor.model, shape, device)
    log(f"model {args.model.name}: input {shape}, {flops / 1e9:.3f} GFLOP per slice, device {device}, {threads} threads")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-inference-", dir=OUT_DIR))
    spacing = (1.0, 0.9, 0.9)
    volume = mr_volume(args.slices, size=args.size, spacing=spacing)
    _, paths = write_mr_series(volume, work / "series", spacing=spacing)
    settings = load_settings(None)

    batches = [int(b) for b in args.batches.split(",")]
    variants = raw_variants(predictor.model, shape, device, batches, not args.no_compile)
    n_raw = max(256, max(batches) * 4)
    sweep: dict[str, list[float]] = {k: [] for k, v in variants.items() if "model" in v}
    for name in sweep:
        sweep[name].append(measure_raw(variants[name], shape, device, n_raw))
        log(f"raw {name}: {sweep[name][-1]:.1f} slices/s")
    best = max(sweep, key=lambda k: sweep[k][0])
    log(f"best raw variant: {best}")

    rounds: list[dict[str, Any]] = []
    production(predictor, paths, settings, work)  # warm-up (caches, dciodvfy, lazy imports)
    for r in range(args.rounds):
        raw_sps = measure_raw(variants[best], shape, device, n_raw)
        prod = production(predictor, paths, settings, work)
        pred_sps = args.slices / prod["predict"]
        rounds.append({"raw_best_slices_per_s": raw_sps, "predictor_slices_per_s": pred_sps,
                       "ratio": pred_sps / raw_sps, "stages": prod,
                       "with_outputs_slices_per_s": args.slices / (prod["predict"] + prod["build_outputs"])})
        for name in sweep:
            if name != best:
                sweep[name].append(measure_raw(variants[name], shape, device, n_raw))
        sweep[best].append(raw_sps)
        log(f"round {r}: raw {raw_sps:.1f} slices/s, predictor {pred_sps:.1f} slices/s, ratio {pred_sps / raw_sps:.3f}, "
            f"stages {({k: round(v, 2) for k, v in prod.items()})}")
    shutil.rmtree(work, ignore_errors=True)

    table = []
    for name, xs in sweep.items():
        sps = median(xs)
        table.append({"variant": name, "slices_per_s": round(sps, 1), "gflops": round(sps * flops / 1e9, 2),
                      **{k: v for k, v in variants[name].items() if k in ("native_bf16", "compile_s")}})
    stages = {k: round(median([r["stages"][k] for r in rounds]), 3) for k in rounds[0]["stages"]}
    predict_s = stages["predict"]
    total = predict_s + stages["build_outputs"]
    payload = {
        "benchmark": "inference",
        "command": "python benchmarks/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "model": {"path": str(args.model), "name": predictor.model_name, "version": predictor.model_version,
                  "input": list(shape), "gflop_per_slice": flops / 1e9, "params": sum(p.numel() for p in predictor.model.parameters())},
        "device": str(device), "threads": threads, "cpu_native_bf16": cpu_has_bf16(),
        "predictor_amp": str(predictor.dtype), "predictor_batch": predictor.batch_size,
        "study": {"slices": args.slices, "size": args.size, "spacing": list(spacing)},
        "raw": table, "best_raw": best, "compile": variants.get("torch.compile"),
        "rounds": rounds,
        "predictor": {
            "slices_per_s": round(median([r["predictor_slices_per_s"] for r in rounds]), 1),
            "gflops_forward_equivalent": round(median([r["predictor_slices_per_s"] for r in rounds]) * flops / 1e9, 2),
            "with_outputs_slices_per_s": round(median([r["with_outputs_slices_per_s"] for r in rounds]), 1),
            "stages_s": stages,
            "share_of_predict_plus_build": {
                "preprocess": round(stages["preprocess"] / total, 3),
                "forward": round(stages["inference"] / total, 3),
                "postprocess": round(stages["postprocess"] / total, 3),
                "build_outputs": round(stages["build_outputs"] / total, 3),
            },
        },
        "ratio_predictor_vs_best_raw": {"median": round(median([r["ratio"] for r in rounds]), 3),
                                        "min": round(min(r["ratio"] for r in rounds), 3),
                                        "max": round(max(r["ratio"] for r in rounds), 3), "target": TARGET},
    }
    path = write_json("inference.json", payload)
    png = OUT_DIR / "inference.png"
    plot(payload, png)
    print(md_table(["variant", "slices/s", "GFLOP/s"], [[t["variant"], t["slices_per_s"], t["gflops"]] for t in table]))
    print(f"predictor: {payload['predictor']['slices_per_s']} slices/s; ratio {payload['ratio_predictor_vs_best_raw']}")
    print(f"stages (median s): {stages}")
    print(f"JSON: {path}\nPNG: {png}")
    if args.publish:
        shutil.copy(path, RESULTS_DIR / "inference.json")
        shutil.copy(png, IMG_DIR / "bench-inference.png")
        print(f"published: {RESULTS_DIR / 'inference.json'}, {IMG_DIR / 'bench-inference.png'}")
    return 0


def plot(payload: dict[str, Any], png: Path) -> None:
    """Slices/s per raw variant and the predictor; the predictor's time split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
    names = [t["variant"] for t in payload["raw"]] + ["predictor.predict", "predict + outputs"]
    vals = [t["slices_per_s"] for t in payload["raw"]] + [payload["predictor"]["slices_per_s"],
                                                          payload["predictor"]["with_outputs_slices_per_s"]]
    colors = ["#7a9cc6"] * len(payload["raw"]) + ["#d9822b", "#a0522d"]
    a.barh(names, vals, color=colors)
    a.set_xlabel("slices / s")
    a.set_xscale("log")
    a.set_title(f"U-Net {tuple(payload['model']['input'])}, {payload['model']['gflop_per_slice']:.2f} GFLOP/slice, "
                f"{payload['device']}")
    st = payload["predictor"]["stages_s"]
    bottom = 0.0
    for k, c in (("preprocess", "#8fbc8f"), ("inference", "#4682b4"), ("postprocess", "#daa520"),
                 ("build_outputs", "#cd5c5c")):
        b.bar([0], [st[k]], bottom=bottom, color=c, label=k)
        bottom += st[k]
    b.set_xticks([0], [f"{payload['study']['slices']} × {payload['study']['size']}²"])
    b.set_ylabel("seconds (median)")
    b.legend(fontsize=8)
    b.set_title("predict + outputs")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
