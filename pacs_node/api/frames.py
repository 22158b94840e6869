"""Frames of a stored instance (WADO-RS, PS3.18 §10.4.1.1.5 / §8.7.3.5).

Representations:

* **native** (the default, ``multipart/related; type="application/octet-stream"``
  with no transfer syntax or ``transfer-syntax=1.2.840.10008.1.2.1``):
  uncompressed little-endian frame bytes, as in Explicit VR Little Endian.
  Uncompressed files give their stored bytes (a 1-bit frame is re-packed to
  start on a byte). Compressed files are decoded with pydicom (pylibjpeg,
  openjpeg, RLE): samples come interleaved (Planar Configuration 0) and
  colour JPEG frames as RGB, as pydicom decodes them (PS3.5 §8.2.1).
* **as stored** (``transfer-syntax=*``, or the stored syntax's media type such
  as ``image/jpeg``, ``image/jp2``, ``image/jls``, ``image/dicom-rle``): the
  compressed frame bytes, untouched. Each part's Content-Type carries the
  ``transfer-syntax`` parameter (what Cornerstone / OHIF read to decode).

The node never re-encodes: asking for another compressed syntax answers 406.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacs_node.api.dicom_json import PIXEL_TAGS
from pacs_node.api.dicomweb import MediaRange

__all__ = [
    "FrameError",
    "FrameMedia",
    "NoPixelDataError",
    "choose_frame_media",
    "parse_frame_list",
    "read_frames",
    "read_pixel_data",
]

logger = logging.getLogger(__name__)

OCTET = "application/octet-stream"
_NATIVE_LE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
_NATIVE = _NATIVE_LE | {ExplicitVRBigEndian}
#: Media type of each compressed transfer syntax (PS3.18 Table 8.7.3-5).
MEDIA_OF_SYNTAX = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
_MAX_LIST = 10_000


class FrameError(ValueError):
    """A malformed frame list, or a frame number the instance does not have."""


class NoPixelDataError(LookupError):
    """The instance has no pixel data."""


@dataclass(frozen=True)
class FrameMedia:
    """The representation chosen for the frames of one instance."""

    media_type: str
    transfer_syntax: str
    #: Decode / extract to native little-endian bytes (else: as stored).
    native: bool

    @property
    def part_type(self) -> str:
        """Content-Type of each part.

        Returns
        -------
        str
            E.g. ``application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1``.
        """
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


def parse_frame_list(text: str) -> list[int]:
    """Parse ``1,2,5`` (1-based frame numbers).

    Parameters
    ----------
    text:
        The ``{frames}`` path segment.

    Returns
    -------
    list of int
        The numbers, in the order given.

    Raises
    ------
    FrameError
        Empty entries, non-numbers, numbers below 1, or more than 10000.
    """
    items = text.split(",")
    if len(items) > _MAX_LIST:
        raise FrameError(f"at most {_MAX_LIST} frames per request")
    out = []
    for item in items:
        item = item.strip()
        if not item.isdigit() or len(item) > 9 or int(item) < 1:
            raise FrameError("a frame list is comma-separated frame numbers starting at 1, e.g. 1,2,3")
        out.append(int(item))
    return out


def _as_stored(stored: str) -> FrameMedia:
    if stored in _NATIVE:
        return FrameMedia(OCTET, ExplicitVRLittleEndian, True)
    return FrameMedia(OCTET, stored, False)


def _choose_one(r: MediaRange, stored: str) -> FrameMedia | None:
    native = FrameMedia(OCTET, ExplicitVRLittleEndian, True)
    if r.media_type in ("*/*", "multipart/*") or (r.media_type == "multipart/related" and "type" not in r.params):
        return _as_stored(stored) if r.params.get("transfer-syntax") == "*" else native
    if r.media_type != "multipart/related":
        return None
    kind = _ALIASES.get(r.params["type"], r.params["type"])
    ts = r.params.get("transfer-syntax")
    if kind in ("*/*", "application/*", OCTET):
        if ts == "*":
            return _as_stored(stored)
        if ts in (None, "", ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            return native
        if ts == stored and kind != OCTET:
            return _as_stored(stored)
        return None
    stored_media = MEDIA_OF_SYNTAX.get(stored)
    if stored_media is not None and kind in (stored_media, "image/*") and ts in (None, "", "*", stored):
        return FrameMedia(stored_media, stored, False)
    return None


def choose_frame_media(ranges: list[MediaRange], stored_ts: str) -> FrameMedia | None:
    """The first acceptable representation, in the client's order of preference.

    Parameters
    ----------
    ranges:
        The parsed ``Accept`` header.
    stored_ts:
        The file's transfer syntax.

    Returns
    -------
    FrameMedia or None
        ``None`` when nothing the client accepts can be produced (406).
    """
    for r in ranges:
        media = _choose_one(r, stored_ts)
        if media is not None:
            return media
    return None


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _native_slice(ds: Dataset, data: bytes, index: int) -> bytes:
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    pixels = rows * cols * samples
    if bits == 1:
        start = index * pixels
        chunk = np.frombuffer(data[start // 8: (start + pixels + 7) // 8 + 1], dtype=np.uint8)
        bitarr = np.unpackbits(chunk, bitorder="little")[start % 8: start % 8 + pixels]
        return np.packbits(bitarr, bitorder="little").tobytes()
    size = pixels * bits // 8
    return bytes(data[index * size: (index + 1) * size])


def _decoded(ds: Dataset, ts: str, index: int) -> bytes:
    arr, _meta = get_decoder(ts).as_array(ds, index=index)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    if bits == 1:
        return np.packbits(arr.astype(np.uint8).ravel() & 1, bitorder="little").tobytes()
    if arr.dtype.kind in "ui" and arr.dtype.itemsize * 8 != bits and bits in (8, 16, 32, 64):
        arr = arr.astype(np.dtype(f"{arr.dtype.kind}{bits // 8}"))
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def read_frames(path: Path, numbers: list[int], media: FrameMedia) -> list[bytes]:
    """The requested frames of a stored file.

    Parameters
    ----------
    path:
        The stored file.
    numbers:
        1-based frame numbers (:func:`parse_frame_list`).
    media:
        From :func:`choose_frame_media`.

    Returns
    -------
    list of bytes
        One entry per number, in order.

    Raises
    ------
    NoPixelDataError
        The file has no pixel data.
    FrameError
        A number exceeds Number of Frames.
    OSError
        The file cannot be read.
    """
    ds = dcmread(path)
    tag = next((t for t in PIXEL_TAGS if t in ds), None)
    if tag is None:
        raise NoPixelDataError("the instance has no pixel data")
    count = _frame_count(ds)
    bad = [n for n in numbers if n > count]
    if bad:
        raise FrameError(f"frame {bad[0]} does not exist: the instance has {count} frame(s)")
    ts = str(ds.file_meta.TransferSyntaxUID)
    data: bytes = ds[tag].value
    out = []
    for n in numbers:
        if ts in _NATIVE_LE:
            out.append(_native_slice(ds, data, n - 1))
        elif media.native:
            out.append(_decoded(ds, ts, n - 1))
        else:
            out.append(get_frame(data, n - 1, number_of_frames=count,
                                 extended_offsets=_extended_offsets(ds)))
    return out


def _extended_offsets(ds: Dataset) -> tuple[bytes, bytes] | None:
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        return bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths)
    return None


def read_pixel_data(path: Path, media: FrameMedia) -> list[bytes]:
    """The whole pixel data, for its BulkDataURI.

    Parameters
    ----------
    path:
        The stored file.
    media:
        From :func:`choose_frame_media`.

    Returns
    -------
    list of bytes
        Native: one item, the uncompressed value (an uncompressed file's
        stored value, bit-packed frames included; a compressed file's frames
        decoded and concatenated). As stored: one item per frame.

    Raises
    ------
    NoPixelDataError
        The file has no pixel data.
    OSError
        The file cannot be read.
    """
    ds = dcmread(path)
    tag = next((t for t in PIXEL_TAGS if t in ds), None)
    if tag is None:
        raise NoPixelDataError("the instance has no pixel data")
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts in _NATIVE_LE:
        return [bytes(ds[tag].value)]
    count = _frame_count(ds)
    if media.native:
        return [b"".join(_decoded(ds, ts, i) for i in range(count))]
    return [get_frame(ds[tag].value, i, number_of_frames=count, extended_offsets=_extended_offsets(ds))
            for i in range(count)]
