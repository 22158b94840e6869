"""Normal heads from real anatomy: subjects generated from the MNI ICBM152 2009 template.

nilearn's wheel ships the MNI ICBM152 2009c nonlinear symmetric T1 template
(1 mm, skull-stripped in the ``_converted`` files) and grey- and white-matter
probability maps. From them :func:`make_subject` draws distinct subjects, in
the spirit of SynthSeg's domain randomisation:

* anatomy: random smooth nonlinear deformation, pose (rotation, translation)
  and head size; sulcal and ventricular CSF from the maps, and a scalp /
  skull / marrow / CSF shell of random thickness built around the brain;
* acquisition: axial slices 1-6 mm thick (partial volume through the slice
  profile), in-plane spacing 0.5-1.2 mm, field of view, slice coverage;
* contrast: T1w from the template itself inside the brain, T2w / FLAIR /
  PD-like images from the tissue maps, or random per-tissue intensities
  (``"random"``, for the brain-mask network); bias field; Rician noise.

Every subject comes with its exact brain mask. Lesions for evaluation are
added by :mod:`.lesions` through the ``lesion_fn`` hook, on the noise-free
tissue image (before bias field and noise).

Licence of the template (carried in ``docs/THIRD_PARTY.md``): Copyright (C)
1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University; permission to use, copy, modify and
distribute with the copyright notice, provided "as is".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage as ndi

from .orient import to_axial
from .volume import Volume

__all__ = ["CONTRASTS", "TISSUES", "Template", "Subject", "SubjectConfig", "Tissue", "load_template",
           "template_dir", "make_subject", "tissue_means"]

log = logging.getLogger(__name__)

CONTRASTS = ("t1", "t2", "flair", "pd")
TISSUES = ("wm", "gm", "csf", "bone", "marrow", "scalp")
_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
_PAD = 28  # mm of room around the template for the extra-cerebral shell

# Mean intensity of each tissue per sequence (arbitrary units, before jitter).
_MEANS: dict[str, dict[str, float]] = {
    "t1": {"wm": 1.00, "gm": 0.62, "csf": 0.20, "bone": 0.07, "marrow": 0.85, "scalp": 0.80},
    "t2": {"wm": 0.34, "gm": 0.50, "csf": 1.00, "bone": 0.05, "marrow": 0.55, "scalp": 0.50},
    "flair": {"wm": 0.55, "gm": 0.74, "csf": 0.10, "bone": 0.05, "marrow": 0.70, "scalp": 0.60},
    "pd": {"wm": 0.66, "gm": 0.82, "csf": 0.90, "bone": 0.05, "marrow": 0.85, "scalp": 0.75},
}


def template_dir() -> Path:
    """Folder of nilearn's bundled template files.

    Raises
    ------
    FileNotFoundError
        When nilearn (and with it the template) is not installed.
    """
    try:
        import nilearn.datasets as nd
    except ImportError:
        raise FileNotFoundError("nilearn is not installed; it ships the MNI ICBM152 template (pip install nilearn)") from None
    d = Path(nd.__file__).resolve().parent / "data"
    missing = [f for f in _FILES.values() if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn's data folder {d} lacks {', '.join(missing)}")
    return d


@dataclass(frozen=True)
class Template:
    """The template on its padded 1 mm grid, ``(z, y, x)``, with a centred millimetre frame.

    Attributes
    ----------
    maps:
        ``(C, Z, Y, X)`` float32: T1 (WM about 1), GM, WM and CSF probabilities,
        brain mask, and signed distance in mm to the brain's hull (the brain
        closed over its fissures; positive outside), around which the
        extra-cerebral shell is built.
    center:
        Brain centroid in voxel indices ``(z, y, x)``; subject coordinates are
        millimetres from it.
    """

    maps: np.ndarray
    center: np.ndarray

    T1, GM, WM, CSF, BRAIN, DIST = range(6)


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Read and prepare the template (cached per process; about 2 s).

    Raises
    ------
    FileNotFoundError
        See :func:`template_dir`.
    """
    import SimpleITK as sitk

    d = template_dir()
    raw = {}
    for k, f in _FILES.items():
        # nilearn's files are stored RAS (index x towards the right, y towards anterior); the
        # generator's frame is DICOM's LPS (x towards the left, y posterior, z superior), so the
        # arrays are brought to LPS with the exact reorientation the engine uses for series
        img = sitk.ReadImage(str(d / f))
        vol, _ = to_axial(Volume.from_sitk(img))
        raw[k] = vol.array.astype(np.float32) / 255.0
    gm, wm = raw["gm"], raw["wm"]
    tissue = (gm + wm) > 0.3
    # The brain: tissue closed over the sulci, holes (ventricles) filled.
    ball = np.linalg.norm(np.mgrid[-3:4, -3:4, -3:4], axis=0) <= 3
    brain = ndi.binary_fill_holes(ndi.binary_closing(np.pad(tissue, 4), ball))[4:-4, 4:-4, 4:-4]
    brain = ndi.binary_fill_holes(brain)
    lab, n = ndi.label(brain)
    if n > 1:
        brain = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    wm_t1 = float(np.median(raw["t1"][wm > 0.9]))
    t1 = raw["t1"] / max(wm_t1, 1e-6)
    stack = [np.pad(a, _PAD) for a in (t1, gm, wm, csf, brain.astype(np.float32))]
    b = stack[4] > 0.5
    # The skull wraps the brain's hull, not its fissures: close over about 10 mm
    # on a 2 mm grid (the interhemispheric fissure stays CSF, never bone).
    small = b[::2, ::2, ::2]
    ball5 = np.linalg.norm(np.mgrid[-5:6, -5:6, -5:6], axis=0) <= 5
    hull_s = ndi.binary_fill_holes(ndi.binary_closing(np.pad(small, 6), ball5)[6:-6, 6:-6, 6:-6])
    hull = np.repeat(np.repeat(np.repeat(hull_s, 2, 0), 2, 1), 2, 2)[:b.shape[0], :b.shape[1], :b.shape[2]] | b
    dist = ndi.distance_transform_edt(~hull) - ndi.distance_transform_edt(hull)
    stack.append(dist.astype(np.float32))
    center = np.array(ndi.center_of_mass(b), dtype=np.float64)
    return Template(maps=np.stack(stack).astype(np.float32), center=center)


