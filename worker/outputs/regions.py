"""Where each finding is: its own voxels, its key slice and that slice's outline.

The engine reports findings as the 26-connected regions of its mask
(``worker.engine.postprocess.clean_mask``) with a bounding box and a voxel
count, but no label image. :func:`label_findings` gives every mask voxel the
number of its finding again, so the SEG can hold one segment per finding and
the SR can point at it. :func:`key_slice` and :func:`outline` give the slice
a viewer should open for a finding and the finding's outline there, in the
image coordinates of an SR SCOORD (PS3.3 C.18.6.1.1: the top left corner of
the top left pixel is ``(0, 0)``, columns first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .types import FindingLike

__all__ = ["FindingRegion", "finding_regions", "label_findings", "outline"]

#: The engine's connectivity (26 neighbours), so components match its findings.
_CONN26 = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class FindingRegion:
    """One finding and where it lies.

    Attributes
    ----------
    finding:
        The engine's finding.
    number:
        1-based position in label order: the SEG segment number of the finding.
    slices:
        Slice indices ``z`` that hold voxels of the finding, ascending.
    key_slice:
        The slice with the largest cross-section of the finding (ties: the one
        nearest the middle of its extent).
    outline:
        Closed polygon ``(n, 2)`` of ``(column, row)`` pixel-corner coordinates
        around the largest part of the finding on the key slice; the first
        point is repeated at the end.
    area_pixels:
        Number of pixels of the finding on the key slice.
    """

    finding: FindingLike
    number: int
    slices: tuple[int, ...]
    key_slice: int
    outline: np.ndarray
    area_pixels: int

    @property
    def label(self) -> int:
        return int(self.finding.label)


def _inside(box: Sequence[tuple[int, int]], bbox: tuple[int, ...]) -> bool:
    """Whether the half-open ``(start, stop)`` spans of ``box`` lie in the inclusive ``bbox``."""
    z0, y0, x0, z1, y1, x1 = bbox
    bz, by, bx = box[0], box[1], box[2]
    return (z0 <= bz[0] and bz[1] - 1 <= z1 and y0 <= by[0] and by[1] - 1 <= y1
            and x0 <= bx[0] and bx[1] - 1 <= x1)


def label_findings(mask: np.ndarray, findings: Sequence[FindingLike]) -> tuple[np.ndarray, list[FindingLike]]:
    """A label image: voxel value ``k`` belongs to the ``k``-th finding in label order.

    Each 26-connected region of ``mask`` is matched to the finding with the
    same bounding box and voxel count; a region without such a twin goes to
    the smallest finding bounding box that contains it (findings of a coarser
    grouping than the engine's).

    Parameters
    ----------
    mask:
        Boolean ``(z, y, x)`` mask.
    findings:
        The engine's findings (any order).

    Returns
    -------
    tuple
        ``(labels, ordered)``: ``labels`` is uint16 ``(z, y, x)`` with 0 for
        background; ``ordered`` are the findings sorted by label.

    Raises
    ------
    ValueError
        A mask region that lies in no finding's bounding box, a finding that
        receives no voxel, or a voxel count that differs from the finding's.
    """
    mask = np.asarray(mask, dtype=bool)
    ordered = sorted(findings, key=lambda f: int(f.label))
    labels = np.zeros(mask.shape, np.uint16)
    if not ordered:
        if mask.any():
            raise ValueError("mask voxels without any finding")
        return labels, ordered
    comp, n = ndimage.label(mask, structure=_CONN26)
    boxes = ndimage.find_objects(comp)
    counts = np.bincount(comp.ravel(), minlength=n + 1)
    bbox_of = [tuple(int(v) for v in f.bbox_zyx) for f in ordered]
    for c in range(1, n + 1):
        sl = boxes[c - 1]
        if sl is None:
            continue
        span = tuple((s.start, s.stop) for s in sl)
        own = (span[0][0], span[1][0], span[2][0], span[0][1] - 1, span[1][1] - 1, span[2][1] - 1)
        twins = [k for k, f in enumerate(ordered) if bbox_of[k] == own and int(f.voxel_count) == int(counts[c])]
        if twins:
            k = twins[0]
        else:
            holders = [k for k in range(len(ordered)) if _inside(span, bbox_of[k])]
            if not holders:
                raise ValueError(f"a mask region of {int(counts[c])} voxel(s) lies outside every finding's bounding box")
            k = min(holders, key=lambda i: int(np.prod([b - a + 1 for a, b in zip(bbox_of[i][:3], bbox_of[i][3:])])))
        region = comp[sl] == c
        labels[sl][region] = k + 1
    got = np.bincount(labels.ravel(), minlength=len(ordered) + 1)
    for k, f in enumerate(ordered, start=1):
        if int(got[k]) == 0:
            raise ValueError(f"finding {int(f.label)} has no voxel of the mask")
        if int(got[k]) != int(f.voxel_count):
            raise ValueError(
                f"finding {int(f.label)} has {int(f.voxel_count)} voxel(s) but {int(got[k])} mask voxel(s) match it"
            )
    return labels, ordered


def outline(region: np.ndarray) -> np.ndarray:
    """Closed outer boundary of the largest 8-connected part of a 2D region.

    The polygon runs along pixel edges (pixel-corner coordinates, ``(column,
    row)``) with the region on its right-hand side (clockwise on screen), and
    keeps only its corners; the first point is repeated at the end.

    Raises
    ------
    ValueError
        ``region`` has no pixel.
    """
    region = np.asarray(region, dtype=bool)
    lab, n = ndimage.label(region, structure=np.ones((3, 3), bool))
    if n == 0:
        raise ValueError("empty region has no outline")
    part = np.pad(lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1, 1)
    # Directed boundary edges between pixel corners (row, col), region on the right.
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, c in zip(*np.nonzero(part)):
        r, c = int(r), int(c)
        if not part[r - 1, c]:
            out.setdefault((r, c), []).append((r, c + 1))  # top edge, eastwards
        if not part[r, c + 1]:
            out.setdefault((r, c + 1), []).append((r + 1, c + 1))  # right edge, southwards
        if not part[r + 1, c]:
            out.setdefault((r + 1, c + 1), []).append((r + 1, c))  # bottom edge, westwards
        if not part[r, c - 1]:
            out.setdefault((r + 1, c), []).append((r, c))  # left edge, northwards
    rows, cols = np.nonzero(part)
    start = (int(rows[0]), int(cols[0]))  # top-left corner of the top-left pixel: on the outer boundary
    points = [start]
    prev, cur = start, out[start][0]
    out[start].remove(cur)
    while cur != start:
        points.append(cur)
        heading = (cur[0] - prev[0], cur[1] - prev[1])
        # where two edges leave one corner (pixels touching diagonally), turn
        # left, onto the diagonal neighbour: it stays inside (8-connectivity)
        left = (-heading[1], heading[0])
        right = (heading[1], -heading[0])
        nxt = None
        for step in (left, heading, right):
            cand = (cur[0] + step[0], cur[1] + step[1])
            if cand in out.get(cur, []):
                nxt = cand
                break
        if nxt is None:  # pragma: no cover - every boundary corner has an outgoing edge
            raise RuntimeError("outline is not closed")
        out[cur].remove(nxt)
        prev, cur = cur, nxt
    points.append(start)
    poly = np.asarray(points, dtype=np.float64)
    keep = [0]
    for i in range(1, len(poly) - 1):  # corners only
        a, b, c = poly[i - 1], poly[i], poly[i + 1]
        if (b[0] - a[0]) * (c[1] - b[1]) != (b[1] - a[1]) * (c[0] - b[0]):
            keep.append(i)
    keep.append(len(poly) - 1)
    poly = poly[keep]
    # padded (row, col) corners -> (column, row) of the original image
    return np.stack([poly[:, 1] - 1.0, poly[:, 0] - 1.0], axis=1)


def finding_regions(labels: np.ndarray, ordered: Sequence[FindingLike]) -> list[FindingRegion]:
    """One :class:`FindingRegion` per finding of :func:`label_findings`' result."""
    out = []
    for number, f in enumerate(ordered, start=1):
        sel = labels == number
        area = sel.reshape(sel.shape[0], -1).sum(axis=1)
        slices = tuple(int(z) for z in np.flatnonzero(area))
        middle = (slices[0] + slices[-1]) / 2.0
        key = max(slices, key=lambda z: (int(area[z]), -abs(z - middle), -z))
        out.append(FindingRegion(f, number, slices, key, outline(sel[key]), int(area[key])))
    return out
