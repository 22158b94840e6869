"""Anomaly scores: reconstruction residuals, baselines and their fusion.

All score maps are computed on the model grid, median-filtered, mapped back
to the source grid and restricted to the eroded foreground, so the U-Net and
both baselines go through exactly the same post-processing and calibration.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "METHODS",
    "ScoringConfig",
    "residual_map",
    "ssim_map",
    "feature_residual",
    "intensity_outlier",
    "pixel_zscore",
    "median_smooth",
    "fuse",
    "component_keys",
    "calibrate_threshold",
    "method_variant",
    "to_unit",
]

log = logging.getLogger(__name__)

METHODS = ("residual", "ssim", "combined", "intensity", "pixel_zscore")
COMBINE_WITH = ("intensity", "pixel_zscore", "feature")


@dataclass
class ScoringConfig:
    """How a continuous score and a mask are derived (stored in the checkpoint).

    Attributes
    ----------
    method:
        ``"residual"`` (``|x - x̂|``), ``"ssim"`` (``1 - SSIM``) or
        ``"combined"`` (normalised residual + a weighted second term, see
        ``combine_with``).
    median_size:
        Median filter ``(z, y, x)`` applied on the model grid.
    tta:
        Test-time augmentation: average the reconstruction of the slice and
        of its left-right mirror image.
    smooth_sigma:
        Gaussian smoothing (model-grid pixels, in-plane and through-plane)
        after the median filter; 0 disables.
    erode_mm:
        Foreground erosion before scoring (excludes the body boundary).
    target_fpr:
        Voxel false-positive rate on normal data the threshold is set at.
    threshold:
        Calibrated threshold on the raw score (``None`` until calibrated).
    polarity:
        Intensity-outlier tail: ``"bright"``, ``"dark"`` or ``"both"``.
    combine_weight:
        Weight of the second term in ``"combined"``.
    combine_with:
        Second term of ``"combined"``: ``"intensity"`` (robust z within the
        study), ``"pixel_zscore"`` (deviation from the normal atlas) or
        ``"feature"`` (feature-space residual: how differently the U-Net's
        first encoder level responds to the input and to its
        reconstruction, see :func:`feature_residual`).
    edge_weight:
        Edge-aware residual: ``|x - x̂| / (1 + edge_weight * |∇x̂|)``, which
        discounts the unavoidable reconstruction error on normal edges
        (0 = plain residual).
    slice_offset:
        Remove each slice's median signed residual inside the scoring region
        before taking the absolute value, so a slice-wide intensity offset
        (bias field, partial volume at the vertex, interleaving) the network
        "corrects" is not scored as an anomaly.
    scales:
        Per-component normal 99th percentiles used by ``"combined"``.
    min_volume_mm3:
        Connected components smaller than this are discarded.
    closing, fill_holes:
        Morphological clean-up of the thresholded mask.
    calibration:
        Description of the calibration (data hash, counts, quantile).
    """

    method: str = "residual"
    median_size: tuple[int, int, int] = (3, 3, 3)
    smooth_sigma: float = 0.7
    tta: bool = False
    erode_mm: float = 8.0
    target_fpr: float = 0.001
    threshold: float | None = None
    polarity: str = "both"
    combine_weight: float = 0.5
    combine_with: str = "intensity"
    edge_weight: float = 0.0
    slice_offset: bool = False
    scales: dict[str, float] = field(default_factory=dict)
    min_volume_mm3: float = 200.0
    closing: bool = True
    fill_holes: bool = True
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoringConfig":
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ValueError
            For an unknown method or polarity.
        """
        d = dict(d)
        if "median_size" in d:
            d["median_size"] = tuple(d["median_size"])
        cfg = cls(**d)
        if cfg.method not in METHODS:
            raise ValueError(f"unknown scoring method {cfg.method!r}")
        if cfg.polarity not in ("bright", "dark", "both"):
            raise ValueError(f"unknown polarity {cfg.polarity!r}")
        if cfg.combine_with not in COMBINE_WITH:
            raise ValueError(f"unknown combine_with {cfg.combine_with!r}")
        if not (0.0 <= float(cfg.combine_weight) < float("inf")):
            raise ValueError(f"combine_weight must be a finite number >= 0, got {cfg.combine_weight!r}")
        return cfg