@dataclass
class SubjectConfig:
    """Ranges the generator draws from (defaults: the demo training distribution)."""

    contrasts: tuple[str, ...] = CONTRASTS
    slice_thickness: tuple[float, float] = (1.0, 6.0)
    inplane_spacing: tuple[float, float] = (0.5, 1.2)
    fov_mm: tuple[float, float] = (200.0, 256.0)
    # rotation ranges about the (z, y, x) array axes in turn: yaw (about the superior axis),
    # roll (about the anterior-posterior axis) and pitch (nodding, about the left-right axis)
    rotation_deg: tuple[float, float, float] = (15.0, 8.0, 10.0)
    translation_mm: float = 12.0
    scale: tuple[float, float] = (0.9, 1.1)
    deform_mm: float = 3.0
    partial_coverage: float = 0.3  # share of subjects with a slab instead of the whole brain
    snr: tuple[float, float] = (15.0, 60.0)
    bias: float = 0.25
    max_matrix: int = 384
    slices: int | None = None  # fixed slice count over the coverage (benchmarks: a 400-slice study)
    slice_spacing_mm: float | None = None  # with ``slices``: fixed spacing, coverage centred on the brain
    matrix: int | None = None  # fixed in-plane matrix over the field of view


@dataclass
class Tissue:
    """The noise-free subject on its acquisition grid, as handed to a lesion hook."""

    image: np.ndarray
    probs: dict[str, np.ndarray]
    brain: np.ndarray
    means: dict[str, float]
    contrast: str
    spacing: tuple[float, float, float]
    rng: np.random.Generator


