"""Realistic lesions in generated anatomy, for evaluation and method selection only.

Kinds (:data:`LESION_KINDS`): tumours with necrotic core, enhancing rim,
oedema and mass effect; white-matter hyperintensities; infarcts; haemorrhage
(acute or subacute); resection cavities. Each has an intensity per sequence,
expressed relative to the subject's own tissue means (so it follows the
drawn contrast), a size range and an exact mask: the voxels whose lesion
weight is at least 0.5 inside the brain.

:func:`make_lesion_subject` draws a subject from :mod:`.anatomy` with one or
more lesions; :func:`lesion_injector` gives the hook that puts lesions into
any noise-free tissue image (the selection set uses it on held-out normals).
The model never trains on these.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Subject, SubjectConfig, Tissue, _smooth, make_subject
from .volume import Volume

__all__ = ["LESION_KINDS", "Lesion", "inject_into_volume", "lesion_injector", "make_lesion_subject", "size_class"]

log = logging.getLogger(__name__)

LESION_KINDS: dict[str, float] = {"tumour": 0.3, "wmh": 0.2, "infarct": 0.2, "haemorrhage": 0.15, "cavity": 0.15}

# Lesion compartments: intensity = factor x the subject's mean of a reference tissue, per sequence.
# (reference tissue, low factor, high factor)
_I: dict[str, dict[str, tuple[str, float, float]]] = {
    "necrosis": {"t1": ("csf", 1.0, 1.8), "t2": ("csf", 0.75, 0.95), "flair": ("gm", 0.35, 0.8), "pd": ("csf", 1.0, 1.15)},
    "rim": {"t1": ("gm", 1.05, 1.35), "t2": ("gm", 1.15, 1.4), "flair": ("gm", 1.3, 1.6), "pd": ("gm", 1.08, 1.2)},
    "oedema": {"t1": ("gm", 0.8, 0.95), "t2": ("gm", 1.35, 1.7), "flair": ("gm", 1.3, 1.7), "pd": ("gm", 1.12, 1.25)},
    "wmh": {"t1": ("wm", 0.72, 0.88), "t2": ("gm", 1.3, 1.7), "flair": ("gm", 1.35, 1.8), "pd": ("gm", 1.1, 1.2)},
    "infarct": {"t1": ("gm", 0.65, 0.85), "t2": ("gm", 1.4, 1.8), "flair": ("gm", 1.3, 1.7), "pd": ("gm", 1.12, 1.25)},
    "blood_acute": {"t1": ("gm", 0.9, 1.1), "t2": ("gm", 0.35, 0.6), "flair": ("gm", 0.5, 0.8), "pd": ("gm", 0.6, 0.8)},
    "blood_subacute": {"t1": ("wm", 1.15, 1.45), "t2": ("csf", 0.7, 1.0), "flair": ("gm", 1.4, 1.9), "pd": ("gm", 1.1, 1.3)},
    "cavity": {"t1": ("csf", 0.9, 1.1), "t2": ("csf", 0.9, 1.05), "flair": ("csf", 0.9, 1.5), "pd": ("csf", 0.95, 1.05)},
    "gliosis": {"t1": ("gm", 0.85, 0.95), "t2": ("gm", 1.3, 1.6), "flair": ("gm", 1.4, 1.8), "pd": ("gm", 1.1, 1.2)},
}


@dataclass
class Lesion:
    """One injected lesion with its exact mask on the subject's grid."""

    kind: str
    center_zyx: tuple[int, int, int]
    volume_ml: float
    contrast: float
    mask: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0, 0), bool))
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no mask)."""
        return {"kind": self.kind, "center_zyx": list(self.center_zyx), "volume_ml": round(self.volume_ml, 3),
                "contrast": round(self.contrast, 4), "size": size_class(self.volume_ml), **self.detail}


def size_class(volume_ml: float) -> str:
    """``"small"`` (< 1 mL), ``"medium"`` (1-10 mL) or ``"large"`` (> 10 mL)."""
    return "small" if volume_ml < 1.0 else "medium" if volume_ml <= 10.0 else "large"


def _push(img: np.ndarray, spacing: tuple[float, float, float], center: np.ndarray, push_mm: float,
          reach_mm: float) -> np.ndarray:
    """Mass effect: tissue pushed radially away from ``center`` (voxel indices), within ``2 * reach_mm``.

    The image at distance ``r`` from the centre shows what was at
    ``r - push * exp(-(r / reach)^2)`` (clamped at ``0.05 r``): monotonic, so
    nothing folds.
    """
    sp = np.asarray(spacing)
    half = np.ceil(2 * reach_mm / sp).astype(int)
    box = tuple(slice(max(0, int(c) - h), min(n, int(c) + h + 1)) for c, h, n in zip(center, half, img.shape))
    g = np.meshgrid(*[np.arange(b.start, b.stop, dtype=np.float32) for b in box], indexing="ij")
    d = np.stack([(gi - c) * s for gi, c, s in zip(g, center, sp)])
    r = np.sqrt((d ** 2).sum(0)) + 1e-6
    src = np.maximum(r - push_mm * np.exp(-((r / reach_mm) ** 2)), 0.05 * r) / r
    coords = np.stack([c + di * src / s for di, c, s in zip(d, center, sp)])
    out = img.copy()
    out[box] = ndi.map_coordinates(img, coords, order=1, mode="nearest")
    return out


def _value(comp: str, t: Tissue, rng: np.random.Generator) -> float:
    ref, lo, hi = _I[comp][t.contrast if t.contrast in _I[comp] else "t1"]
    return float(t.means[ref] * rng.uniform(lo, hi))


def _blob(shape: tuple[int, ...], spacing: tuple[float, float, float], center: np.ndarray, radii_mm: np.ndarray,
          rng: np.random.Generator, irregular: float = 0.15, box: tuple[slice, ...] | None = None) -> np.ndarray:
    """Soft irregular ellipsoid weight in ``[0, 1]`` (0.5 on the boundary), computed inside ``box``."""
    out = np.zeros(shape, np.float32)
    r = float(radii_mm.max()) * 1.5 + 4
    box = box or tuple(slice(max(0, int(c - r / s)), min(n, int(c + r / s) + 2)) for c, s, n in zip(center, spacing, shape))
    g = np.ogrid[tuple(slice(b.start, b.stop) for b in box)]
    d2 = sum((((gi - c) * s) / rad) ** 2 for gi, c, s, rad in zip(g, center, spacing, radii_mm))
    d = np.sqrt(d2)
    sub_shape = tuple(b.stop - b.start for b in box)
    if min(sub_shape) < 1:
        return out
    d = d + irregular * _smooth(rng, sub_shape, 5)
    edge = 1.0 / max(float(radii_mm.min()), 1.0)
    out[box] = np.clip((1.0 + edge - d) / (2 * edge), 0.0, 1.0)
    return out


def _pick(t: Tissue, rng: np.random.Generator, where: np.ndarray) -> np.ndarray:
    idx = np.argwhere(where)
    if len(idx) == 0:
        idx = np.argwhere(t.brain)
    return idx[rng.integers(len(idx))].astype(np.float64)


def _inner(t: Tissue, mm: float) -> np.ndarray:
    rad = [max(1, int(round(mm / s))) for s in t.spacing]
    st = np.zeros([2 * r + 1 for r in rad], bool)
    c = np.ogrid[tuple(slice(-r, r + 1) for r in rad)]
    st[sum((ci / max(r, 1)) ** 2 for ci, r in zip(c, rad)) <= 1] = True
    return ndi.binary_erosion(t.brain, st)


def lesion_injector(kinds: dict[str, float] | None = None, n: tuple[int, int] = (1, 2),
                    radius_scale: float = 1.0) -> Callable[[Tissue], tuple[np.ndarray, list[Lesion]]]:
    """A ``lesion_fn`` for :func:`~worker.engine.anatomy.make_subject`.

    Parameters
    ----------
    kinds:
        Sampling weights per kind (default :data:`LESION_KINDS`).
    n:
        Inclusive range of the number of lesions.
    radius_scale:
        Multiplies every size range (for size sweeps).

    Raises
    ------
    ValueError
        For an unknown kind.
    """
    kinds = dict(kinds or LESION_KINDS)
    unknown = sorted(set(kinds) - set(LESION_KINDS))
    if unknown:
        raise ValueError(f"unknown lesion kind(s) {', '.join(unknown)} (choose from {', '.join(LESION_KINDS)})")
    names = list(kinds)
    p = np.asarray([kinds[k] for k in names], np.float64)
    p /= p.sum()

    def inject(t: Tissue) -> tuple[np.ndarray, list[Lesion]]:
        rng = t.rng
        img = t.image.copy()
        out: list[Lesion] = []
        deep = _inner(t, 10.0)
        for _ in range(int(rng.integers(n[0], n[1] + 1))):
            kind = names[int(rng.choice(len(names), p=p))]
            before = img.copy()
            weights: list[tuple[np.ndarray, float]] = []
            detail: dict[str, Any] = {}
            if kind == "tumour":
                r = rng.uniform(7.0, 24.0) * radius_scale
                c = _pick(t, rng, deep & (t.probs["wm"] > 0.5))
                radii = r * rng.uniform(0.8, 1.2, 3)
                oed = _blob(img.shape, t.spacing, c, radii + rng.uniform(3.0, 14.0) * radius_scale, rng, 0.25)
                oed *= np.clip(t.probs["wm"] + 0.35 * t.probs["gm"], 0, 1) * 1.3
                solid = _blob(img.shape, t.spacing, c, radii, rng)
                core_f = rng.uniform(0.0, 0.65)
                core = _blob(img.shape, t.spacing, c, radii * core_f, rng) if core_f > 0.15 else np.zeros_like(solid)
                weights = [(np.clip(oed, 0, 1), _value("oedema", t, rng)), (solid, _value("rim", t, rng)),
                           (core, _value("necrosis", t, rng))]
                push = float(rng.uniform(0.15, 0.45)) * r
                img = before = _push(img, t.spacing, c, push, r * rng.uniform(1.2, 2.0))
                detail = {"radius_mm": round(r, 1), "necrotic": bool(core_f > 0.15), "mass_effect_mm": round(push, 1)}
            elif kind == "wmh":
                count = int(rng.integers(1, 7))
                wm_deep = (t.probs["wm"] > 0.7) & deep
                val = _value("wmh", t, rng)
                acc = np.zeros(img.shape, np.float32)
                c = _pick(t, rng, wm_deep)
                for _j in range(count):
                    cj = c + rng.normal(0, 8.0, 3) / np.asarray(t.spacing)
                    cj = np.clip(cj, 0, np.asarray(img.shape) - 1)
                    rj = rng.uniform(2.5, 8.0) * radius_scale * rng.uniform(0.7, 1.3, 3)
                    acc = np.maximum(acc, _blob(img.shape, t.spacing, cj, rj, rng, 0.2))
                weights = [(acc * np.clip(t.probs["wm"] * 1.4, 0, 1), val)]
                detail = {"count": count}
            elif kind == "infarct":
                r = rng.uniform(8.0, 28.0) * radius_scale
                cortex = (t.probs["gm"] > 0.5) & _inner(t, 4.0) & ~deep
                c = _pick(t, rng, cortex)
                radii = r * np.array([rng.uniform(0.6, 1.1), rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3)])
                w = _blob(img.shape, t.spacing, c, radii, rng, 0.3)
                w *= np.clip((t.probs["gm"] + t.probs["wm"]) * 1.2, 0, 1)
                chronic = bool(rng.random() < 0.3)
                weights = [(w, _value("cavity" if chronic else "infarct", t, rng))]
                detail = {"radius_mm": round(r, 1), "chronic": chronic}
            elif kind == "haemorrhage":
                r = rng.uniform(5.0, 18.0) * radius_scale
                c = _pick(t, rng, deep)
                radii = r * rng.uniform(0.75, 1.25, 3)
                stage = "subacute" if rng.random() < 0.5 else "acute"
                ring = _blob(img.shape, t.spacing, c, radii + rng.uniform(2.0, 6.0), rng, 0.2)
                blood = _blob(img.shape, t.spacing, c, radii, rng, 0.1)
                weights = [(ring * np.clip(t.probs["wm"] + t.probs["gm"], 0, 1), _value("oedema", t, rng)),
                           (blood, _value(f"blood_{stage}", t, rng))]
                detail = {"radius_mm": round(r, 1), "stage": stage}
            else:  # cavity
                r = rng.uniform(9.0, 24.0) * radius_scale
                c = _pick(t, rng, (t.probs["gm"] > 0.4) & _inner(t, r * 0.6))
                radii = r * rng.uniform(0.75, 1.25, 3)
                glio = _blob(img.shape, t.spacing, c, radii + rng.uniform(1.5, 4.0), rng, 0.15)
                hole = _blob(img.shape, t.spacing, c, radii, rng, 0.15)
                weights = [(glio * t.brain, _value("gliosis", t, rng)), (hole, _value("cavity", t, rng))]
                detail = {"radius_mm": round(r, 1)}
            union = np.zeros(img.shape, np.float32)
            for w, v in weights:
                w = w * t.brain
                img = (1 - w) * img + w * v
                union = np.maximum(union, w)
            mask = (union >= 0.5) & t.brain
            vox_ml = float(np.prod(t.spacing)) / 1000.0
            if not mask.any():
                continue
            diff = float(np.abs(img - before)[mask].mean())
            out.append(Lesion(kind=kind, center_zyx=tuple(int(v) for v in c),  # type: ignore[arg-type]
                              volume_ml=float(mask.sum()) * vox_ml, contrast=diff / max(t.means["wm"], 1e-6),
                              mask=mask, detail=detail))
        return img.astype(np.float32), out

    return inject


def make_lesion_subject(seed: int, cfg: SubjectConfig | None = None, *, contrast: str | None = None,
                        kinds: dict[str, float] | None = None, n: tuple[int, int] = (1, 2),
                        radius_scale: float = 1.0) -> Subject:
    """A generated subject with lesions (see :func:`lesion_injector`); ``Subject.mask`` is their union.

    Raises
    ------
    ValueError
        For an unknown kind or contrast.
    """
    kinds = dict(kinds or LESION_KINDS)
    return make_subject(seed, cfg, contrast=contrast, lesion_fn=lesion_injector(kinds, n, radius_scale))


def inject_into_volume(vol: Volume, brain: np.ndarray | None, rng: np.random.Generator,
                       n: tuple[int, int] = (1, 2)) -> tuple[Volume, np.ndarray]:
    """Lesion-like blobs in a real normal series, for choosing a scoring method on site data.

    A real series has no tissue maps, so lesions here are soft irregular
    blobs (3-20 mm radius) inside the brain whose intensity moves towards a
    multiple of the brain's median (brighter, as oedema or FLAIR lesions, or
    darker, as cavities or infarcts on T1), keeping the series' own noise.

    Parameters
    ----------
    vol:
        A normal series (axial).
    brain:
        Its brain mask (``None``: voxels above the 20th percentile).
    rng:
        Random generator.
    n:
        Inclusive range of the number of blobs.

    Returns
    -------
    tuple
        The series with lesions and their exact mask.
    """
    a = vol.array.astype(np.float32)
    region = brain if brain is not None else a > np.percentile(a, 20)
    idx = np.argwhere(_erode_iso(region, vol.spacing, 6.0))
    if len(idx) == 0:
        idx = np.argwhere(region)
    med = float(np.median(a[region])) if region.any() else float(a.mean())
    smooth = ndi.gaussian_filter(a, 1.0)
    out = a.copy()
    mask = np.zeros(a.shape, bool)
    touched = np.zeros(a.shape, bool)
    for _ in range(int(rng.integers(n[0], n[1] + 1))):
        c = idx[rng.integers(len(idx))].astype(np.float64)
        radii = rng.uniform(3.0, 20.0) * rng.uniform(0.7, 1.3, 3)
        w = _blob(a.shape, vol.spacing, c, radii, rng, 0.2) * region
        factor = rng.uniform(1.25, 1.8) if rng.random() < 0.6 else rng.uniform(0.35, 0.75)
        out = out + w * (factor * med - smooth)
        mask |= w >= 0.5
        touched |= w > 0
    # only the lesions are clamped (at the series' own minimum: CT keeps its negative HU)
    out = np.where(touched, np.maximum(out, float(a.min())), a)
    return vol.with_array(out.astype(np.float32)), mask


def _erode_iso(mask: np.ndarray, spacing: tuple[float, float, float], mm: float) -> np.ndarray:
    rad = [max(0, int(mm // s)) for s in spacing]
    st = np.ones([2 * r + 1 for r in rad], bool)
    return ndi.binary_erosion(mask, st) if any(rad) else mask
