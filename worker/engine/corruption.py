"""Training corruptions for the denoising objective (normal images only).

Two families, both drawn from the training data itself, never from labelled
anomalies:

* :func:`coarse_noise` — the default of Kascenas et al. (2022): Gaussian
  noise drawn on a coarse grid, upsampled, randomly shifted and added inside
  the foreground. It teaches the network to undo low-frequency intensity
  deviations.
* :func:`local_corruption` — self-supervised local corruptions in the style
  of the MOOD challenge entries (foreign-patch interpolation, Tan et al.
  2020; noise-patch and intensity corruptions as in DRAEM-style training):
  inside a few soft, irregular regions the content is replaced by fine-grained
  noise, by tissue from another slice, or rescaled. Coarse noise alone leaves
  fine texture and transplanted tissue untouched (the network learns to copy
  high frequencies through), so reconstruction residuals would miss them.

Every draw comes from the generator passed in, so training stays
deterministic on CPU. The same region is corrupted on every context channel
(anomalies are three-dimensional); texture noise differs per channel.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.nn import functional as F

__all__ = ["LOCAL_KINDS", "ALL_LOCAL_KINDS", "coarse_noise", "local_corruption", "soft_region"]

log = logging.getLogger(__name__)

LOCAL_KINDS = ("texture", "foreign", "intensity")
#: ``"blob"``: the region replaced by a homogeneous random intensity (0 to 1.6 in
#: normalised units, a little texture), the DRAEM-style corruption that teaches
#: the network to replace, not copy, tissue of any contrast (real-anatomy model)
ALL_LOCAL_KINDS = (*LOCAL_KINDS, "blob")


def coarse_noise(x: torch.Tensor, fg: torch.Tensor, noise_res: tuple[int, ...], noise_std: float,
                 gen: torch.Generator) -> torch.Tensor:
    """Add coarse noise inside the foreground (same field on every channel).

    Parameters
    ----------
    x:
        ``(N, C, H, W)`` clean inputs.
    fg:
        ``(N, H, W)`` foreground.
    noise_res:
        Coarse grid sizes; one is drawn per sample.
    noise_std:
        Standard deviation of the coarse noise.
    gen:
        Random generator.

    Returns
    -------
    torch.Tensor
        Corrupted copy of ``x``.

    Raises
    ------
    ValueError
        When ``noise_res`` is empty.
    """
    if not noise_res:
        raise ValueError("noise_res must name at least one grid size")
    n, _, h, w = x.shape
    out = torch.zeros((n, 1, h, w), dtype=x.dtype)
    choice = torch.randint(len(noise_res), (n,), generator=gen)
    for k, res in enumerate(noise_res):
        sel = (choice == k).nonzero().flatten()
        if len(sel) == 0:
            continue
        cell_h, cell_w = math.ceil(h / res), math.ceil(w / res)
        grid = torch.randn((len(sel), 1, res + 1, res + 1), generator=gen) * noise_std
        up = F.interpolate(grid, size=(h + cell_h, w + cell_w), mode="bilinear", align_corners=False)
        for j, i in enumerate(sel.tolist()):
            dy = int(torch.randint(cell_h, (1,), generator=gen))
            dx = int(torch.randint(cell_w, (1,), generator=gen))
            out[i] = up[j, :, dy:dy + h, dx:dx + w]
    return x + out * fg[:, None].to(x.dtype)


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=gen))


def soft_region(h: int, w: int, center: tuple[float, float], radii: tuple[float, float], angle: float,
                gen: torch.Generator, edge: float = 1.5) -> torch.Tensor:
    """Soft, irregular ellipse weight ``(H, W)`` in ``[0, 1]`` (0.5 on the boundary).

    Parameters
    ----------
    h, w:
        Image size.
    center:
        ``(y, x)`` in pixels.
    radii:
        Semi-axes ``(ry, rx)`` in pixels (positive).
    angle:
        Rotation in radians.
    gen:
        Random generator (boundary irregularity).
    edge:
        Width of the soft boundary in pixels.

    Returns
    -------
    torch.Tensor
        float32 weight map.

    Raises
    ------
    ValueError
        For non-positive radii.
    """
    if min(radii) <= 0:
        raise ValueError("radii must be positive")
    yy = torch.arange(h, dtype=torch.float32)[:, None] - center[0]
    xx = torch.arange(w, dtype=torch.float32)[None, :] - center[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * yy + s * xx, -s * yy + c * xx
    d = torch.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2)
    wobble = F.interpolate(torch.randn((1, 1, 4, 4), generator=gen), size=(h, w), mode="bicubic",
                           align_corners=True)[0, 0]
    d = d + 0.12 * wobble
    e = edge / max(min(radii), 1.0)
    return ((1.0 + e - d) / (2 * e)).clamp(0.0, 1.0)


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, H, W)``."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[0]
    out = F.conv2d(img[:, None], k.view(1, 1, 1, -1), padding=(0, r))
    out = F.conv2d(out, k.view(1, 1, -1, 1), padding=(r, 0))
    return out.view(c, *img.shape[1:])


def local_corruption(
    x: torch.Tensor,
    fg: torch.Tensor,
    gen: torch.Generator,
    *,
    prob: float = 0.5,
    kinds: tuple[str, ...] = LOCAL_KINDS,
    radius: tuple[float, float] = (0.05, 0.18),
    max_regions: int = 2,
) -> torch.Tensor:
    """Corrupt a few soft regions inside the foreground of some samples.

    Parameters
    ----------
    x:
        ``(N, C, H, W)`` inputs (already augmented, possibly noised).
    fg:
        ``(N, H, W)`` foreground.
    gen:
        Random generator.
    prob:
        Probability that a sample is corrupted.
    kinds:
        Corruptions to draw from: ``"texture"`` (fine-grained noise, mean
        kept near the local mean), ``"foreign"`` (tissue from another sample,
        possibly mirrored), ``"intensity"`` (local brightening/darkening) and
        ``"blob"`` (a homogeneous region of random intensity, see
        :data:`ALL_LOCAL_KINDS`).
    radius:
        Semi-axis range as a fraction of the image width.
    max_regions:
        Up to this many regions per corrupted sample.

    Returns
    -------
    torch.Tensor
        Corrupted copy of ``x``.

    Raises
    ------
    ValueError
        For an unknown kind or a probability outside ``[0, 1]``.
    """
    for k in kinds:
        if k not in ALL_LOCAL_KINDS:
            raise ValueError(f"unknown local corruption {k!r} (choose from {', '.join(ALL_LOCAL_KINDS)})")
    if not 0.0 <= prob <= 1.0:
        raise ValueError("prob must be in [0, 1]")
    out = x.clone()
    n, c, h, w = x.shape
    if prob == 0.0 or not kinds:
        return out
    hit = torch.rand(n, generator=gen) < prob
    for i in hit.nonzero().flatten().tolist():
        pts = fg[i].nonzero()
        if len(pts) < 16:
            continue
        for _ in range(int(torch.randint(1, max_regions + 1, (1,), generator=gen))):
            cy, cx = pts[int(torch.randint(len(pts), (1,), generator=gen))].tolist()
            radii = (_uniform(gen, *radius) * w, _uniform(gen, *radius) * w)
            m = soft_region(h, w, (float(cy), float(cx)), radii, _uniform(gen, 0, math.pi), gen) * fg[i].float()
            inside = m > 0.5
            if not inside.any():
                continue
            kind = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
            cur = out[i]
            if kind == "texture":
                noise = _blur(torch.randn((c, h, w), generator=gen), _uniform(gen, 0.6, 2.0))
                noise = noise / (noise[:, inside].std() + 1e-6)
                mean = cur[:, inside].mean(dim=1)[:, None, None]
                keep = _uniform(gen, 0.0, 0.8)
                new = keep * cur + (1 - keep) * mean + _uniform(gen, 0.04, 0.25) * noise
            elif kind == "foreign":
                j = int(torch.randint(n, (1,), generator=gen))
                donor = x[j]
                dy, dx = int(torch.randint(-h // 3, h // 3 + 1, (1,), generator=gen)), int(
                    torch.randint(-w // 3, w // 3 + 1, (1,), generator=gen))
                donor = torch.roll(donor, shifts=(dy, dx), dims=(1, 2))
                if float(torch.rand(1, generator=gen)) < 0.5:
                    donor = donor.flip(-1)
                alpha = _uniform(gen, 0.5, 1.0)
                new = (1 - alpha) * cur + alpha * donor
            elif kind == "blob":
                level = _uniform(gen, 0.0, 1.6)
                new = level + _uniform(gen, 0.0, 0.06) * _blur(torch.randn((c, h, w), generator=gen), 1.0)
            else:  # intensity
                sign = 1.0 if float(torch.rand(1, generator=gen)) < 0.5 else -1.0
                new = cur * (1.0 + sign * _uniform(gen, 0.1, 0.45))
            out[i] = (1 - m) * cur + m * new
    return out