@dataclass
class Subject:
    """A generated study: the volume, its exact brain mask, and what was drawn."""

    volume: Volume
    brain: np.ndarray
    mask: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    lesions: list[Any] = field(default_factory=list)
    seed: int = 0


def tissue_means(contrast: str, rng: np.random.Generator) -> dict[str, float]:
    """Per-tissue mean intensities for ``contrast`` (jittered), or random ones for ``"random"``.

    Raises
    ------
    ValueError
        For an unknown contrast.
    """
    if contrast == "random":
        return {k: float(rng.uniform(0.05, 1.0)) for k in TISSUES}
    if contrast not in _MEANS:
        raise ValueError(f"unknown contrast {contrast!r} (choose from {', '.join(CONTRASTS)}, random)")
    return {k: float(v * rng.uniform(0.92, 1.08)) for k, v in _MEANS[contrast].items()}


def _rotation(rng: np.random.Generator, deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = (math.radians(rng.uniform(-d, d)) for d in deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], coarse: int) -> np.ndarray:
    """Smooth random field in about [-1, 1] by linear upsampling of a coarse grid."""
    g = rng.standard_normal((coarse,) * len(shape)).astype(np.float32)
    f = ndi.zoom(g, [s / coarse for s in shape], order=1, mode="nearest", grid_mode=True)
    f = f[tuple(slice(0, s) for s in shape)]
    return (f / (np.abs(f).max() + 1e-6)).astype(np.float32)


