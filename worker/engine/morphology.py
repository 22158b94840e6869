"""Exact, fast binary morphology shared by pre- and post-processing.

Each function equals a ``scipy.ndimage`` call (tested against it) but uses
shifted views of the array or one labelling pass instead of scipy's generic
structuring-element loops, which dominate the cost on a 400 x 256 x 256
series: in-plane 3 x 3 erosion/dilation (square or cross) and filling of
enclosed background.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["dilate_2d", "erode_2d", "fill_enclosed"]


def _tap(m: np.ndarray, axis: int, erode: bool) -> np.ndarray:
    """Combine every pixel with its two neighbours along ``axis`` (AND to erode, OR to dilate).

    Pixels beyond the array count as background, as in scipy's binary
    erosion/dilation with ``border_value=0``.
    """
    out = m.copy()
    lo = [slice(None)] * m.ndim
    hi = [slice(None)] * m.ndim
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    if erode:
        out[tuple(hi)] &= m[tuple(lo)]
        out[tuple(lo)] &= m[tuple(hi)]
        edge = [slice(None)] * m.ndim
        for end in (0, -1):
            edge[axis] = slice(end, end + 1 if end == 0 else None)
            out[tuple(edge)] = False
    else:
        out[tuple(hi)] |= m[tuple(lo)]
        out[tuple(lo)] |= m[tuple(hi)]
    return out


def erode_2d(mask: np.ndarray, *, square: bool) -> np.ndarray:
    """In-plane erosion of a ``(z, y, x)`` mask with a 3 x 3 square or cross.

    Equal to ``scipy.ndimage.binary_erosion`` with that structure in every
    slice (``structure[None]``): the square is separable (x, then y), the
    cross is the intersection of the two 3-pixel lines.
    """
    m = np.asarray(mask, bool)
    if square:
        return _tap(_tap(m, 2, True), 1, True)
    return _tap(m, 2, True) & _tap(m, 1, True)


def dilate_2d(mask: np.ndarray, *, square: bool) -> np.ndarray:
    """In-plane dilation of a ``(z, y, x)`` mask with a 3 x 3 square or cross (see :func:`erode_2d`)."""
    m = np.asarray(mask, bool)
    if square:
        return _tap(_tap(m, 2, False), 1, False)
    return _tap(m, 2, False) | _tap(m, 1, False)


def fill_enclosed(mask: np.ndarray, structure: np.ndarray, border_axes: Sequence[int]) -> np.ndarray:
    """Set every background region that touches no border along ``border_axes``.

    One labelling of the background (connectivity ``structure``) replaces
    scipy's iterated dilation from the border.

    Parameters
    ----------
    mask:
        Boolean array.
    structure:
        Connectivity of the background, as for ``scipy.ndimage.label``.
    border_axes:
        Axes whose first and last planes are "outside": ``(1, 2)`` with an
        in-plane structure fills holes slice by slice; every axis with the
        6-connected structure is ``scipy.ndimage.binary_fill_holes``.

    Returns
    -------
    numpy.ndarray
        ``mask`` with every enclosed background region set.
    """
    m = np.asarray(mask, bool)
    lab, n = ndi.label(~m, structure=structure)
    if n == 0:
        return m.copy()
    outside = np.zeros(n + 1, bool)
    for axis in border_axes:
        for end in (0, -1):
            outside[np.unique(np.take(lab, end, axis=axis))] = True
    outside[0] = True  # label 0 is the mask itself
    return m | ~outside[lab]
