"""Engine subcommands for the ``pacs-node`` CLI: ``train``, ``calibrate``, ``evaluate``.

``pacs_node.cli`` discovers :func:`register` through the ``pacs_node.commands``
entry-point group, configures logging and calls ``args.func(args)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "cmd_train", "cmd_calibrate", "cmd_evaluate"]

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Any:
    from worker.engine.settings import load_engine_settings

    return load_engine_settings(getattr(args, "config", None))


def _threads(args: argparse.Namespace, settings: Any) -> None:
    from worker.engine.train import set_threads

    set_threads(getattr(args, "threads", None) or settings.num_threads or None)


def _add_data(p: argparse.ArgumentParser, masks: bool = False) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="use the built-in synthetic phantoms")
    src.add_argument("--data", type=Path, metavar="DIR", help="directory of DICOM series")
    if masks:
        p.add_argument("--masks", type=Path, metavar="DIR",
                       help="ground-truth masks named <SeriesInstanceUID>.(nii.gz|nii|mha|nrrd); series without one count as normal")
    p.add_argument("--device", default=None, help="auto, cpu, cuda (default: engine.device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: engine.num_threads)")
    p.add_argument("--seed", type=int, default=0)


def register(subparsers: Any) -> None:
    """Add the ``train``, ``calibrate`` and ``evaluate`` subcommands.

    Parameters
    ----------
    subparsers:
        The object returned by ``ArgumentParser.add_subparsers()``.
    """
    p = subparsers.add_parser("train", help="train an anomaly model on normal images",
                              description="Train a U-Net on normal studies, calibrate it on held-out normals, save one checkpoint.")
    _add_data(p)
    p.add_argument("--out", type=Path, required=True, metavar="MODEL", help="checkpoint file to write")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for training")
    p.add_argument("--objective", choices=["dae", "ae"], default=None)
    p.add_argument("--loss", choices=["mse", "l1"], default=None)
    p.add_argument("--local-prob", type=float, default=None,
                   help="share of training samples that also get local corruptions (0 = coarse noise only)")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--base", type=int, default=None, help="channels of the first U-Net level")
    p.add_argument("--norm", choices=["group", "instance", "none"], default=None)
    p.add_argument("--context", type=int, default=None, help="neighbour slices per side (2.5D)")
    p.add_argument("--size", type=int, default=None, help="model in-plane size (square)")
    p.add_argument("--scoring", choices=["residual", "ssim", "combined", "auto"], default="auto",
                   help="auto: choose residual/combined on synthetic validation anomalies (synthetic only)")
    _combine_args(p)
    p.add_argument("--fast", action="store_true", help="quick, weaker synthetic build for smoke tests")
    p.add_argument("--resume", action="store_true", help="continue from MODEL.state")
    p.add_argument("--name", default=None, help="model name stored in the checkpoint")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("calibrate", help="calibrate the anomaly threshold on normal studies")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL")
    _add_data(p)
    p.add_argument("--target-fpr", type=float, default=None)
    p.add_argument("--method", choices=["residual", "ssim", "combined"], default=None)
    p.add_argument("--polarity", choices=["bright", "dark", "both"], default=None)
    _combine_args(p)
    p.add_argument("--out", type=Path, default=None, metavar="MODEL", help="write here instead of updating MODEL")
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser("evaluate", help="evaluate a model and the baselines against ground truth")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL")
    _add_data(p, masks=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write ROC/PR curves and overlays")
    p.add_argument("--n-abnormal", type=int, default=24, help="synthetic abnormal test studies")
    p.add_argument("--n-normal", type=int, default=6, help="synthetic normal test studies")
    p.set_defaults(func=cmd_evaluate)


def _split(vols: list[Any], seed: int) -> tuple[list[Any], list[Any], list[Any]]:
    import numpy as np

    if len(vols) < 3:
        raise ValueError(f"need at least 3 normal series (training, validation, calibration), found {len(vols)}")
    order = np.random.default_rng(seed).permutation(len(vols))
    n_hold = max(1, round(0.15 * len(vols)))
    val = [vols[i] for i in order[:n_hold]]
    cal = [vols[i] for i in order[n_hold:2 * n_hold]]
    tr = [vols[i] for i in order[2 * n_hold:]]
    if not tr:
        raise ValueError("not enough series left for training")
    return tr, val, cal


def cmd_train(args: argparse.Namespace) -> int:
    """Handle ``pacs-node train``; returns the exit code."""
    from dataclasses import replace

    from worker.engine.demo import demo_config, train_synthetic
    from worker.engine.dicom_io import SeriesError, load_directory
    from worker.engine.pipeline import fit, save_predictor

    try:
        st = _settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _threads(args, st)
    device = args.device or st.device
    cfg = demo_config(args.fast)
    t = cfg.train
    over = {k: v for k, v in {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size,
                              "lr": args.lr, "max_minutes": args.max_minutes, "objective": args.objective,
                              "loss": args.loss, "local_prob": args.local_prob}.items() if v is not None}
    cfg.train = replace(t, seed=args.seed, amp=st.amp, **over)
    cfg.unet = replace(cfg.unet, **{k: v for k, v in {"depth": args.depth, "base": args.base, "norm": args.norm}.items() if v is not None})
    pp = {"ct_window": tuple(st.ct_window), "mr_method": st.mr_method}
    if args.context is not None:
        pp["context"] = args.context
    if args.size is not None:
        pp["size"] = (args.size, args.size)
    cfg.preprocess = replace(cfg.preprocess, **pp)
    cfg.scoring = replace(cfg.scoring, target_fpr=st.target_fpr, **_combine_over(args))
    scoring = args.scoring if args.scoring != "auto" else (st.scoring or "auto")
    if scoring != "auto":
        cfg.scoring = replace(cfg.scoring, method=scoring)
        cfg.n_select = 0
    if args.size is not None and args.size % (2 ** (cfg.unet.depth - 1)):
        print(f"error: --size must be divisible by {2 ** (cfg.unet.depth - 1)}", file=sys.stderr)
        return 2
    progress = st.progress and sys.stderr.isatty()
    t0 = time.monotonic()
    try:
        if args.synthetic:
            train_synthetic(args.out, cfg, device=device, progress=progress, resume=args.resume,
                            model_name=args.name or "synthetic-demo")
        else:
            vols = load_directory(args.data)
            tr, val, cal = _split(vols, args.seed)
            pred = fit(tr, val, cal, ucfg=cfg.unet, tcfg=cfg.train, pcfg=cfg.preprocess, scfg=cfg.scoring,
                       model_name=args.name or f"local-{args.data.name}",
                       data_description=f"{len(tr)} local normal series ({', '.join(sorted({v.modality for v in vols}))})",
                       device=device, state_path=args.out.with_name(args.out.name + ".state"),
                       resume=args.resume, progress=progress)
            save_predictor(pred, args.out)
    except (SeriesError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"model written to {args.out} ({time.monotonic() - t0:.0f} s)")
    return 0


COMBINE_WITH_CHOICES = ("intensity", "pixel_zscore", "feature")


def _combine_args(p: argparse.ArgumentParser) -> None:
    # = worker.engine.scoring.COMBINE_WITH, spelled out so that building the
    # parser does not import scipy (tested equal)
    p.add_argument("--combine-with", choices=list(COMBINE_WITH_CHOICES), default=None,
                   help="second term of the 'combined' scoring method (feature = feature-space residual)")
    p.add_argument("--combine-weight", type=float, default=None, help="weight of that term")


def _combine_over(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in {"combine_with": args.combine_with, "combine_weight": args.combine_weight}.items()
            if v is not None}


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Handle ``pacs-node calibrate``; returns the exit code."""
    from worker.engine.calibrate import calibrate
    from worker.engine.checkpoint import CheckpointError
    from worker.engine.demo import synthetic_normals
    from worker.engine.dicom_io import SeriesError, load_directory
    from worker.engine.pipeline import save_predictor
    from worker.engine.predictor import Predictor

    try:
        st = _settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _threads(args, st)
    try:
        pred = Predictor.from_checkpoint(args.model, device=args.device or st.device, batch_size=st.batch_size, amp=st.amp)
        shape = None
        if args.synthetic:
            from worker.engine.synthetic import DEFAULT_SHAPE

            shape = DEFAULT_SHAPE
            normals = synthetic_normals("calib", 10, shape)
            desc = "synthetic normal phantoms (calibration seeds)"
        else:
            normals = load_directory(args.data)
            desc = f"{len(normals)} local normal series"
        info = calibrate(pred, normals, method=args.method or (st.scoring or None),
                         target_fpr=args.target_fpr if args.target_fpr is not None else st.target_fpr,
                         polarity=args.polarity, description=desc, **_combine_over(args))
        save_predictor(pred, args.out or args.model)
    except (CheckpointError, SeriesError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"threshold": info["scoring"]["threshold"], "method": info["scoring"]["method"],
                      "target_fpr": info["scoring"]["target_fpr"], "n_volumes": len(normals)}))
    return 0


