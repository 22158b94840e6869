"""Is a series like what the model was trained and calibrated on?

At training, :func:`describe` measures every normal series (geometry,
coverage of the scoring region, normalised intensity distribution) and
:func:`domain_record` keeps the range of each measure in the checkpoint
(``meta["domain"]``). At prediction, :func:`check_domain` measures the new
series the same way and flags each measure outside its range (widened by a
tolerance). The result goes on the job and into the SR: a threshold
calibrated on one kind of series says little about another.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .volume import Volume

__all__ = ["MEASURES", "describe", "domain_record", "check_domain"]

log = logging.getLogger(__name__)

# measure -> (label, unit) for the warnings
MEASURES: dict[str, tuple[str, str]] = {
    "slice_spacing_mm": ("slice spacing", "mm"),
    "inplane_spacing_mm": ("in-plane pixel spacing", "mm"),
    "inplane_anisotropy": ("in-plane anisotropy", ""),
    "region_volume_ml": ("scored region (brain) volume", "mL"),
    "region_extent_mm": ("superior-inferior coverage of the region", "mm"),
    "intensity_median": ("median normalised intensity in the region", ""),
    "intensity_iqr": ("interquartile range of normalised intensity in the region", ""),
}


def describe(vol: Volume, region: np.ndarray, normalised: np.ndarray) -> dict[str, float]:
    """Measures of one (axial) series.

    Parameters
    ----------
    vol:
        The series on its axial grid.
    region:
        The scoring region's foreground (brain or head) on that grid.
    normalised:
        Normalised intensities on the model grid, with ``fg`` the region there:
        pass ``normalised[fg]``-style values (1-D) or the image (0 outside).

    Returns
    -------
    dict
        One float per key of :data:`MEASURES`.
    """
    sz, sy, sx = vol.spacing
    zs = np.nonzero(region.any(axis=(1, 2)))[0]
    vals = normalised[normalised != 0] if normalised.ndim > 1 else normalised
    q1, med, q3 = (float(v) for v in np.percentile(vals, [25, 50, 75])) if vals.size else (0.0, 0.0, 0.0)
    return {
        "slice_spacing_mm": float(sz),
        "inplane_spacing_mm": float(max(sy, sx)),
        "inplane_anisotropy": float(max(sy, sx) / min(sy, sx)),
        "region_volume_ml": float(region.sum()) * vol.voxel_volume_mm3 / 1000.0,
        "region_extent_mm": float((zs[-1] - zs[0] + 1) * sz) if zs.size else 0.0,
        "intensity_median": med,
        "intensity_iqr": q3 - q1,
    }


def domain_record(descriptions: list[dict[str, float]], sources: str = "") -> dict[str, Any]:
    """Ranges of each measure over the training / calibration series (stored in the checkpoint).

    Raises
    ------
    ValueError
        When no description is given.
    """
    if not descriptions:
        raise ValueError("no series to describe the training domain")
    ranges = {k: [float(min(d[k] for d in descriptions)), float(max(d[k] for d in descriptions))] for k in MEASURES}
    return {"ranges": ranges, "n_series": len(descriptions), "sources": sources, "tolerance": 0.1}


def _fmt(v: float, unit: str) -> str:
    return f"{v:.3g} {unit}".strip()


def check_domain(record: dict[str, Any] | None, measures: dict[str, float]) -> dict[str, Any]:
    """Compare a series' measures with the checkpoint's domain record.

    Parameters
    ----------
    record:
        ``meta["domain"]`` of the checkpoint (``None`` or empty: no check).
    measures:
        From :func:`describe`.

    Returns
    -------
    dict
        ``{"in_domain", "warnings", "checks"}`` (see
        :class:`~worker.engine.predictor.Prediction`); ``{}`` without a record.
    """
    if not record or "ranges" not in record:
        return {}
    tol = float(record.get("tolerance", 0.1))
    checks: dict[str, Any] = {}
    warnings: list[str] = []
    for key, (lo, hi) in record["ranges"].items():
        if key not in measures:
            continue
        v = float(measures[key])
        span = max(hi - lo, abs(hi) * 0.05, 1e-6)
        ok = lo - tol * span <= v <= hi + tol * span
        checks[key] = {"value": round(v, 4), "range": [round(lo, 4), round(hi, 4)], "ok": bool(ok)}
        if not ok:
            label, unit = MEASURES.get(key, (key, ""))
            warnings.append(f"{label} {_fmt(v, unit)} is outside the training range {_fmt(lo, '')}-{_fmt(hi, unit)}")
    return {"in_domain": not warnings, "warnings": warnings, "checks": checks}
