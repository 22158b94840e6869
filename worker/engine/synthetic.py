"""Synthetic head-like phantoms and a MOOD-style anomaly injector.

Normal phantoms have a scalp/skull ring, a CSF rim, grey and white matter with
an irregular interface, deep grey nuclei and two lateral ventricles, with
per-case anatomical variability, a smooth multiplicative bias field and Rician
scanner noise. :func:`inject_anomalies` adds ground-truth-labelled anomalies:
bright and dark blobs, foreign texture patches that keep the mean intensity,
patch interpolation from another location, and local deformations. Each
anomaly records whether intensity thresholding alone could find it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .volume import Volume

__all__ = [
    "ANOMALY_KINDS",
    "Anomaly",
    "SyntheticCase",
    "make_case",
    "make_phantom",
    "inject_anomalies",
]

log = logging.getLogger(__name__)

DEFAULT_SHAPE: tuple[int, int, int] = (32, 64, 64)
DEFAULT_SPACING: tuple[float, float, float] = (4.0, 3.0, 3.0)
SCANNER_SCALE = 1000.0  # arbitrary MR units

# Tissue intensities before bias field and noise (T1-like).
_T = {"bg": 0.0, "scalp": 0.80, "bone": 0.12, "csf": 0.16, "gm": 0.52, "wm": 0.76, "deep": 0.60}

ANOMALY_KINDS: dict[str, float] = {
    "bright": 0.25,
    "dark": 0.20,
    "texture": 0.25,
    "patch": 0.20,
    "deform": 0.10,
}


@dataclass
class Anomaly:
    """One injected anomaly (``voxels``: its own ground-truth voxels; the case mask is their union)."""

    kind: str
    center_zyx: tuple[int, int, int]
    voxel_count: int
    contrast: float
    intensity_detectable: bool
    voxels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    """Flat (C-order) indices of this anomaly's ground-truth voxels in the volume."""


