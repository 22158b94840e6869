"""DICOM JSON (PS3.18 Annex F) of stored headers, with BulkDataURI for pixel
data and large binary values, and the bulk data those URIs name.

A header is read with ``stop_before_pixels``; where the reading stopped tells
whether the file has pixel data (Pixel Data, Float or Double Float Pixel
Data) without reading it. Its BulkDataURI is
``{instance URL}/bulk/7FE00010``, that of a binary value over
:data:`BULK_THRESHOLD` bytes ``{instance URL}/bulk/{tag}[/{item}/{tag}...]``
(the path through sequences, items numbered from 0).
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

__all__ = [
    "BULK_THRESHOLD",
    "BulkPathError",
    "Header",
    "PIXEL_TAGS",
    "bulk_value",
    "dataset_json",
    "parse_bulk_path",
    "read_header",
]

logger = logging.getLogger(__name__)

#: Binary values longer than this many bytes become a BulkDataURI.
BULK_THRESHOLD = 1024
#: Pixel data elements and their VR when the file does not say (implicit VR).
PIXEL_TAGS: dict[int, str] = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OW"}
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_UTF8 = "ISO_IR 192"


class BulkPathError(ValueError):
    """A bulk data path is malformed."""


@dataclass
class Header:
    """A stored file's header (everything before the pixel data)."""

    dataset: Dataset
    #: Tag and VR of the pixel data element, ``None`` when the file has none.
    pixel: tuple[int, str] | None
    transfer_syntax_uid: str


def read_header(path: Path) -> Header:
    """Read a file's header and find out whether pixel data follows.

    Parameters
    ----------
    path:
        A stored DICOM file.

    Returns
    -------
    Header
        The dataset without pixel data, the pixel element's tag and VR, and
        the transfer syntax.

    Raises
    ------
    OSError
        The file cannot be read.
    pydicom.errors.InvalidDicomError
        It is not a DICOM file.
    """
    with path.open("rb") as fh:
        ds = dcmread(fh, stop_before_pixels=True)
        head = fh.read(8)
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    if ts == DeflatedExplicitVRLittleEndian:  # the position is that of the inflated stream
        full = dcmread(path)
        pixel = next(((t, full[t].VR) for t in PIXEL_TAGS if t in full), None)
        return Header(ds, pixel, ts)
    implicit, little = ds.original_encoding
    pixel = None
    if len(head) >= 8:
        group, elem = struct.unpack("<HH" if little is not False else ">HH", head[:4])
        tag = (group << 16) | elem
        if tag in PIXEL_TAGS:
            vr = head[4:6].decode("ascii", "replace")
            if implicit or vr not in _BINARY_VRS:
                vr = PIXEL_TAGS[tag] if tag != 0x7FE00010 or int(ds.get("BitsAllocated", 16) or 16) > 8 else "OB"
            pixel = (tag, vr)
    return Header(ds, pixel, ts)


def _element_json(elem: DataElement, bulk: str | None, path: tuple[str, ...]) -> dict[str, Any] | None:
    key = f"{elem.tag:08X}"
    if elem.VR == "SQ":
        items = [dataset_json(item, bulk_url=bulk, _path=(*path, key, str(i))) for i, item in enumerate(elem.value)]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD:
        if bulk is None:
            return None
        return {"vr": elem.VR, "BulkDataURI": f"{bulk}/bulk/{'/'.join((*path, key))}"}
    return elem.to_json_dict(None, BULK_THRESHOLD)


def dataset_json(ds: Dataset, *, bulk_url: str | None, pixel: tuple[int, str] | None = None,
                 transfer_syntax_uid: str | None = None, _path: tuple[str, ...] = ()) -> dict[str, Any]:
    """The DICOM JSON object of a dataset.

    Parameters
    ----------
    ds:
        The dataset (no file meta; group lengths are left out).
    bulk_url:
        The instance's URL: large binary values become
        ``{bulk_url}/bulk/...`` BulkDataURIs; ``None`` leaves them out (QIDO-RS).
    pixel:
        Tag and VR of the file's pixel data (:attr:`Header.pixel`).
    transfer_syntax_uid:
        Given as Available Transfer Syntax UID (0008,3002).

    Returns
    -------
    dict
        Keys are 8 upper-case hex digits, in tag order. Specific Character Set
        is ``ISO_IR 192``: the JSON text is UTF-8 whatever the file used.
    """
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.element == 0:
            continue
        try:
            value = _element_json(elem, bulk_url, _path)
        except Exception as exc:  # noqa: BLE001 - one malformed value must not hide the rest
            logger.warning("element %s left out of DICOM JSON: %s", elem.tag, exc.__class__.__name__)
            continue
        if value is not None:
            out[f"{elem.tag:08X}"] = value
    if not _path:
        if "00080005" in out:
            out["00080005"] = {"vr": "CS", "Value": [_UTF8]}
        if transfer_syntax_uid:
            out["00083002"] = {"vr": "UI", "Value": [transfer_syntax_uid]}
        if pixel is not None and bulk_url is not None:
            out[f"{pixel[0]:08X}"] = {"vr": pixel[1], "BulkDataURI": f"{bulk_url}/bulk/{pixel[0]:08X}"}
    return dict(sorted(out.items()))


_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


def parse_bulk_path(text: str) -> list[int]:
    """Parse ``tag[/item/tag...]``.

    Parameters
    ----------
    text:
        The path after ``/bulk/``, e.g. ``7FE00010`` or ``00880200/0/7FE00010``.

    Returns
    -------
    list of int
        Tags at even positions, item indexes at odd positions.

    Raises
    ------
    BulkPathError
        Not an odd number of segments, a segment that is not a tag (8 hex
        digits) or an item index.
    """
    segments = text.strip("/").split("/")
    if len(segments) % 2 == 0 or len(segments) > 15:
        raise BulkPathError("a bulk data path is tag[/item/tag...]")
    out = []
    for i, seg in enumerate(segments):
        if i % 2 == 0:
            if not _TAG.match(seg):
                raise BulkPathError("a bulk data path names tags as 8 hex digits")
            out.append(int(seg, 16))
        else:
            if not seg.isdigit() or len(seg) > 6:
                raise BulkPathError("a bulk data path numbers sequence items from 0")
            out.append(int(seg))
    return out


def _walk(ds: Dataset, path: Iterable[int]) -> DataElement | None:
    steps = list(path)
    node: Dataset = ds
    for i in range(0, len(steps) - 1, 2):
        tag, index = steps[i], steps[i + 1]
        if tag not in node or node[tag].VR != "SQ" or index >= len(node[tag].value):
            return None
        node = node[tag].value[index]
    tag = steps[-1]
    return node[tag] if tag in node else None


def bulk_value(path: Path, steps: list[int]) -> tuple[str, bytes] | None:
    """The value of a binary element (not pixel data) as little-endian bytes.

    Parameters
    ----------
    path:
        The stored file.
    steps:
        From :func:`parse_bulk_path`.

    Returns
    -------
    tuple of (str, bytes) or None
        The VR and the value; ``None`` when there is no such binary element.

    Raises
    ------
    OSError
        The file cannot be read.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    elem = _walk(ds, steps)
    if elem is None or elem.VR not in _BINARY_VRS or elem.value is None:
        return None
    data = bytes(elem.value)
    _, little = ds.original_encoding
    size = _WORD.get(elem.VR, 1)
    if little is False and size > 1 and len(data) % size == 0:
        data = np.frombuffer(data, dtype=f">u{size}").astype(f"<u{size}").tobytes()
    return elem.VR, data
