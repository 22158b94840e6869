"""Brain extraction with a small U-Net trained on generated heads (SynthStrip-style).

The network never sees a real label: it learns from subjects drawn by
:mod:`.anatomy`, whose brain masks are exact, with the contrast drawn per
tissue at random half of the time (the other half from the four sequences),
so what it learns is the shape of a brain inside a head, not one contrast.
Its weights and settings travel inside the anomaly model's checkpoint
(``tensors["brainnet.*"]`` and ``meta["brain_mask"]``), so no download is
ever needed.

Inference (:meth:`BrainMasker.predict`): the head foreground, percentile
normalisation inside it, every slice resampled to the network's grid (the
series' whole field of view), sigmoid, back to the source grid, then the
largest 3D component with its holes filled slice by slice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .model import UNet, UNetConfig
from .preprocess import (ModelGrid, PreprocessConfig, PreprocessError, _largest_component, fill_holes_2d,
                         foreground_mask, from_model_grid, normalize, to_model_grid)
from .volume import Volume

__all__ = ["BrainMaskConfig", "BrainMasker", "train_brain_masker", "brain_slices"]

log = logging.getLogger(__name__)

PREFIX = "brainnet."


@dataclass
class BrainMaskConfig:
    """Settings of the brain-mask network (stored in the checkpoint)."""

    size: tuple[int, int] = (96, 96)
    arch: dict[str, Any] = field(default_factory=lambda: UNetConfig(in_channels=1, depth=4, base=12).to_dict())
    percentiles: tuple[float, float] = (1.0, 99.0)
    threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BrainMaskConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        for k in ("size", "percentiles"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def network_grid(vol: Volume, size: tuple[int, int]) -> ModelGrid:
    """The network's grid: square pixels, ``size`` of them, covering the larger side of the field of view.

    A rectangular field of view (or a sagittal 3D series read as axial) is
    padded, never stretched, so the head keeps its shape.
    """
    sz, sy, sx = vol.spacing
    _, ny, nx = vol.shape
    px = max(nx * sx / size[1], ny * sy / size[0])
    centre = np.asarray(vol.origin) + vol.direction @ np.array([(nx - 1) / 2.0 * sx, (ny - 1) / 2.0 * sy, 0.0])
    corner = centre - vol.direction @ np.array([(size[1] - 1) / 2.0 * px, (size[0] - 1) / 2.0 * px, 0.0])
    return ModelGrid(spacing=(float(px), float(px), float(sz)), origin=(float(corner[0]), float(corner[1]), float(corner[2])))


def _head_input(vol: Volume, cfg: BrainMaskConfig) -> tuple[np.ndarray, np.ndarray, ModelGrid]:
    """Normalised slices ``(z, 1, H, W)`` on the network grid, the head foreground, and the grid."""
    pcfg = PreprocessConfig(size=cfg.size, mr_percentiles=cfg.percentiles, clip=(0.0, 1.5))
    head = foreground_mask(vol.array, vol.modality, pcfg)
    norm = normalize(vol.array, head, vol.modality, pcfg)
    grid = network_grid(vol, cfg.size)
    img = to_model_grid(vol, norm, cfg.size, linear=True, grid=grid)
    return img[:, None], head, grid


class BrainMasker:
    """A loaded brain-mask network.

    Parameters
    ----------
    model:
        The U-Net with weights.
    cfg:
        Its settings.
    device:
        Torch device.
    """

    def __init__(self, model: UNet, cfg: BrainMaskConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                              device: torch.device | str = "cpu") -> "BrainMasker | None":
        """The masker stored in a checkpoint, or ``None`` when it has none.

        Raises
        ------
        ValueError
            When the stored weights do not fit the stored architecture.
        """
        if "brain_mask" not in meta:
            return None
        cfg = BrainMaskConfig.from_dict(meta["brain_mask"])
        model = UNet(UNetConfig.from_dict(cfg.arch))
        sd = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"brain-mask weights do not match their architecture: {exc}") from None
        return cls(model, cfg, device)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(meta_entry, tensors)`` to store in a checkpoint."""
        return self.cfg.to_dict(), {PREFIX + k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def probability(self, vol: Volume, batch: int = 64) -> tuple[np.ndarray, np.ndarray, ModelGrid]:
        """Brain probability on the network grid ``(z, H, W)``, the head foreground on the source grid, the grid."""
        x, head, grid = _head_input(vol, self.cfg)
        out = np.empty((x.shape[0],) + tuple(self.cfg.size), np.float32)
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                t = torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).to(self.device)
                out[i:i + len(t)] = torch.sigmoid(self.model(t).float())[:, 0].cpu().numpy()
        return out, head, grid

    def predict(self, vol: Volume) -> np.ndarray:
        """Boolean brain mask on ``vol``'s grid.

        Raises
        ------
        PreprocessError
            When the series has no head foreground or no brain is found.
        """
        prob, head, grid = self.probability(vol)
        src = from_model_grid(vol, prob, linear=True, grid=grid) >= self.cfg.threshold
        src &= head
        if not src.any():
            raise PreprocessError("no brain found in the series")
        return _largest_component(fill_holes_2d(src))


