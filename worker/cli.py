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

__all__ = ["register", "cmd_train", "cmd_calibrate", "cmd_evaluate", "DEMO_DEFAULTS", "DEMO_FAST_DEFAULTS",
           "ANATOMY_DEFAULTS", "ANATOMY_FAST_DEFAULTS"]

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Any:
    """The validated ``[engine]`` settings; logging is configured from ``[logging]`` / ``--log-level``
    on stderr, so training progress reaches a piped log (stdout stays for ``--json``)."""
    from pacs_node.cli.common import load
    from worker.engine.settings import load_engine_settings

    return load_engine_settings(raw=load(args).engine)


def _threads(args: argparse.Namespace, settings: Any) -> None:
    from worker.engine.train import set_threads

    set_threads(getattr(args, "threads", None) or settings.num_threads or None)


# = what worker.engine.demo.demo_config() gives (DEMO_FAST_DEFAULTS: the values
# demo_config(fast=True) changes), spelled out so that building the parser
# does not import torch (tested equal)
DEMO_DEFAULTS: dict[str, Any] = {
    "epochs": 16, "steps_per_epoch": 100, "batch_size": 16, "lr": 2e-3, "objective": "dae", "loss": "mse",
    "local_prob": 0.5, "depth": 4, "base": 16, "norm": "group", "context": 1, "size": 64,
    "combine_with": "intensity", "combine_weight": 0.5,
}
DEMO_FAST_DEFAULTS: dict[str, Any] = {"epochs": 3, "steps_per_epoch": 40}
# = what worker.engine.headdemo.anatomy_config() gives: the real-anatomy demo,
# also the configuration of --data (tested equal)
ANATOMY_DEFAULTS: dict[str, Any] = {
    "epochs": 30, "steps_per_epoch": 100, "batch_size": 16, "lr": 2e-3, "objective": "dae", "loss": "mse",
    "local_prob": 0.7, "depth": 5, "base": 16, "norm": "group", "context": 1, "size": 128,
    "combine_with": "intensity", "combine_weight": 0.5,
}
ANATOMY_FAST_DEFAULTS: dict[str, Any] = {"epochs": 2, "steps_per_epoch": 10, "depth": 4, "base": 8}

MIN_TRAIN, MIN_VAL, MIN_CAL = 2, 1, 1