def _read_mask(path: Path, vol: Any) -> Any:
    import numpy as np
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    ref = vol.to_sitk()
    same = img.GetSize() == ref.GetSize() and np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-3) and np.allclose(
        img.GetOrigin(), ref.GetOrigin(), atol=1e-2)
    if not same:
        img = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(img) > 0


def _real_cases(data: Path, masks: Path | None) -> list[Any]:
    from worker.engine.dicom_io import load_directory

    cases = []
    for vol in load_directory(data):
        uid = vol.meta.get("series_uid", "")
        mask = None
        if masks is not None:
            for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
                f = masks / f"{uid}{ext}"
                if f.is_file():
                    mask = _read_mask(f, vol)
                    break
        cases.append((vol, mask))
    return cases


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Handle ``pacs-node evaluate``; returns the exit code."""
    from worker.engine.checkpoint import CheckpointError
    from worker.engine.demo import synthetic_test_set
    from worker.engine.dicom_io import SeriesError
    from worker.engine.evaluate import evaluate
    from worker.engine.predictor import Predictor

    try:
        st = _settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.data is not None and args.masks is None:
        print("error: --data needs --masks", file=sys.stderr)
        return 2
    _threads(args, st)
    try:
        pred = Predictor.from_checkpoint(args.model, device=args.device or st.device, batch_size=st.batch_size, amp=st.amp)
        cases = synthetic_test_set(args.n_abnormal, args.n_normal) if args.synthetic else _real_cases(args.data, args.masks)
        res = evaluate(pred, cases, plots_dir=args.plots)
    except (CheckpointError, SeriesError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    res["model"] = {"name": pred.model_name, "version": pred.model_version, "sha256": pred.checksum}
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        rows = [("U-Net (" + res["method"] + ")", res)] + [(f"{n} ({r['polarity']})", r) for n, r in res["baselines"].items()]
        cols = ("auroc", "auprc", "dice", "sensitivity", "specificity", "precision", "study_auroc")
        print(f"{'method':28s} " + " ".join(f"{c:>11s}" for c in cols))
        for name, r in rows:
            print(f"{name:28s} " + " ".join(f"{r[c]:11.4f}" if r[c] is not None else f"{'-':>11s}" for c in cols))
    return 0
