"""Reading DICOM image series into :class:`~worker.engine.volume.Volume` objects.

Single-frame series are sorted by the projection of ImagePositionPatient on
the slice normal (row × column direction), ties broken by InstanceNumber.
Enhanced multi-frame objects use the per-frame functional groups. Rescale
slope/intercept are applied. Mixed orientations, sizes or spacings, and two
images at one slice position (echoes, phases or b-values stored in one
series), raise :class:`SeriesError`.

Pixel data is decoded by pydicom with the plugins the project installs
(pylibjpeg with its libjpeg and openjpeg plugins, pyjpegls): every image
transfer syntax the node's SCP accepts (uncompressed little and big endian,
deflate, the JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE) decodes here. A
transfer syntax pydicom cannot decode at all (MPEG/HEVC video, JPEG 2000
Part 2 multi-component) or whose plugin is missing raises a
:class:`SeriesError` that names it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .volume import Volume

__all__ = ["SeriesError", "FrameRef", "load_series", "load_series_headers", "load_series_refs", "load_directory",
           "find_series"]

log = logging.getLogger(__name__)

_TOL = 1e-3
_NON_IMAGE = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC"}


class SeriesError(ValueError):
    """The files do not form one consistent image series."""


@dataclass(frozen=True)
class FrameRef:
    """Source of one slice: SOP Instance UID and 1-based frame number (``None`` for single-frame)."""

    sop_instance_uid: str
    frame_number: int | None = None


@dataclass
class _Slice:
    pos: np.ndarray
    row: np.ndarray
    col: np.ndarray
    spacing: tuple[float, float]
    pixels: np.ndarray
    instance: int
    ref: FrameRef
    thickness: float | None


def _f(v: Any, n: int) -> np.ndarray:
    a = np.asarray([float(x) for x in v], np.float64)
    if a.size != n:
        raise SeriesError(f"expected {n} values, got {a.size}")
    return a


def _seq_item(ds: Any, *names: str) -> Any:
    for name in names:
        seq = getattr(ds, name, None)
        if seq:
            return seq[0]
    return None


def _frame_attr(shared: Any, frame: Any, seq: str) -> Any:
    item = _seq_item(frame, seq) if frame is not None else None
    return item if item is not None else (_seq_item(shared, seq) if shared is not None else None)


def _transfer_syntax(ds: Any) -> Any:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    return UID(str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))


def _decode(ds: Any, name: str) -> np.ndarray:
    """``ds.pixel_array``, or a :class:`SeriesError` that names the transfer syntax and the cause."""
    from pydicom.pixels import get_decoder

    ts = _transfer_syntax(ds)
    label = f"{ts} ({ts.name})" if ts.name != ts else str(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise SeriesError(
            f"{name}: pixel data in transfer syntax {label} cannot be decoded (no decoder exists for it: "
            "video or multi-component compression is not an image series that can be analysed)"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise SeriesError(f"{name}: no decoder installed for transfer syntax {label} ({missing})")
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated data, unsupported parameters ...
        raise SeriesError(
            f"{name}: cannot decode pixel data in transfer syntax {label} ({type(exc).__name__}: {exc})"
        ) from None


def _slices_from_dataset(ds: Any, name: str = "instance") -> list[_Slice]:
    nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
    uid = str(ds.SOPInstanceUID)
    pix = _decode(ds, name)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
        frames = ds.PerFrameFunctionalGroupsSequence
        if pix.ndim == 2:
            pix = pix[None]
        if len(frames) != pix.shape[0]:
            raise SeriesError("number of per-frame functional groups differs from the number of frames")
        out = []
        for i, fr in enumerate(frames):
            plane = _frame_attr(shared, fr, "PlanePositionSequence")
            orient = _frame_attr(shared, fr, "PlaneOrientationSequence")
            meas = _frame_attr(shared, fr, "PixelMeasuresSequence")
            trans = _frame_attr(shared, fr, "PixelValueTransformationSequence")
            if plane is None or orient is None or meas is None:
                raise SeriesError("multi-frame object lacks plane position, orientation or pixel measures")
            iop = _f(orient.ImageOrientationPatient, 6)
            slope = float(getattr(trans, "RescaleSlope", 1.0) or 1.0) if trans is not None else 1.0
            inter = float(getattr(trans, "RescaleIntercept", 0.0) or 0.0) if trans is not None else 0.0
            ps = _f(meas.PixelSpacing, 2)
            th = getattr(meas, "SliceThickness", None)
            out.append(_Slice(_f(plane.ImagePositionPatient, 3), iop[:3], iop[3:], (ps[0], ps[1]),
                              pix[i].astype(np.float32) * slope + inter, i + 1, FrameRef(uid, i + 1),
                              float(th) if th is not None else None))
        return out
    if nframes > 1:
        raise SeriesError("legacy multi-frame object without functional groups is not supported")
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if key not in ds:
            raise SeriesError(f"instance lacks {key}")
    iop = _f(ds.ImageOrientationPatient, 6)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    ps = _f(ds.PixelSpacing, 2)
    th = getattr(ds, "SliceThickness", None)
    return [_Slice(_f(ds.ImagePositionPatient, 3), iop[:3], iop[3:], (ps[0], ps[1]),
                   pix.astype(np.float32) * slope + inter, int(getattr(ds, "InstanceNumber", 0) or 0),
                   FrameRef(uid, None), float(th) if th is not None else None)]


def load_series_refs(paths: list[Path]) -> tuple[Volume, list[FrameRef]]:
    """Like :func:`load_series` but returns a :class:`FrameRef` per slice (frame numbers for multi-frame).

    Raises
    ------
    SeriesError
        When the files are unreadable, of different series, or inconsistent.
    """
    vol, refs, _ = _load_series(paths, keep_headers=False)
    return vol, refs


def load_series_headers(paths: list[Path]) -> tuple[Volume, list[FrameRef], list[Any]]:
    """Like :func:`load_series_refs`, also returning each file's header.

    The headers (pydicom data sets without Pixel Data, in the order of
    ``paths``) are what the SEG/SR builder needs, so a worker reads every
    file once.

    Raises
    ------
    SeriesError
        When the files are unreadable, of different series, or inconsistent.
    """
    return _load_series(paths, keep_headers=True)


def _load_series(paths: list[Path], *, keep_headers: bool) -> tuple[Volume, list[FrameRef], list[Any]]:
    import pydicom

    if not paths:
        raise SeriesError("no files given")
    slices: list[_Slice] = []
    headers: list[Any] = []
    series_uids, modalities = set(), set()
    for p in paths:
        try:
            ds = pydicom.dcmread(str(p))
        except Exception as exc:  # noqa: BLE001
            raise SeriesError(f"cannot read {Path(p).name}: {type(exc).__name__}") from None
        if "PixelData" not in ds:
            raise SeriesError(f"{Path(p).name} has no pixel data")
        series_uids.add(str(getattr(ds, "SeriesInstanceUID", "")))
        modalities.add(str(getattr(ds, "Modality", "OT")))
        slices.extend(_slices_from_dataset(ds, Path(p).name))
        if keep_headers:
            del ds.PixelData  # also drops pydicom's cached pixel array
            headers.append(ds)
    if len(series_uids) > 1:
        raise SeriesError(f"files belong to {len(series_uids)} different series")
    first = slices[0]
    for s in slices[1:]:
        if not (np.allclose(s.row, first.row, atol=_TOL) and np.allclose(s.col, first.col, atol=_TOL)):
            raise SeriesError("mixed image orientations in one series")
        if s.pixels.shape != first.pixels.shape:
            raise SeriesError(f"mixed image sizes in one series: {s.pixels.shape} vs {first.pixels.shape}")
        if not np.allclose(s.spacing, first.spacing, rtol=1e-3):
            raise SeriesError("mixed pixel spacings in one series")
    normal = np.cross(first.row, first.col)
    if np.linalg.norm(normal) < 0.5:
        raise SeriesError("degenerate ImageOrientationPatient")
    normal /= np.linalg.norm(normal)
    dist = np.array([float(s.pos @ normal) for s in slices])
    order = sorted(range(len(slices)), key=lambda i: (round(float(dist[i]), 4), slices[i].instance))
    slices = [slices[i] for i in order]
    dist = dist[order]
    steps = np.diff(dist)
    duplicates = int(np.count_nonzero(steps <= _TOL))
    if duplicates:
        uid = next(iter(series_uids))
        raise SeriesError(
            f"series {uid} has {len(slices)} images at {len(slices) - duplicates} slice positions: "
            "several images share a position (echoes, phases, b-values or repeated acquisitions "
            "stored in one series), so it is not one volume; send or route one image per position"
        )
    steps = steps[steps > _TOL]
    if len(steps):
        dz = float(np.median(steps))
        if np.any(np.abs(steps - dz) > 0.1 * dz):
            log.warning("non-uniform slice spacing (%.3f..%.3f mm); using the median %.3f mm",
                        steps.min(), steps.max(), dz)
    else:
        dz = first.thickness or 1.0
    direction = np.stack([first.row, first.col, normal], axis=1)
    arr = np.stack([s.pixels for s in slices]).astype(np.float32)
    vol = Volume(
        array=arr,
        spacing=(dz, float(first.spacing[0]), float(first.spacing[1])),  # PixelSpacing = (row spacing, column spacing)
        origin=tuple(float(v) for v in slices[0].pos),  # type: ignore[arg-type]
        direction=direction,
        modality=modalities.pop() if len(modalities) == 1 else "OT",
        meta={"series_uid": series_uids.pop()},
    )
    return vol, [s.ref for s in slices], headers


def load_series(paths: list[Path]) -> tuple[Volume, list[str]]:
    """Load one series.

    Parameters
    ----------
    paths:
        Files of one series (single-frame instances, or enhanced multi-frame
        objects).

    Returns
    -------
    tuple
        The volume ``(z, y, x)`` and the SOP Instance UID of every slice in z
        order (for a multi-frame object its UID repeats; use
        :func:`load_series_refs` for frame numbers).

    Raises
    ------
    SeriesError
        When the files are unreadable, of different series, or inconsistent
        (orientation, size, spacing).
    """
    vol, refs = load_series_refs(paths)
    return vol, [r.sop_instance_uid for r in refs]


def find_series(directory: Path) -> dict[str, list[Path]]:
    """Group image files below ``directory`` by SeriesInstanceUID (non-DICOM and non-image files skipped)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(Path(directory).rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if str(getattr(ds, "Modality", "")) in _NON_IMAGE or "SeriesInstanceUID" not in ds:
            continue
        groups[str(ds.SeriesInstanceUID)].append(p)
    return dict(groups)


def load_directory(directory: Path) -> list[Volume]:
    """Load every image series below ``directory`` (for training on local normals).

    Series that fail to load are skipped with a warning (no patient data is
    logged). ``Volume.meta["series_uid"]`` identifies each volume.

    Raises
    ------
    SeriesError
        When the directory does not exist or holds no loadable series.
    """
    d = Path(directory)
    if not d.is_dir():
        raise SeriesError(f"{d} is not a directory")
    out: list[Volume] = []
    groups = find_series(d)
    for uid, files in groups.items():
        try:
            vol, _ = load_series(files)
        except SeriesError as exc:
            log.warning("skipping a series of %d files: %s", len(files), exc)
            continue
        if vol.shape[0] < 1:
            continue
        out.append(vol)
    if not out:
        raise SeriesError(f"no loadable image series below {d}")
    return out