SCORING_AUTO_HELP = "auto: choose between residual and combined on held-out normals with injected synthetic lesions"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` to every option, except flags, options without a
    value (``None``: the help says where the value comes from) and help texts
    that state their default themselves."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action) or text


def _engine_defaults() -> dict[str, Any]:
    # pydantic only (already imported by the node CLI); no torch, no scipy
    from worker.engine.settings import EngineSettings

    return {k: f.default for k, f in EngineSettings.model_fields.items()}


def _demo(key: str) -> str:
    """``(default: ...)`` text of a training option that defaults to the demo configurations."""
    fast = ""
    if key in ANATOMY_FAST_DEFAULTS or key in DEMO_FAST_DEFAULTS:
        fast = (f"; with --fast {ANATOMY_FAST_DEFAULTS.get(key, ANATOMY_DEFAULTS[key])} (--anatomy) / "
                f"{DEMO_FAST_DEFAULTS.get(key, DEMO_DEFAULTS[key])} (--synthetic)")
    if ANATOMY_DEFAULTS[key] == DEMO_DEFAULTS[key]:
        return f"(default: {ANATOMY_DEFAULTS[key]}{fast})"
    return f"(default: {ANATOMY_DEFAULTS[key]} with --anatomy or --data, {DEMO_DEFAULTS[key]} with --synthetic{fast})"


def _add_data(p: argparse.ArgumentParser, eng: dict[str, Any], *, masks: bool = False,
              seed_help: str = "random seed") -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--anatomy", action="store_true",
                     help="normal heads generated from the MNI ICBM152 2009 template that nilearn ships (the demo "
                          "model's data; with lesions for evaluate)")
    src.add_argument("--synthetic", action="store_true", help="geometric head phantoms (small and fast: tests only)")
    src.add_argument("--data", type=Path, metavar="DIR", help="directory of DICOM series")
    if masks:
        p.add_argument("--masks", type=Path, metavar="DIR",
                       help="ground-truth masks named <SeriesInstanceUID>.(nii.gz|nii|mha|nrrd); series without one "
                            "count as normal (default: none; required with --data, unused with --synthetic)")
    p.add_argument("--device", default=None,
                   help=f"auto, cpu, cuda, cuda:N (default: [engine] device, {eng['device']!r} unless configured)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default: [engine] num_threads, {eng['num_threads']} unless configured; "
                        "0 = $PACS_NODE_THREADS, else all cores)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)


def register(subparsers: Any) -> None:
    """Add the ``train``, ``calibrate`` and ``evaluate`` subcommands.

    Building the parser imports neither torch nor scipy: the defaults the help
    quotes come from :class:`~worker.engine.settings.EngineSettings` and
    from :data:`DEMO_DEFAULTS`.

    Parameters
    ----------
    subparsers:
        The object returned by ``ArgumentParser.add_subparsers()``.
    """
    eng = _engine_defaults()
    p = subparsers.add_parser("train", help="train an anomaly model on normal images", formatter_class=_HelpFormatter,
                              description="Train a U-Net on normal studies, calibrate it on held-out normals, save one "
                                          "checkpoint. Training length counts epochs and steps, never seconds.")
    _add_data(p, eng, seed_help="seed of the training / validation / calibration split of --data and of training")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL", help="checkpoint file to write")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs {_demo('epochs')}")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help=f"batches per epoch {_demo('steps_per_epoch')}")
    p.add_argument("--batch-size", type=int, default=None, help=f"slices per training batch {_demo('batch_size')}")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate {_demo('lr')}")
    p.add_argument("--objective", choices=["dae", "ae"], default=None,
                   help=f"dae = denoising autoencoder, ae = plain autoencoder {_demo('objective')}")
    p.add_argument("--loss", choices=["mse", "l1"], default=None, help=f"reconstruction loss {_demo('loss')}")
    p.add_argument("--local-prob", type=float, default=None,
                   help="share of training samples that also get local corruptions, 0 = coarse noise only "
                        f"{_demo('local_prob')}")
    p.add_argument("--depth", type=int, default=None, help=f"U-Net resolution levels {_demo('depth')}")
    p.add_argument("--base", type=int, default=None, help=f"channels of the first U-Net level {_demo('base')}")
    p.add_argument("--norm", choices=["group", "instance", "none"], default=None,
                   help=f"normalisation layers {_demo('norm')}")
    p.add_argument("--context", type=int, default=None, help=f"neighbour slices per side, 2.5D {_demo('context')}")
    p.add_argument("--size", type=int, default=None,
                   help=f"model in-plane size (square, divisible by 2^(depth-1)) {_demo('size')}")
    p.add_argument("--scoring", choices=["residual", "ssim", "combined", "auto"], default="auto",
                   help=f"scoring method; {SCORING_AUTO_HELP}; a non-empty [engine] scoring replaces auto")
    _combine_args(p, demo=True)
    p.add_argument("--fast", action="store_true",
                   help="quick, weaker build for smoke tests (fewer epochs and steps; fewer generated volumes)")
    p.add_argument("--region", choices=["brain", "head"], default="brain",
                   help="--data: score the brain (masked by the brain-mask network of --brain-mask) or the whole "
                        "head foreground (non-brain data)")
    p.add_argument("--brain-mask", type=Path, default=None, metavar="MODEL",
                   help="--data with --region brain: checkpoint whose brain-mask network to use (default: the "
                        "bundled demo model, pacs_node/data/demo-model.pt)")
    p.add_argument("--resume", action="store_true", help="continue from MODEL.state")
    p.add_argument("--name", default=None,
                   help="model name stored in the checkpoint (default: anatomy-demo with --anatomy, synthetic-demo "
                        "with --synthetic, local-<DIR name> with --data)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("calibrate", help="calibrate the anomaly threshold on normal studies",
                              formatter_class=_HelpFormatter,
                              description="Set the threshold of every scoring method and baseline on normal studies.")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL", help="checkpoint to calibrate")
    _add_data(p, eng, seed_help="unused: the synthetic calibration phantoms have fixed seeds")
    p.add_argument("--target-fpr", type=float, default=None,
                   help="voxel false-positive rate on the normals the threshold is set at "
                        f"(default: [engine] target_fpr, {eng['target_fpr']} unless configured)")
    p.add_argument("--method", choices=["residual", "ssim", "combined"], default=None,
                   help="scoring method (default: [engine] scoring when set, else the checkpoint's)")
    p.add_argument("--polarity", choices=["bright", "dark", "both"], default=None,
                   help="intensity tail of the intensity / pixel_zscore terms (default: the checkpoint's)")
    _combine_args(p, demo=False)
    p.add_argument("--out", type=Path, default=None, metavar="MODEL",
                   help="write here instead of updating MODEL (default: update MODEL in place)")
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser("evaluate", help="evaluate a model and the baselines against ground truth",
                              formatter_class=_HelpFormatter,
                              description="Voxel, study and normal-study false-positive metrics of the model and of "
                                          "the baselines.")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL", help="checkpoint to evaluate")
    _add_data(p, eng, masks=True, seed_help="unused: the synthetic test set has fixed seeds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="write ROC/PR curves and overlays there (default: no plots)")
    p.add_argument("--n-abnormal", type=int, default=None,
                   help="abnormal test studies of --anatomy / --synthetic (default: 30 / 24)")
    p.add_argument("--n-normal", type=int, default=None,
                   help="normal test studies of --anatomy / --synthetic (default: 20 / 6)")
    p.set_defaults(func=cmd_evaluate)


def _split(vols: list[Any], seed: int) -> tuple[list[Any], list[Any], list[Any]]:
    """Split normal series into training, validation and calibration sets.

    About 15 % of the series each go to validation and calibration (at least
    one each), the rest, at least two, to training.

    Parameters
    ----------
    vols:
        The normal series.
    seed:
        Seed of the random assignment.

    Returns
    -------
    tuple
        ``(training, validation, calibration)``, disjoint, together ``vols``.

    Raises
    ------
    ValueError
        With fewer than ``MIN_TRAIN + MIN_VAL + MIN_CAL`` (4) series; the
        message names the counts needed and found.
    """
    import numpy as np

    n, need = len(vols), MIN_TRAIN + MIN_VAL + MIN_CAL
    if n < need:
        raise ValueError(f"training on --data needs at least {need} normal series ({MIN_TRAIN} training, "
                         f"{MIN_VAL} validation, {MIN_CAL} calibration), found {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = min(max(MIN_VAL, MIN_CAL, round(0.15 * n)), (n - MIN_TRAIN) // 2)
    val = [vols[i] for i in order[:n_hold]]
    cal = [vols[i] for i in order[n_hold:2 * n_hold]]
    tr = [vols[i] for i in order[2 * n_hold:]]
    return tr, val, cal


def cmd_train(args: argparse.Namespace) -> int:
    """Handle ``pacs-node train``; returns the exit code."""
    from dataclasses import replace

    from worker.engine.checkpoint import CheckpointError
    from worker.engine.demo import demo_config, train_synthetic
    from worker.engine.dicom_io import SeriesError, load_directory
    from worker.engine.headdemo import anatomy_config, train_anatomy
    from worker.engine.pipeline import fit, save_predictor

    try:
        st = _settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _threads(args, st)
    device = args.device or st.device
    cfg: Any = demo_config(args.fast) if args.synthetic else anatomy_config(args.fast)
    over = {k: v for k, v in {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size,
                              "lr": args.lr, "objective": args.objective, "loss": args.loss,
                              "local_prob": args.local_prob}.items() if v is not None}
    cfg.train = replace(cfg.train, seed=args.seed, amp=st.amp, **over)
    cfg.unet = replace(cfg.unet, **{k: v for k, v in {"depth": args.depth, "base": args.base, "norm": args.norm}.items() if v is not None})
    pp: dict[str, Any] = {"ct_window": tuple(st.ct_window), "mr_method": st.mr_method}
    if args.context is not None:
        pp["context"] = args.context
    if args.size is not None:
        pp["size"] = (args.size, args.size)
    if args.data is not None and args.region == "head":
        pp.update(region="head", pixel_mm=None)
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
        elif args.anatomy:
            train_anatomy(args.out, cfg, device=device, progress=progress, resume=args.resume,
                          model_name=args.name or "anatomy-demo")
        else:
            vols = load_directory(args.data)
            tr, val, cal = _split(vols, args.seed)
            masker = _brain_masker(args.brain_mask) if cfg.preprocess.region == "brain" else None
            select = _selection_cases(cal, masker, args.seed) if scoring == "auto" else None
            pred = fit(tr, val, cal, ucfg=cfg.unet, tcfg=cfg.train, pcfg=cfg.preprocess, scfg=cfg.scoring,
                       model_name=args.name or f"local-{args.data.name}",
                       data_description=f"{len(tr)} local normal series ({', '.join(sorted({v.modality for v in vols}))})",
                       device=device, state_path=args.out.with_name(args.out.name + ".state"),
                       resume=args.resume, progress=progress, select_cases=select, brain_masker=masker)
            save_predictor(pred, args.out)
    except (SeriesError, ValueError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"model written to {args.out} ({time.monotonic() - t0:.0f} s)")
    return 0


def _brain_masker(path: Path | None) -> Any:
    """The brain-mask network of ``path`` (default: the bundled demo model).

    Raises
    ------
    CheckpointError
        When the checkpoint cannot be read or has no brain-mask network.
    """
    from worker.engine.brainmask import BrainMasker
    from worker.engine.checkpoint import CheckpointError, load_checkpoint

    if path is None:
        path = Path(__file__).resolve().parent.parent / "pacs_node" / "data" / "demo-model.pt"
    ck = load_checkpoint(path)
    try:
        masker = BrainMasker.from_checkpoint_parts(ck.meta, ck.tensors)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: its brain-mask network cannot be loaded: {exc}") from None
    if masker is None:
        raise CheckpointError(f"{path.name} has no brain-mask network; pass --brain-mask MODEL or --region head")
    return masker


def _selection_cases(normals: list[Any], masker: Any, seed: int) -> list[Any]:
    """Held-out real normals with injected lesions, for choosing the scoring method (never the test set)."""
    import numpy as np

    from worker.engine.lesions import inject_into_volume
    from worker.engine.orient import to_axial

    rng = np.random.default_rng([seed, 31_337])
    out = []
    for vol in normals:
        ax, _ = to_axial(vol)
        brain = masker.predict(ax) if masker is not None else None
        out.append(inject_into_volume(ax, brain, rng))
    return out


COMBINE_WITH_CHOICES = ("intensity", "pixel_zscore", "feature")


def _combine_args(p: argparse.ArgumentParser, demo: bool) -> None:
    """``--combine-with`` / ``--combine-weight``, defaulting to the demo configuration (``demo``) or the checkpoint."""
    # = worker.engine.scoring.COMBINE_WITH, spelled out so that building the
    # parser does not import scipy (tested equal)
    def default(key: str) -> str:
        return _demo(key) if demo else "(default: the checkpoint's)"

    p.add_argument("--combine-with", choices=list(COMBINE_WITH_CHOICES), default=None,
                   help="second term of the 'combined' scoring method (feature = feature-space residual) "
                        + default("combine_with"))
    p.add_argument("--combine-weight", type=float, default=None,
                   help="weight of that term " + default("combine_weight"))


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
        if args.anatomy:
            from worker.engine.headdemo import anatomy_config, anatomy_normals

            acfg = anatomy_config()
            normals = anatomy_normals("calib", acfg.n_calib, acfg.subjects)
            desc = "normal heads generated from the MNI template (calibration seeds)"
        elif args.synthetic:
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
    except (CheckpointError, SeriesError, ValueError, FileNotFoundError) as exc:
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
        if args.anatomy:
            from worker.engine.headdemo import anatomy_test_set

            cases = anatomy_test_set(30 if args.n_abnormal is None else args.n_abnormal,
                                     20 if args.n_normal is None else args.n_normal)
        elif args.synthetic:
            cases = synthetic_test_set(24 if args.n_abnormal is None else args.n_abnormal,
                                       6 if args.n_normal is None else args.n_normal)
        else:
            cases = _real_cases(args.data, args.masks)
        res = evaluate(pred, cases, plots_dir=args.plots)
    except (CheckpointError, SeriesError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    res["model"] = {"name": pred.model_name, "version": pred.model_version, "sha256": pred.checksum}
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print(_table(res))
    return 0


TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("auroc", "auroc"), ("auprc", "auprc"), ("dice", "dice"), ("sensitivity", "sensitivity"),
    ("specificity", "specificity"), ("precision", "precision"), ("study_auroc", "study_auroc"),
    ("normal_fp_ml_median", "FP mL med"), ("normal_any_finding_share", "FP normals"),
)


def _table(res: dict[str, Any]) -> str:
    """The text table of ``pacs-node evaluate``: the U-Net, then each baseline, one row each."""
    rows = [("U-Net (" + res["method"] + ")", res)]
    rows += [(f"{n} ({r['polarity']})", r) for n, r in res["baselines"].items()]
    lines = [f"{'method':28s} " + " ".join(f"{h:>11s}" for _, h in TABLE_COLUMNS)]
    for name, r in rows:
        lines.append(f"{name:28s} " + " ".join(f"{r[c]:11.4f}" if r.get(c) is not None else f"{'-':>11s}"
                                              for c, _ in TABLE_COLUMNS))
    lines.append(f"FP mL med: median false-positive volume (mL) per normal study; FP normals: share of normal studies "
                 f"with any finding ({res.get('n_normal', 0)} normal, {res['n_abnormal']} abnormal studies)")
    return "\n".join(lines)
