"""Training on normal images only (denoising or plain autoencoder).

The default objective is the denoising autoencoder of Kascenas et al.: the
input is corrupted with coarse, low-frequency Gaussian noise (drawn on a coarse
grid, upsampled, randomly shifted, applied inside the foreground) and the
network learns to restore the clean normal slice.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from .corruption import ALL_LOCAL_KINDS, LOCAL_KINDS, coarse_noise, local_corruption
from .model import UNet, UNetConfig
from .preprocess import PreprocessConfig, context_stack, context_stride, preprocess
from .volume import Volume

__all__ = ["TrainConfig", "TrainResult", "SliceData", "build_slices", "corrupt", "train", "select_device",
           "amp_dtype", "set_threads"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Training hyper-parameters.

    Attributes
    ----------
    objective:
        ``"dae"`` (denoising, default) or ``"ae"`` (plain autoencoder).
    loss:
        Reconstruction loss, ``"mse"`` or ``"l1"``.
    noise_res:
        Coarse-noise grid sizes; one is drawn per sample.
    noise_std:
        Standard deviation of the coarse noise (normalised intensity units).
    epochs, steps_per_epoch, batch_size:
        Optimisation length; an epoch is ``steps_per_epoch`` batches.
    lr, weight_decay, warmup_steps:
        AdamW with linear warm-up and cosine decay.
    patience:
        Early stopping after this many epochs without validation improvement.
    val_fraction:
        Share of normal volumes held out for validation.
    flip, rotate_deg, scale, intensity_jitter:
        Augmentation: left-right flip, rotation range, scale range and
        multiplicative/additive intensity jitter.
    min_fg_fraction:
        Slices with less foreground are not used for training.
    seed:
        Seed of every random draw. The budget is ``epochs x steps_per_epoch``
        steps, never wall-clock time, so the same seed gives the same model
        on a fast or a loaded machine.
    amp:
        ``"auto"`` (bf16 autocast on CUDA, or on CPUs with native bf16),
        ``"on"`` or ``"off"``.
    local_prob:
        Share of training samples that also get local corruptions
        (:func:`~worker.engine.corruption.local_corruption`: fine-grained
        noise patches, tissue from another slice, local intensity change);
        0 keeps the pure coarse-noise objective.
    local_kinds, local_radius:
        Which local corruptions are drawn and their size range (fraction of
        the image width).
    ema:
        Decay of an exponential moving average of the weights (e.g. 0.995);
        when set, validation, early stopping and the saved model use the
        averaged weights (less run-to-run variance). 0 disables.
    """

    objective: str = "dae"
    loss: str = "mse"
    noise_res: tuple[int, ...] = (8, 16)
    noise_std: float = 0.2
    epochs: int = 20
    steps_per_epoch: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    patience: int = 5
    val_fraction: float = 0.15
    flip: bool = True
    rotate_deg: float = 8.0
    scale: tuple[float, float] = (0.92, 1.08)
    intensity_jitter: tuple[float, float] = (0.15, 0.05)
    min_fg_fraction: float = 0.05
    seed: int = 0
    amp: str = "auto"
    local_prob: float = 0.0
    local_kinds: tuple[str, ...] = LOCAL_KINDS
    local_radius: tuple[float, float] = (0.05, 0.18)
    ema: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d.pop("max_minutes", None)  # wall-clock budgets were removed; old checkpoints still load
        for k in ("noise_res", "scale", "intensity_jitter", "local_kinds", "local_radius"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class SliceData:
    """Training slices on the model grid: inputs ``(N, C, H, W)``, foreground ``(N, H, W)``."""

    x: torch.Tensor
    fg: torch.Tensor


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    model: UNet
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_loss: float = math.inf
    epochs_run: int = 0
    seconds: float = 0.0
    stopped: str = "epochs"


def set_threads(n: int | None = None) -> int:
    """Set torch intra-op threads (entry points only).

    ``n`` falls back to ``$PACS_NODE_THREADS`` then to the CPU count.
    """
    if not n:
        env = os.environ.get("PACS_NODE_THREADS", "")
        n = int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(int(n))
    return int(n)


def select_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(device)``.

    Raises
    ------
    ValueError
        When CUDA is requested but unavailable.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 (AVX512-BF16/AMX) kernels."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private API may move
        return False


def amp_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """Autocast dtype to use, or ``None`` for fp32."""
    if mode == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "on" or (mode == "auto" and cpu_has_bf16()):
        return torch.bfloat16
    return None


def build_slices(volumes: list[Volume], pcfg: PreprocessConfig, min_fg_fraction: float = 0.0,
                 regions: list[np.ndarray] | None = None) -> SliceData:
    """Preprocess volumes and stack their slices with context channels.

    Parameters
    ----------
    volumes:
        Normal volumes (axial).
    pcfg:
        Preprocessing.
    min_fg_fraction:
        Slices with less foreground are left out.
    regions:
        Per volume, the brain mask for ``pcfg.region == "brain"``.

    Raises
    ------
    ValueError
        When no slice qualifies.
    """
    xs, fgs = [], []
    for i, vol in enumerate(volumes):
        pp = preprocess(vol, pcfg, region=regions[i] if regions is not None else None)
        stack = context_stack(pp.image, pcfg.context, context_stride(vol.spacing[0], pcfg.context_mm))
        keep = pp.fg.mean(axis=(1, 2)) >= min_fg_fraction
        xs.append(stack[keep])
        fgs.append(pp.fg[keep])
    if not xs or sum(len(x) for x in xs) == 0:
        raise ValueError("no training slices (all volumes empty?)")
    return SliceData(torch.from_numpy(np.concatenate(xs)).float(), torch.from_numpy(np.concatenate(fgs)))


def corrupt(x: torch.Tensor, fg: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """The denoising objective's corruption: coarse noise, then local corruptions.

    Parameters
    ----------
    x:
        ``(N, C, H, W)`` clean inputs.
    fg:
        ``(N, H, W)`` foreground.
    cfg:
        Uses ``noise_res``, ``noise_std`` and the ``local_*`` settings.
    gen:
        Random generator.

    Returns
    -------
    torch.Tensor
        Corrupted copy of ``x``.
    """
    out = coarse_noise(x, fg, cfg.noise_res, cfg.noise_std, gen)
    if cfg.local_prob > 0:
        out = local_corruption(out, fg, gen, prob=cfg.local_prob, kinds=cfg.local_kinds, radius=cfg.local_radius)
    return out


def _augment(x: torch.Tensor, fg: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    if cfg.flip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        fg = torch.where(flip[:, None, None], fg.flip(-1), fg)
    if cfg.rotate_deg > 0 or cfg.scale != (1.0, 1.0):
        ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(cfg.rotate_deg)
        sc = cfg.scale[0] + torch.rand(n, generator=gen) * (cfg.scale[1] - cfg.scale[0])
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        both = torch.cat([x, fg[:, None].float()], 1)
        both = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x, fg = both[:, :-1], both[:, -1] > 0.5
    a, b = cfg.intensity_jitter
    if a > 0 or b > 0:
        mul = 1 + (torch.rand(n, generator=gen) * 2 - 1) * a
        add = (torch.rand(n, generator=gen) * 2 - 1) * b
        x = torch.where(fg[:, None], x * mul[:, None, None, None] + add[:, None, None, None], x)
    return x.contiguous(), fg


def _loss(model: UNet, inp: torch.Tensor, target: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
          kind: str = "mse") -> torch.Tensor:
    inp = inp.to(device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(inp)
    if kind == "l1":
        return F.l1_loss(out.float(), target.to(device))
    return F.mse_loss(out.float(), target.to(device))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for float tensors; buffers copied."""
    with torch.no_grad():
        for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(decay).add_(m.detach(), alpha=1.0 - decay)
            else:
                e.copy_(m)


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Warm-up then cosine decay over ``total`` steps (a step count: reproducible on any machine)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


def validate(model: UNet, data: SliceData, cfg: TrainConfig, device: torch.device, batch: int = 64) -> float:
    """Mean reconstruction loss on held-out normal slices (fixed-seed corruption)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    c = data.x.shape[1] // 2
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(data.x), batch):
            x, fg = data.x[i:i + batch], data.fg[i:i + batch]
            inp = corrupt(x, fg, cfg, gen) if cfg.objective == "dae" else x
            total += float(_loss(model, inp, x[:, c:c + 1], device, None, cfg.loss)) * len(x)
            count += len(x)
    model.train()
    return total / max(count, 1)


def train(
    train_data: SliceData,
    val_data: SliceData,
    ucfg: UNetConfig,
    cfg: TrainConfig,
    *,
    device: str = "auto",
    state_path: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    max_epochs_this_run: int | None = None,
    log_every: int = 50,
) -> TrainResult:
    """Train a U-Net on normal slices.

    Parameters
    ----------
    train_data, val_data:
        Slices from :func:`build_slices` (disjoint volumes).
    ucfg:
        Architecture.
    cfg:
        Training configuration.
    device:
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    state_path:
        File the training state is written to after every epoch.
    resume:
        Continue from ``state_path`` when it exists.
    progress:
        Show a tqdm progress bar with loss and ETA.
    max_epochs_this_run:
        Stop (as if interrupted) after this many epochs in this call; the
        state file lets a later call with ``resume=True`` continue.
    log_every:
        Steps between progress lines in the log (0: epochs only).

    Returns
    -------
    TrainResult
        The model holding the best validation weights and the history.

    Raises
    ------
    ValueError
        For an unknown objective or inconsistent state file.
    """
    from tqdm.auto import tqdm

    if cfg.objective not in ("dae", "ae"):
        raise ValueError(f"unknown objective {cfg.objective!r} (dae, ae)")
    if cfg.loss not in ("mse", "l1"):
        raise ValueError(f"unknown loss {cfg.loss!r} (mse, l1)")
    unknown = sorted(set(cfg.local_kinds) - set(ALL_LOCAL_KINDS))
    if unknown or not 0.0 <= cfg.local_prob <= 1.0:
        raise ValueError(f"invalid local corruption settings (kinds {unknown}, prob {cfg.local_prob})")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {cfg.ema}")
    dev = select_device(device)
    dtype = amp_dtype(dev, cfg.amp)
    torch.manual_seed(cfg.seed)
    model = UNet(ucfg).to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = copy.deepcopy(model) if cfg.ema > 0 else model
    res = TrainResult(model=model)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start_epoch, stale, elapsed_before = 0, 0, 0.0
    if resume and state_path is not None and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = json.loads(st["config"])
        saved.get("train", {}).pop("max_minutes", None)  # states from before step-only budgets
        if saved != {"unet": ucfg.to_dict(), "train": json.loads(json.dumps(cfg.to_dict()))}:
            raise ValueError("training state was written with a different configuration; refusing to resume")
        model.load_state_dict(st["model"])
        if cfg.ema > 0:
            ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["generator"])
        best_state = st["best_model"]
        start_epoch, stale = int(st["epoch"]), int(st["stale"])
        res.history = json.loads(st["history"])
        res.best_val_loss = float(st["best_val_loss"])
        elapsed_before = float(st["seconds"])
        log.info("resuming at epoch %d", start_epoch + 1)
    c = train_data.x.shape[1] // 2
    t0 = time.monotonic()
    model.train()
    bar = tqdm(total=total, initial=start_epoch * cfg.steps_per_epoch, desc="training", unit="step",
               disable=not progress, dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        run = 0.0
        for step in range(cfg.steps_per_epoch):
            idx = torch.randint(len(train_data.x), (cfg.batch_size,), generator=gen)
            x, fg = _augment(train_data.x[idx], train_data.fg[idx], cfg, gen)
            inp = corrupt(x, fg, cfg, gen) if cfg.objective == "dae" else x
            loss = _loss(model, inp, x[:, c:c + 1], dev, dtype, cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if cfg.ema > 0:
                _ema_update(ema, model, cfg.ema)
            lv = loss.detach().item()
            run = 0.9 * run + 0.1 * lv if step else lv
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{run:.5f}", lr=f"{sched.get_last_lr()[0]:.1e}", refresh=False)
            done = epoch * cfg.steps_per_epoch + step + 1
            if log_every and done % log_every == 0:
                # the log gets the progress too, so a piped run is never silent
                el = elapsed_before + time.monotonic() - t0
                rate = (done - start_epoch * cfg.steps_per_epoch) / max(time.monotonic() - t0, 1e-9)
                log.info("training: step %d/%d loss %.5f lr %.1e, %.0f s, about %.0f s left", done, total, run,
                         sched.get_last_lr()[0], el, (total - done) / max(rate, 1e-9))
        val = validate(ema, val_data, cfg, dev)
        res.history.append({"epoch": epoch + 1, "train_loss": run, "val_loss": val})
        if val < res.best_val_loss:
            res.best_val_loss, stale = val, 0
            best_state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
        else:
            stale += 1
        res.epochs_run = epoch + 1
        seconds = elapsed_before + time.monotonic() - t0
        log.info("epoch %d: train %.5f val %.5f (best %.5f) %.0fs", epoch + 1, run, val, res.best_val_loss, seconds)
        if state_path is not None:
            st = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "best_model": best_state, "epoch": epoch + 1, "stale": stale,
                "history": json.dumps(res.history), "best_val_loss": res.best_val_loss, "seconds": seconds,
                "config": json.dumps({"unet": ucfg.to_dict(), "train": cfg.to_dict()}),
            }
            if cfg.ema > 0:
                st["ema"] = ema.state_dict()
            tmp = state_path.with_name(state_path.name + ".tmp")
            torch.save(st, tmp)
            os.replace(tmp, state_path)
        if stale >= cfg.patience:
            res.stopped = "early_stopping"
            break
        if max_epochs_this_run is not None and epoch + 1 - start_epoch >= max_epochs_this_run and epoch + 1 < cfg.epochs:
            res.stopped = "interrupted"
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    res.seconds = elapsed_before + time.monotonic() - t0
    return res
