"""Server-side key images of a job: the source slices with the largest
anomaly area, windowed to grayscale, with the outline of the anomaly mask in
red, encoded as PNG.

* The source series is the job's ``source_series_uid`` as stored on the node
  (``node.store.root`` + ``Instance.path``), sorted along the slice normal.
* The mask comes from the job's SEG output (``kind = "seg"``, path relative to
  ``<data_dir>/outputs``), decoded with highdicom; each SEG frame is mapped to
  its source image through the per-frame DerivationImageSequence (or, when
  absent, through its plane position).
* One key image per finding: the mask's 26-connected components (as the
  engine labels its findings), largest first, each shown at the slice where
  it has its largest area (ties: the slice nearest its centre), up to
  ``max_images``.
* Without a SEG (nothing found, or not finished) the key image is the middle
  slice without outline.

The outline is the inner boundary of the mask (``mask XOR erosion(mask)``),
drawn in pure red (255, 0, 0) on a grayscale image, at the source resolution.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from PIL import Image
from pydicom.pixels import apply_modality_lut
from scipy import ndimage
from sqlalchemy import func, select

from pacs_node.db.models import Instance, Job, Output, Series
from pacs_node.node import Node

__all__ = [
    "KeyImage",
    "KeyImagePlan",
    "OUTLINE_RGB",
    "SourceSlice",
    "outline",
    "plan_key_images",
    "render_key_image",
    "seg_masks",
    "sorted_source_slices",
    "window_to_uint8",
]

logger = logging.getLogger(__name__)

OUTLINE_RGB = (255, 0, 0)
_HEADER_TAGS = ["SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber"]


@dataclass(frozen=True)
class SourceSlice:
    """One stored instance of the source series."""

    sop_instance_uid: str
    path: Path
    position: float
    instance_number: int | None


@dataclass(frozen=True)
class KeyImage:
    """One key image: a source slice and the area (pixels) of its finding
    there (``finding``: 1 = the largest; None for the middle slice)."""

    n: int
    sop_instance_uid: str
    slice_index: int
    area_px: int
    finding: int | None = None


@dataclass
class KeyImagePlan:
    """Which slices to show for a job and the masks to outline on them."""

    job_id: int
    state: str
    has_seg: bool
    slices: int
    images: list[KeyImage]
    #: Findings (connected components) in the SEG; more than ``images`` when capped.
    findings: int = 0
    masks: dict[str, NDArray[np.bool_]] = field(default_factory=dict, repr=False)
    paths: dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def has_findings(self) -> bool:
        """True when at least one key image carries an outline."""
        return any(k.area_px > 0 for k in self.images)


def _position(ds: pydicom.Dataset) -> float | None:
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return None
    normal = np.cross(np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float))
    return float(np.dot(normal, np.asarray(ipp, dtype=float)))


def sorted_source_slices(node: Node, series_uid: str) -> list[SourceSlice]:
    """The stored instances of a series, sorted along the slice normal
    (instance number, then SOP Instance UID, when positions are missing).

    Parameters
    ----------
    node:
        The node (database and storage).
    series_uid:
        Series Instance UID.

    Returns
    -------
    list of SourceSlice
        Sorted slices whose files exist.
    """
    with node.db.sessionmaker() as s:
        rows = s.execute(
            select(Instance.sop_instance_uid, Instance.path, Instance.instance_number)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.series_instance_uid == series_uid)
        ).all()
    out: list[SourceSlice] = []
    for sop_uid, relpath, number in rows:
        try:
            path = node.store.path_of(relpath)
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (OSError, ValueError, InvalidDicomError) as exc:
            logger.warning("instance %s unreadable: %s", sop_uid, exc.__class__.__name__)
            continue
        pos = _position(ds)
        out.append(SourceSlice(sop_uid, path, pos if pos is not None else float(number or 0), number))
    out.sort(key=lambda x: (x.position, x.instance_number or 0, x.sop_instance_uid))
    return out


def _frame_source_uid(item: Any) -> str | None:
    for deriv in item.get("DerivationImageSequence", []):
        for src in deriv.get("SourceImageSequence", []):
            uid = src.get("ReferencedSOPInstanceUID")
            if uid:
                return str(uid)
    return None


def _frame_position(item: Any, normal: NDArray[np.float64] | None) -> float | None:
    planes = item.get("PlanePositionSequence", [])
    if normal is None or not planes or "ImagePositionPatient" not in planes[0]:
        return None
    return float(np.dot(normal, np.asarray(planes[0].ImagePositionPatient, dtype=float)))


def _seg_normal(seg: pydicom.Dataset) -> NDArray[np.float64] | None:
    shared = seg.get("SharedFunctionalGroupsSequence", [])
    if shared and "PlaneOrientationSequence" in shared[0]:
        iop = shared[0].PlaneOrientationSequence[0].ImageOrientationPatient
        return np.cross(np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float))
    return None


def seg_masks(path: Path, slices: list[SourceSlice] | None = None) -> dict[str, NDArray[np.bool_]]:
    """Foreground mask per source SOP Instance UID (all segments combined).

    Parameters
    ----------
    path:
        DICOM SEG file (BINARY, FRACTIONAL or LABELMAP).
    slices:
        Source slices, used to place frames without a source reference by
        their plane position.

    Returns
    -------
    dict
        SOP Instance UID -> boolean mask (rows, columns).
    """
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    seg_type = str(seg.get("SegmentationType", "BINARY")).upper()
    if seg_type == "FRACTIONAL":
        foreground = frames > (float(seg.get("MaximumFractionalValue", 255)) / 2.0)
    else:
        foreground = frames > 0
    normal = _seg_normal(seg)
    by_position = {round(s.position, 2): s.sop_instance_uid for s in slices or []}
    masks: dict[str, NDArray[np.bool_]] = {}
    for i, item in enumerate(seg.get("PerFrameFunctionalGroupsSequence", [])):
        if i >= len(foreground):
            break
        uid = _frame_source_uid(item)
        if uid is None:
            pos = _frame_position(item, normal)
            uid = by_position.get(round(pos, 2)) if pos is not None else None
        if uid is None:
            continue
        mask = foreground[i].astype(bool)
        masks[uid] = masks[uid] | mask if uid in masks else mask
    return masks


def outline(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Inner boundary of a mask: ``mask XOR binary_erosion(mask)``.

    Parameters
    ----------
    mask:
        2-D boolean mask.

    Returns
    -------
    ndarray of bool
        Pixels of the mask that touch the background (4-connectivity) or the
        image border.
    """
    m = np.asarray(mask, dtype=bool)
    return m ^ ndimage.binary_erosion(m, border_value=0)