def residual_map(x: np.ndarray, recon: np.ndarray, edge_weight: float = 0.0,
                 offset_region: np.ndarray | None = None, min_pixels: int = 200) -> np.ndarray:
    """Absolute residual ``|x - recon|`` (float32), optionally edge-aware and per-slice offset-free.

    Parameters
    ----------
    x, recon:
        ``(z, H, W)`` input and reconstruction.
    edge_weight:
        When positive, the residual is divided by ``1 + edge_weight * g``
        where ``g`` is the in-plane Sobel gradient magnitude of ``recon``.
    offset_region:
        When given, each slice's median of ``x - recon`` over this region
        (slices with at least ``min_pixels`` region pixels) is subtracted
        before the absolute value.
    min_pixels:
        See ``offset_region``.

    Returns
    -------
    numpy.ndarray
        Non-negative residual map.
    """
    d = x.astype(np.float32) - recon.astype(np.float32)
    if offset_region is not None:
        for z in range(d.shape[0]):
            m = offset_region[z]
            if np.count_nonzero(m) >= min_pixels:
                d[z] -= np.float32(np.median(d[z][m]))
    r = np.abs(d)
    if edge_weight > 0:
        r = r / (1.0 + edge_weight * gradient_magnitude(recon))
    return r.astype(np.float32)


def gradient_magnitude(img: np.ndarray) -> np.ndarray:
    """In-plane Sobel gradient magnitude per pixel (``(z, H, W)``; scaled to units per pixel)."""
    a = img.astype(np.float32)
    gy = ndi.sobel(a, axis=1) / 8.0
    gx = ndi.sobel(a, axis=2) / 8.0
    return np.sqrt(gx * gx + gy * gy)