def brain_slices(volumes: list[Volume], brains: list[np.ndarray], cfg: BrainMaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs ``(N, 1, H, W)`` and brain targets ``(N, 1, H, W)`` from volumes with exact masks."""
    xs, ys = [], []
    for vol, brain in zip(volumes, brains):
        x, _, grid = _head_input(vol, cfg)
        y = to_model_grid(vol, brain.astype(np.float32), cfg.size, linear=True, grid=grid)
        xs.append(x)
        ys.append(y[:, None])
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3))
    return (1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)).mean()


def train_brain_masker(x: torch.Tensor, y: torch.Tensor, cfg: BrainMaskConfig, *, steps: int = 1200,
                       batch_size: int = 16, lr: float = 2e-3, seed: int = 0, device: str = "cpu",
                       log_every: int = 100) -> BrainMasker:
    """Train the network on generated slices (BCE + soft Dice, flips, gamma and scale jitter).

    Parameters
    ----------
    x, y:
        From :func:`brain_slices`.
    cfg:
        Settings (architecture, grid).
    steps, batch_size, lr, seed:
        Optimisation; the budget is a step count, so a run is reproducible.
    device:
        Torch device.
    log_every:
        Steps between progress lines in the log.

    Returns
    -------
    BrainMasker
        The trained masker (eval mode).

    Raises
    ------
    ValueError
        When there is no training slice.
    """
    if len(x) == 0:
        raise ValueError("no slices to train the brain-mask network on")
    dev = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = UNet(UNetConfig.from_dict(cfg.arch)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))))
    use_bf16 = dev.type == "cuda" or bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    model.train()
    run = 0.0
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        xb, yb = x[idx].clone(), y[idx].clone()
        flip = torch.rand(batch_size, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        yb = torch.where(flip[:, None, None, None], yb.flip(-1), yb)
        gamma = torch.exp((torch.rand(batch_size, generator=gen) - 0.5) * 0.8)[:, None, None, None]
        xb = xb.clamp(min=0) ** gamma * (0.8 + 0.4 * torch.rand(batch_size, 1, 1, 1, generator=gen))
        xb = xb + 0.03 * torch.randn(xb.shape, generator=gen) * (xb > 0)
        sc = 0.85 + 0.3 * torch.rand(batch_size, generator=gen)
        ang = (torch.rand(batch_size, generator=gen) - 0.5) * 0.5
        theta = torch.zeros(batch_size, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sc, -torch.sin(ang) / sc
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sc, torch.cos(ang) / sc
        grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
        xb = F.grid_sample(xb, grid, align_corners=False)
        yb = (F.grid_sample(yb, grid, align_corners=False) > 0.5).float()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(xb.to(dev))
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(logits, yb.to(dev)) + _dice_loss(logits, yb.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        lv = float(loss.detach())
        run = 0.95 * run + 0.05 * lv if step else lv
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log.info("brain mask: step %d/%d loss %.4f", step + 1, steps, run)
    model.eval()
    return BrainMasker(model.cpu(), cfg, "cpu")


def mask_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(pred, bool), np.asarray(truth, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float(np.count_nonzero(a & b)) / s