def window_to_uint8(ds: pydicom.Dataset, pixels: NDArray[Any]) -> NDArray[np.uint8]:
    """Window a slice to 8-bit grayscale.

    Uses the first WindowCenter/WindowWidth of the instance, else the 0.5 to
    99.5 percentiles of the slice; MONOCHROME1 is inverted.

    Parameters
    ----------
    ds:
        The instance (window and photometric attributes).
    pixels:
        Modality values (after the modality LUT).

    Returns
    -------
    ndarray of uint8
        The windowed image.
    """
    values = pixels.astype(np.float64)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, MultiValue) else center)
        w = float(width[0] if isinstance(width, MultiValue) else width)
        lo, hi = c - w / 2.0, c + w / 2.0
    else:
        lo, hi = (float(x) for x in np.percentile(values, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((values - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return out


def _fit(mask: NDArray[np.bool_], shape: tuple[int, int]) -> NDArray[np.bool_]:
    if mask.shape == shape:
        return mask
    rows = (np.arange(shape[0]) * mask.shape[0] // shape[0]).clip(0, mask.shape[0] - 1)
    cols = (np.arange(shape[1]) * mask.shape[1] // shape[1]).clip(0, mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def render_slice(path: Path, mask: NDArray[np.bool_] | None) -> bytes:
    """PNG of one stored slice with the outline of ``mask`` in red.

    Parameters
    ----------
    path:
        Source instance file.
    mask:
        Anomaly mask of this slice, or None.

    Returns
    -------
    bytes
        RGB PNG at the slice's resolution (Columns x Rows).
    """
    ds = pydicom.dcmread(path)
    pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds))
    if pixels.ndim == 3:  # multi-frame: the first frame
        pixels = pixels[0]
    gray = window_to_uint8(ds, pixels)
    rgb = np.stack([gray, gray, gray], axis=-1)
    if mask is not None:
        edge = outline(_fit(mask, (gray.shape[0], gray.shape[1])))
        rgb[edge] = OUTLINE_RGB
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _outputs_dir(node: Node) -> Path:
    return (node.settings.data_dir / "outputs").resolve()


def _seg_output(node: Node, job_id: int) -> Path | None:
    with node.db.sessionmaker() as s:
        relpath = s.execute(
            select(Output.path).where(Output.job_id == job_id, Output.kind == "seg").order_by(Output.id.desc())
        ).scalars().first()
    if relpath is None:
        return None
    root = _outputs_dir(node)
    path = (root / relpath).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        logger.warning("job %d: SEG output %s missing", job_id, relpath)
        return None
    return path


def _source_series(node: Node, job: Job) -> str | None:
    if job.source_series_uid:
        return job.source_series_uid
    with node.db.sessionmaker() as s:
        return s.execute(
            select(Series.series_instance_uid)
            .where(Series.study_id == job.study_id, Series.modality.not_in(["SEG", "SR", "PR", "KO"]))
            .order_by(Series.num_instances.desc(), Series.id)
        ).scalars().first()


_CONN26 = np.ones((3, 3, 3), bool)


def finding_slices(masks: dict[str, NDArray[np.bool_]], index: dict[str, int]) -> list[tuple[int, int, int]]:
    """Where to show each finding of a mask.

    Parameters
    ----------
    masks:
        SOP Instance UID -> mask of that slice (:func:`seg_masks`).
    index:
        SOP Instance UID -> position of the slice in the sorted series.

    Returns
    -------
    list of (int, int, int)
        ``(slice_index, area_px, voxels)`` per 26-connected component,
        largest component first: the slice where it has its largest area
        (ties: nearest its centre slice) and that area.
    """
    placed = [(index[uid], m) for uid, m in masks.items() if uid in index and m.any()]
    if not placed:
        return []
    shape = placed[0][1].shape
    z0 = min(z for z, _ in placed)
    depth = max(z for z, _ in placed) - z0 + 1
    volume = np.zeros((depth, *shape), bool)
    for z, m in placed:
        volume[z - z0] |= _fit(m, (shape[0], shape[1]))
    labels, n = ndimage.label(volume, structure=_CONN26)
    zs = np.nonzero(labels)[0]
    ids = labels[labels > 0]
    # per (component, slice) areas, in one pass
    areas = np.bincount((ids - 1) * depth + zs, minlength=n * depth).reshape(n, depth)
    out = []
    for comp in range(n):
        row = areas[comp]
        present = np.nonzero(row)[0]
        centre = (present[0] + present[-1]) / 2.0
        best = max(present, key=lambda z: (int(row[z]), -abs(float(z) - centre)))
        out.append((int(best) + z0, int(row[best]), int(row.sum())))
    order = sorted(range(n), key=lambda c: (-out[c][2], out[c][0]))
    return [out[c] for c in order]


_cache: OrderedDict[tuple[Any, ...], KeyImagePlan] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 16


def plan_key_images(node: Node, job_id: int, *, max_images: int = 8) -> KeyImagePlan | None:
    """Choose a job's key images.

    Parameters
    ----------
    node:
        The node.
    job_id:
        Job id.
    max_images:
        At most this many key images: one per finding, largest first.

    Returns
    -------
    KeyImagePlan or None
        None when there is no such job. Without a SEG (or with an empty one)
        the plan holds the middle slice without mask.
    """
    with node.db.sessionmaker() as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        state = job.state
        series_uid = _source_series(node, job)
        count = s.execute(
            select(func.count(Instance.id))
            .join(Series, Instance.series_id == Series.id)
            .where(Series.series_instance_uid == series_uid)
        ).scalar_one()
    seg_path = _seg_output(node, job_id)
    mtime = seg_path.stat().st_mtime_ns if seg_path else 0
    key = (id(node), job_id, series_uid, count, str(seg_path), mtime, max_images)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            cached.state = state
            return cached
    slices = sorted_source_slices(node, series_uid) if series_uid else []
    index = {sl.sop_instance_uid: i for i, sl in enumerate(slices)}
    masks: dict[str, NDArray[np.bool_]] = {}
    if seg_path is not None:
        try:
            masks = seg_masks(seg_path, slices)
        except Exception as exc:  # noqa: BLE001 - an unreadable SEG: show the slices without outline
            logger.warning("job %d: SEG %s unreadable: %s", job_id, seg_path.name, exc)
    found = finding_slices(masks, index)
    if found:
        images = [KeyImage(n, slices[z].sop_instance_uid, z, area, n + 1)
                  for n, (z, area, _) in enumerate(found[:max_images])]
    elif slices:
        mid = len(slices) // 2
        images = [KeyImage(0, slices[mid].sop_instance_uid, mid, 0)]
    else:
        images = []
    plan = KeyImagePlan(
        job_id=job_id,
        state=state,
        has_seg=seg_path is not None,
        slices=len(slices),
        images=images,
        findings=len(found),
        masks={k.sop_instance_uid: masks[k.sop_instance_uid] for k in images if k.area_px > 0},
        paths={k.sop_instance_uid: slices[k.slice_index].path for k in images},
    )
    with _cache_lock:
        _cache[key] = plan
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return plan


def render_key_image(plan: KeyImagePlan, n: int) -> bytes | None:
    """PNG of key image ``n`` of a plan.

    Parameters
    ----------
    plan:
        From :func:`plan_key_images`.
    n:
        Index of the key image (0 = largest anomaly area).

    Returns
    -------
    bytes or None
        The PNG, or None when ``n`` is out of range.
    """
    if not 0 <= n < len(plan.images):
        return None
    image = plan.images[n]
    return render_slice(plan.paths[image.sop_instance_uid], plan.masks.get(image.sop_instance_uid))