def ssim_map(x: np.ndarray, recon: np.ndarray, sigma: float = 1.5, data_range: float = 1.0) -> np.ndarray:
    """``1 - SSIM`` per pixel with a Gaussian window, slice by slice (in-plane).

    Parameters
    ----------
    x, recon:
        ``(z, H, W)`` arrays.
    sigma:
        Gaussian window in pixels.
    data_range:
        Dynamic range used for the stabilising constants.

    Returns
    -------
    numpy.ndarray
        Dissimilarity in ``[0, 2]``; 0 where identical.
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (0, sigma, sigma)
    a, b = x.astype(np.float64), recon.astype(np.float64)
    mu_a, mu_b = ndi.gaussian_filter(a, s), ndi.gaussian_filter(b, s)
    va = ndi.gaussian_filter(a * a, s) - mu_a**2
    vb = ndi.gaussian_filter(b * b, s) - mu_b**2
    cov = ndi.gaussian_filter(a * b, s) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return (1.0 - ssim).astype(np.float32)


def feature_residual(fx: np.ndarray, frecon: np.ndarray) -> np.ndarray:
    """Feature-space residual: mean absolute difference over feature channels.

    Parameters
    ----------
    fx, frecon:
        ``(z, C, H, W)`` feature maps of the input and of its reconstruction
        (the same layer of the same network).

    Returns
    -------
    np.ndarray
        ``(z, H, W)`` float32. A texture the network does not expect changes
        its feature responses even where the voxel residual averages out.

    Raises
    ------
    ValueError
        When the shapes differ or are not 4-D.
    """
    if fx.shape != frecon.shape or fx.ndim != 4:
        raise ValueError(f"feature maps must be equal (z, C, H, W) arrays, got {fx.shape} and {frecon.shape}")
    return np.abs(fx - frecon).mean(axis=1, dtype=np.float32)


def _tail(z: np.ndarray, polarity: str) -> np.ndarray:
    if polarity == "bright":
        return np.maximum(z, 0.0)
    if polarity == "dark":
        return np.maximum(-z, 0.0)
    if polarity == "both":
        return np.abs(z)
    raise ValueError(f"unknown polarity {polarity!r}")


def intensity_outlier(x: np.ndarray, region: np.ndarray, polarity: str = "both") -> np.ndarray:
    """Baseline (a): robust z-score of the normalised image within one study.

    Parameters
    ----------
    x:
        Normalised image.
    region:
        Voxels the median and MAD are computed on (eroded foreground).
    polarity:
        Which tail counts as anomalous.

    Returns
    -------
    numpy.ndarray
        Non-negative score, 0 outside ``region``.

    Raises
    ------
    ValueError
        For an empty region or unknown polarity.
    """
    vals = x[region]
    if vals.size == 0:
        raise ValueError("empty region for the intensity outlier score")
    med = float(np.median(vals))
    mad = 1.4826 * float(np.median(np.abs(vals - med)))
    z = (x - med) / max(mad, 1e-6)
    return (_tail(z, polarity) * region).astype(np.float32)


def pixel_zscore(x: np.ndarray, mean: np.ndarray, std: np.ndarray, polarity: str = "both",
                 std_floor: float = 0.02) -> np.ndarray:
    """Baseline (b): per-pixel z-score against normal training statistics.

    ``mean``/``std`` are atlases shaped like ``x`` (``(z, H, W)``, slices
    already mapped by relative position).
    """
    z = (x - mean) / np.maximum(std, std_floor)
    return _tail(z, polarity).astype(np.float32)


def median_smooth(score: np.ndarray, size: tuple[int, int, int], sigma: float = 0.0) -> np.ndarray:
    """Median filter (no-op for size 1), then optional Gaussian smoothing with ``sigma`` pixels."""
    out = score if all(s <= 1 for s in size) else ndi.median_filter(score, size=size, mode="nearest")
    if sigma > 0:
        out = ndi.gaussian_filter(out, sigma=sigma, mode="nearest")
    return out


def fuse(components: dict[str, np.ndarray], cfg: ScoringConfig) -> np.ndarray:
    """Final score for ``cfg.method`` from the component maps.

    Raises
    ------
    ValueError
        When a needed component or scale is missing.
    """
    m = cfg.method
    keys = component_keys(cfg)
    for k in keys:
        if k not in components:
            raise ValueError(f"component {k!r} not computed")
    if m != "combined":
        return components[keys[0]]
    try:
        sr, si = cfg.scales[keys[0]], cfg.scales[keys[1]]
    except KeyError:
        raise ValueError("combined scoring needs calibrated scales for residual and intensity") from None
    return (components[keys[0]] / max(sr, 1e-9) + cfg.combine_weight * components[keys[1]] / max(si, 1e-9)).astype(np.float32)


def component_keys(cfg: ScoringConfig) -> list[str]:
    """Component maps ``cfg.method`` needs (``"intensity:<polarity>"`` style keys).

    Raises
    ------
    ValueError
        For an unknown method.
    """
    m = cfg.method
    if m in ("residual", "ssim"):
        return [m]
    if m in ("intensity", "pixel_zscore"):
        return [f"{m}:{cfg.polarity}"]
    if m == "combined":
        if cfg.combine_with == "feature":
            return ["residual", "feature"]
        return ["residual", f"{cfg.combine_with}:{cfg.polarity}"]
    raise ValueError(f"unknown scoring method {m!r}")


def method_variant(cfg: ScoringConfig, key: str) -> ScoringConfig:
    """The scoring configuration of a method key: ``"residual"``, ``"combined"`` or ``"combined@W"``
    (combined with weight ``W``), as stored in a checkpoint's ``method_thresholds``.

    Raises
    ------
    ValueError
        For a malformed weight.
    """
    from dataclasses import replace

    name, _, weight = key.partition("@")
    if weight:
        try:
            return replace(cfg, method=name, combine_weight=float(weight))
        except ValueError:
            raise ValueError(f"malformed method key {key!r}") from None
    return replace(cfg, method=name)


def calibrate_threshold(normal_scores: np.ndarray, target_fpr: float) -> float:
    """Threshold at the ``1 - target_fpr`` quantile of normal voxel scores.

    Parameters
    ----------
    normal_scores:
        Scores of voxels in normal studies (inside the scoring region).
    target_fpr:
        Desired voxel false-positive rate, in ``(0, 1)``.

    Returns
    -------
    float
        Threshold ``t`` such that about ``target_fpr`` of normal voxels have
        a score strictly above ``t``.

    Raises
    ------
    ValueError
        For an empty sample or a rate outside ``(0, 1)``.
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError("target_fpr must be in (0, 1)")
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("no normal scores to calibrate on")
    t = float(np.quantile(s, 1.0 - target_fpr, method="higher"))
    return max(t, 1e-12)


def to_unit(score: np.ndarray, threshold: float) -> np.ndarray:
    """Anomaly map in 0..1 with the threshold at 0.5: ``clip(score / (2 t), 0, 1)``."""
    return np.clip(score / (2.0 * threshold), 0.0, 1.0).astype(np.float32)