def _sample(maps: np.ndarray, coords_vox: np.ndarray) -> np.ndarray:
    """Trilinear sampling of ``(C, Z, Y, X)`` maps at voxel coordinates ``(..., 3)`` (z, y, x)."""
    import torch
    import torch.nn.functional as F

    c, zs, ys, xs = maps.shape
    shape = coords_vox.shape[:-1]
    flat = coords_vox.reshape(1, -1, 1, 1, 3)
    # grid_sample wants (x, y, z) normalised to [-1, 1] (align_corners=True)
    norm = np.empty_like(flat, dtype=np.float32)
    for i, n in enumerate((xs, ys, zs)):
        norm[..., i] = flat[..., 2 - i] * (2.0 / (n - 1)) - 1.0
    out = F.grid_sample(torch.from_numpy(maps)[None], torch.from_numpy(norm), mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out[0, :, :, 0, 0].numpy().reshape((c,) + shape)


def make_subject(
    seed: int,
    cfg: SubjectConfig | None = None,
    *,
    contrast: str | None = None,
    lesion_fn: Callable[[Tissue], tuple[np.ndarray, list[Any]]] | None = None,
) -> Subject:
    """Draw one subject deterministically from ``seed``.

    Parameters
    ----------
    seed:
        Seed of every draw; distinct seeds give distinct subjects.
    cfg:
        Ranges to draw from.
    contrast:
        Force a contrast (``"t1"``, ``"t2"``, ``"flair"``, ``"pd"`` or
        ``"random"``); default: one of ``cfg.contrasts``.
    lesion_fn:
        Called with the noise-free :class:`Tissue`; returns the modified image
        and a list of lesion records whose ``mask`` attributes form the
        ground truth (see :mod:`.lesions`).

    Returns
    -------
    Subject
        Volume (modality ``"MR"``, scanner units), brain mask and ground truth.

    Raises
    ------
    ValueError
        For an unknown contrast.
    FileNotFoundError
        When the template is not installed.
    """
    cfg = cfg or SubjectConfig()
    rng = np.random.default_rng([int(seed), 104_729])
    tpl = load_template()
    con = contrast or cfg.contrasts[int(rng.integers(len(cfg.contrasts)))]
    means = tissue_means(con, rng)
    # --- geometry of the acquisition (subject frame: mm from the brain centre, axes z, y, x)
    thick = float(rng.uniform(*cfg.slice_thickness))
    gap = float(rng.uniform(0.0, 0.1)) * thick if thick > 2.5 else 0.0
    sp_z = thick + gap
    sp_xy = float(rng.uniform(*cfg.inplane_spacing))
    fov = float(rng.uniform(*cfg.fov_mm))
    n_xy = int(cfg.matrix) if cfg.matrix else int(round(fov / sp_xy / 2) * 2)
    if cfg.matrix:
        sp_xy = fov / n_xy
    elif n_xy > cfg.max_matrix:  # keep the field of view, coarser pixels
        n_xy = int(cfg.max_matrix)
        sp_xy = fov / n_xy
    n_xy = max(64, n_xy)
    scale = float(rng.uniform(*cfg.scale))
    aniso = rng.uniform(0.96, 1.04, 3)
    rot = _rotation(rng, cfg.rotation_deg)
    shift = np.array([rng.uniform(-4, 4), rng.uniform(-cfg.translation_mm, cfg.translation_mm),
                      rng.uniform(-cfg.translation_mm, cfg.translation_mm)])
    # brain extent along z in the template (mm from the centre) sets the coverage
    bz = np.nonzero(tpl.maps[Template.BRAIN].any(axis=(1, 2)))[0]
    lo_mm, hi_mm = (bz[0] - tpl.center[0]) * scale - 6, (bz[-1] - tpl.center[0]) * scale + 8
    if rng.random() < cfg.partial_coverage:
        span = (hi_mm - lo_mm) * rng.uniform(0.35, 0.8)
        start = rng.uniform(lo_mm, hi_mm - span)
        lo_mm, hi_mm = start, start + span
    if cfg.slices:
        if cfg.slice_spacing_mm:
            mid = (lo_mm + hi_mm) / 2
            sp_z = float(cfg.slice_spacing_mm)
            lo_mm, hi_mm = mid - sp_z * cfg.slices / 2, mid + sp_z * cfg.slices / 2
        else:
            sp_z = (hi_mm - lo_mm) / cfg.slices
        thick, gap = sp_z, 0.0
    n_z = int(cfg.slices) if cfg.slices else max(4, int(round((hi_mm - lo_mm) / sp_z)))
    z_mm = lo_mm + (np.arange(n_z) + 0.5) * sp_z
    xy = (np.arange(n_xy) - (n_xy - 1) / 2.0) * sp_xy
    # slice profile: sub-samples across the thickness (partial volume)
    n_sub = max(1, int(math.ceil(thick / 1.2)))
    sub = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * thick
    # deformation: smooth displacement (mm) on a coarse lattice over the head
    coarse = rng.standard_normal((3, 5, 5, 5)).astype(np.float32) * cfg.deform_mm
    coarse = ndi.gaussian_filter(coarse, (0, 0.6, 0.6, 0.6))
    acc = np.zeros((1 + 5, n_z, n_xy, n_xy), np.float32)
    yy, xx = np.meshgrid(xy, xy, indexing="ij")
    a_inv = np.linalg.inv(rot @ np.diag(aniso * scale))
    per = max(1, 4_000_000 // (n_xy * n_xy))  # slices per sampling call (bounded memory)
    sel = [Template.GM, Template.WM, Template.CSF, Template.BRAIN, Template.DIST]
    for s in sub:
        for k0 in range(0, n_z, per):
            zs = z_mm[k0:k0 + per] + s
            p = np.empty((len(zs), n_xy, n_xy, 3), np.float32)
            p[..., 0] = zs[:, None, None]
            p[..., 1] = yy
            p[..., 2] = xx
            q = (p.reshape(-1, 3) - shift) @ a_inv.T  # template mm (z, y, x) from the brain centre
            lattice = (q / 90.0 + 1.0) * 2.0  # [-90, 90] mm -> [0, 4] on the 5-point lattice
            disp = _sample(coarse, lattice).T
            vox = (q + disp + tpl.center).astype(np.float32).reshape(len(zs), n_xy, n_xy, 3)
            v = _sample(tpl.maps, vox)
            acc[0, k0:k0 + per] += v[Template.T1]
            acc[1:, k0:k0 + per] += v[sel]
    acc /= n_sub
    t1, gm, wm, csf, brain_p, dist = acc
    brain = brain_p > 0.5
    # --- extra-cerebral shell from the distance to the brain surface (random, smoothly varying thickness)
    wob = _smooth(rng, dist.shape, 6)
    d = dist + 1.2 * wob
    c1 = rng.uniform(1.0, 3.0)
    c2 = c1 + rng.uniform(4.0, 8.0)
    c3 = c2 + rng.uniform(4.0, 9.0)
    outside = np.clip(1.0 - brain_p, 0.0, 1.0)

    def band(a: float, b: float) -> np.ndarray:
        return (np.clip(d - a + 0.5, 0, 1) * np.clip(b - d + 0.5, 0, 1)).astype(np.float32) * outside

    ring_csf = band(-1.0, c1)
    skull = band(c1, c2)
    mid = (c1 + c2) / 2
    marrow = skull * np.clip(1.0 - np.abs(d - mid) / max((c2 - c1) * 0.25, 0.5), 0, 1) * rng.uniform(0.3, 1.0)
    bone = skull - marrow
    scalp = band(c2, c3)
    probs = {"wm": wm, "gm": gm, "csf": np.clip(csf + ring_csf, 0, 1), "bone": bone, "marrow": marrow, "scalp": scalp}
    img = sum(probs[k] * means[k] for k in TISSUES)
    if con == "t1":
        # inside the brain the template's own T1 contrast (deep nuclei, gradual GM/WM transitions)
        w_in = np.clip(brain_p, 0, 1)
        img = w_in * t1 * means["wm"] + (1 - w_in) * img
    texture = 1.0 + 0.03 * _smooth(rng, img.shape, 16)
    img = (img * texture).astype(np.float32)
    tissue = Tissue(image=img, probs=probs, brain=brain, means=means, contrast=con, spacing=(sp_z, sp_xy, sp_xy), rng=rng)
    lesions: list[Any] = []
    if lesion_fn is not None:
        img, lesions = lesion_fn(tissue)
    gt = np.zeros(img.shape, bool)
    for les in lesions:
        gt |= les.mask
    # --- scanner: bias field, Rician noise, arbitrary scaling
    bias = np.exp(cfg.bias * _smooth(rng, img.shape, 3))
    snr = float(rng.uniform(*cfg.snr))
    sigma = means["wm"] / snr if con != "t2" else means["gm"] / snr
    a = img * bias + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    b = rng.normal(0.0, sigma, img.shape).astype(np.float32)
    arr = (np.sqrt(a * a + b * b) * rng.uniform(600.0, 2500.0)).astype(np.float32)
    origin = (-(n_xy - 1) / 2 * sp_xy, -(n_xy - 1) / 2 * sp_xy, float(z_mm[0]))
    vol = Volume(arr, (sp_z, sp_xy, sp_xy), origin, np.eye(3), "MR",
                 {"series_uid": f"anatomy-{seed}", "contrast": con, "slice_thickness": f"{thick:.2f}"})
    params = {"contrast": con, "slice_thickness": thick, "slice_spacing": sp_z, "inplane_spacing": sp_xy,
              "matrix": n_xy, "slices": n_z, "scale": scale, "snr": snr, "coverage_mm": [float(lo_mm), float(hi_mm)]}
    return Subject(volume=vol, brain=brain, mask=gt & brain, params=params, lesions=lesions, seed=int(seed))