@dataclass
class SyntheticCase:
    """A synthetic study: volume, ground-truth mask (bool) and anomaly list."""

    volume: Volume
    mask: np.ndarray
    anomalies: list[Anomaly] = field(default_factory=list)
    seed: int = 0

    def anomaly_masks(self) -> list[np.ndarray]:
        """One boolean mask per anomaly (same order as ``anomalies``), on the volume grid.

        Built from each anomaly's ``voxels``; their union is ``mask``. Two
        anomalies may share voxels (a later one injected over an earlier one).

        Returns
        -------
        list of numpy.ndarray
            Boolean arrays of the volume's shape.

        Raises
        ------
        ValueError
            When an anomaly's voxel indices fall outside the volume.
        """
        out = []
        for a in self.anomalies:
            if len(a.voxels) and (int(a.voxels.min()) < 0 or int(a.voxels.max()) >= self.mask.size):
                raise ValueError(f"anomaly {a.kind} at {a.center_zyx} has voxel indices outside the volume")
            m = np.zeros(self.mask.size, bool)
            m[a.voxels] = True
            out.append(m.reshape(self.mask.shape))
        return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int) -> np.ndarray:
    """Zero-mean, unit-peak-ish smooth random field by cubic upsampling a coarse grid."""
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(rng.standard_normal((1, 1) + (coarse,) * len(shape)).astype(np.float32))
    f = F.interpolate(grid, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()
    return (f / (np.abs(f).max() + 1e-6)).astype(np.float32)


def _coords(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    return tuple(
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * sp).reshape([-1 if i == a else 1 for i in range(3)])
        for a, (n, sp) in enumerate(zip(shape, spacing))
    )


def make_phantom(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one noise-free normal phantom.

    Parameters
    ----------
    rng:
        Random generator (all variability comes from it).
    shape, spacing:
        Grid ``(z, y, x)`` and voxel size in mm.

    Returns
    -------
    tuple of numpy.ndarray
        Tissue intensity image (float32, WM about 0.76) and a label image
        (0 background, 1 scalp/skull/CSF rim, 2 grey, 3 white, 4 deep grey,
        5 ventricle).
    """
    z, y, x = _coords(shape, spacing)
    fov = [n * s for n, s in zip(shape, spacing)]
    ang = np.deg2rad(rng.uniform(-8, 8))
    cx, cy, cz = rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-4, 4)
    xr = (x - cx) * np.cos(ang) - (y - cy) * np.sin(ang)
    yr = (x - cx) * np.sin(ang) + (y - cy) * np.cos(ang)
    zr = z - cz
    ax = fov[2] / 2 * rng.uniform(0.74, 0.86)
    ay = fov[1] / 2 * rng.uniform(0.84, 0.94)
    az = fov[0] / 2 * rng.uniform(0.80, 0.95)
    r = np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2 + (zr / az) ** 2)
    wobble = 0.035 * _smooth_field(rng, shape, 5)
    r = r + wobble
    lab = np.zeros(shape, np.uint8)
    lab[r < 1.0] = 1
    brain = r < rng.uniform(0.85, 0.88)
    lab[brain] = 2
    wm_field = 0.09 * _smooth_field(rng, shape, 7) + 0.03 * _smooth_field(rng, shape, 12)
    wm = r < (rng.uniform(0.64, 0.70) + wm_field)
    lab[wm & brain] = 3
    # deep grey nuclei
    for side in (-1, 1):
        dx = side * rng.uniform(14, 20)
        e = ((xr - dx) / rng.uniform(7, 10)) ** 2 + ((yr - rng.uniform(-4, 6)) / rng.uniform(9, 13)) ** 2 + (
            (zr - rng.uniform(-6, 2)) / rng.uniform(10, 14)
        ) ** 2
        lab[(e < 1) & brain] = 4
    # lateral ventricles
    vz = rng.uniform(-2, 8)
    for side in (-1, 1):
        dx = side * rng.uniform(5, 9)
        tilt = np.deg2rad(side * rng.uniform(0, 12))
        xv = (xr - dx) * np.cos(tilt) - (yr + 4) * np.sin(tilt)
        yv = (xr - dx) * np.sin(tilt) + (yr + 4) * np.cos(tilt)
        e = (xv / rng.uniform(3.5, 6.5)) ** 2 + (yv / rng.uniform(18, 27)) ** 2 + ((zr - vz) / rng.uniform(10, 16)) ** 2
        lab[(e < 1) & brain] = 5
    # scalp / bone / csf rim
    rim = (lab == 1)
    lab_img = np.zeros(shape, np.float32)
    jitter = {k: v * rng.uniform(0.96, 1.04) for k, v in _T.items()}
    lab_img[rim & (r >= 0.95)] = jitter["scalp"]
    lab_img[rim & (r < 0.95) & (r >= 0.905)] = jitter["bone"]
    lab_img[rim & (r < 0.905)] = jitter["csf"]
    for code, key in ((2, "gm"), (3, "wm"), (4, "deep"), (5, "csf")):
        lab_img[lab == code] = jitter[key]
    # gentle within-tissue variation, then partial-volume blur
    lab_img = (lab_img * (1.0 + 0.03 * _smooth_field(rng, shape, 9) * (lab >= 2))).astype(np.float32)
    img = ndi.gaussian_filter(lab_img, sigma=(0.5, 0.6, 0.6))
    return img.astype(np.float32), lab


def _scanner(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply bias field, Rician noise and scanner scaling."""
    bias = np.exp(rng.uniform(0.05, 0.15) * _smooth_field(rng, img.shape, 3))
    sigma = rng.uniform(0.012, 0.025)
    a = img * bias + rng.normal(0, sigma, img.shape)
    b = rng.normal(0, sigma, img.shape)
    out = np.sqrt(a * a + b * b) * SCANNER_SCALE * rng.uniform(0.8, 1.25)
    return out.astype(np.float32)


def _blob(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
    center: np.ndarray, radius_mm: float,
) -> np.ndarray:
    """Soft irregular ellipsoid weight in [0, 1] (0.5 at the boundary)."""
    z, y, x = _coords(shape, spacing)
    c = (center - (np.asarray(shape) - 1) / 2.0) * np.asarray(spacing)
    axes = radius_mm * rng.uniform(0.7, 1.3, 3)
    d = np.sqrt(((z - c[0]) / axes[0]) ** 2 + ((y - c[1]) / axes[1]) ** 2 + ((x - c[2]) / axes[2]) ** 2)
    d = d + 0.15 * _smooth_field(rng, shape, 8)
    edge = 1.5 / radius_mm
    return np.clip((1.0 + edge - d) / (2 * edge), 0.0, 1.0).astype(np.float32)


def _pick_center(rng: np.random.Generator, lab: np.ndarray, codes: tuple[int, ...], margin: int = 2) -> np.ndarray:
    cand = np.isin(lab, codes)
    cand[:margin] = cand[-margin:] = False
    idx = np.argwhere(cand)
    if len(idx) == 0:
        idx = np.argwhere(lab >= 2)
    return idx[rng.integers(len(idx))].astype(np.float64)


def inject_anomalies(
    img: np.ndarray, lab: np.ndarray, rng: np.random.Generator,
    spacing: tuple[float, float, float] = DEFAULT_SPACING, n: int = 1,
    kinds: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Anomaly]]:
    """Inject ``n`` anomalies into a noise-free phantom.

    Parameters
    ----------
    img, lab:
        Output of :func:`make_phantom`.
    rng:
        Random generator.
    spacing:
        Voxel size ``(z, y, x)`` in mm.
    n:
        Number of anomalies.
    kinds:
        Sampling weights per kind (defaults to :data:`ANOMALY_KINDS`).

    Returns
    -------
    tuple
        Modified image, boolean ground-truth mask and the anomaly list.

    Raises
    ------
    ValueError
        For an unknown anomaly kind.
    """
    kinds = kinds or ANOMALY_KINDS
    for k in kinds:
        if k not in ANOMALY_KINDS:
            raise ValueError(f"unknown anomaly kind {k!r}")
    names = list(kinds)
    p = np.asarray([kinds[k] for k in names], dtype=np.float64)
    p /= p.sum()
    out = img.copy()
    gt = np.zeros(img.shape, bool)
    brain = lab >= 2
    lo, hi = float(_T["csf"] * 0.96), float(_T["scalp"] * 1.04)
    found: list[Anomaly] = []
    for _ in range(n):
        kind = names[int(rng.choice(len(names), p=p))]
        radius = rng.uniform(8.0, 20.0)
        if kind == "deform":
            center = _pick_center(rng, ndi.binary_dilation(lab == 5, iterations=2) & ~(lab == 5) & brain, (1,))
        else:
            center = _pick_center(rng, lab, (2, 3, 4))
        w = _blob(rng, img.shape, spacing, center, radius) * brain
        before = out.copy()
        if kind in ("bright", "dark"):
            c = rng.uniform(0.12, 0.45) if kind == "bright" else rng.uniform(0.12, 0.40)
            out = out + (c if kind == "bright" else -c) * w
            out = np.maximum(out, 0.03)
            region = w > 0.5
        elif kind == "texture":
            tex = ndi.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), rng.uniform(0.7, 1.6))
            tex /= tex[w > 0.5].std() + 1e-6 if (w > 0.5).any() else 1.0
            c = rng.uniform(0.07, 0.18)
            region = w > 0.5
            mean = float(out[region].mean()) if region.any() else 0.5
            beta = rng.uniform(0.0, 0.8)
            out = (1 - w) * out + w * (beta * out + (1 - beta) * mean + c * tex)
        elif kind == "patch":
            # donor content from elsewhere in the head; a donor that happens to
            # look like the destination (e.g. white matter onto white matter)
            # would be an invisible "anomaly", so keep the most different of a
            # few candidates
            region = w > 0.5
            flip = rng.random() < 0.5
            best, best_diff = before, -1.0
            for _ in range(6):
                src = _pick_center(rng, lab, (2, 3, 4, 5))
                shift = np.round(src - center).astype(int)
                if np.abs(shift[1:]).max() < 4:
                    shift[1:] += 8
                cand = np.roll(before, shift=tuple(-shift), axis=(0, 1, 2))
                if flip:
                    cand = cand[:, :, ::-1]
                diff = float(np.abs(cand - before)[region].mean()) if region.any() else 0.0
                if diff > best_diff:
                    best, best_diff = cand, diff
            donor = best
            alpha = rng.uniform(0.6, 1.0)
            out = (1 - alpha * w) * out + alpha * w * donor
            c = alpha
            region = w > 0.5
        else:  # deform: radial push/pull around a ventricle edge
            z, y, x = (np.arange(s, dtype=np.float32) for s in img.shape)
            zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
            d = np.stack([(zz - center[0]) * spacing[0], (yy - center[1]) * spacing[1], (xx - center[2]) * spacing[2]])
            rad = np.sqrt((d**2).sum(0)) + 1e-6
            c = rng.uniform(0.45, 0.7) * rng.choice([-1.0, 1.0])
            mag = c * radius * np.clip(1 - rad / radius, 0, 1) ** 2  # mm, signed
            disp_vox = -(d / rad) * mag / np.asarray(spacing).reshape(3, 1, 1, 1)
            coords = np.stack([zz, yy, xx]) + disp_vox
            out = ndi.map_coordinates(out, coords, order=1, mode="nearest").astype(np.float32)
            region = (np.abs(mag) >= 1.0) & brain
        changed = region & (np.abs(out - before) > 1e-4)
        if kind == "deform":
            # label the displaced structure: voxels in the deformed zone whose
            # appearance changed visibly, closed within the zone
            moved = region & (np.abs(out - before) > 0.03)
            changed = ndi.binary_closing(moved, structure=np.ones((1, 3, 3), bool)) & region if moved.any() else moved
        gt |= changed
        cnt = int(changed.sum())
        lesion_mean = float(out[changed].mean()) if cnt else 0.0
        found.append(
            Anomaly(
                kind=kind,
                center_zyx=tuple(int(v) for v in center),  # type: ignore[arg-type]
                voxel_count=cnt,
                contrast=float(c),
                intensity_detectable=bool(cnt and kind in ("bright", "dark") and not lo <= lesion_mean <= hi),
                voxels=np.flatnonzero(changed),
            )
        )
    return out.astype(np.float32), gt, found


def make_case(
    seed: int,
    anomalous: bool = True,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    n_anomalies: tuple[int, int] = (1, 2),
    kinds: dict[str, float] | None = None,
) -> SyntheticCase:
    """Generate one study deterministically from ``seed``.

    Parameters
    ----------
    seed:
        Seed; distinct seeds give distinct anatomy, noise and anomalies.
    anomalous:
        Inject anomalies (between ``n_anomalies[0]`` and ``n_anomalies[1]``).
    shape, spacing:
        Grid ``(z, y, x)`` and voxel size in mm.
    n_anomalies:
        Inclusive range for the number of anomalies.
    kinds:
        Anomaly kind weights.

    Returns
    -------
    SyntheticCase
        Volume in scanner units (modality ``"MR"``), mask and anomaly list.
    """
    rng = np.random.default_rng([seed, 7919])
    img, lab = make_phantom(rng, shape, spacing)
    mask = np.zeros(shape, bool)
    anomalies: list[Anomaly] = []
    if anomalous:
        n = int(rng.integers(n_anomalies[0], n_anomalies[1] + 1))
        img, mask, anomalies = inject_anomalies(img, lab, rng, spacing, n, kinds)
    arr = _scanner(img, rng)
    origin = (-(shape[2] - 1) / 2 * spacing[2], -(shape[1] - 1) / 2 * spacing[1], -(shape[0] - 1) / 2 * spacing[0])
    vol = Volume(arr, spacing, origin, np.eye(3), "MR", {"series_uid": f"synthetic-{seed}"})
    return SyntheticCase(vol, mask, anomalies, seed)
