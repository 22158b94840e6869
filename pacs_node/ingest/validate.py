"""Decode check at receive: is the pixel data of an instance usable?

Run on every instance before anything is written (DIMSE C-STORE, STOW-RS
parts, pulls), after :mod:`pacs_node.ingest.header` has read the header. An
instance that fails is refused with 0xC210 (Cannot Understand) and an Error
Comment that says what is wrong; it is never acknowledged, so the sender
keeps its copy.

``[ingest] decode_check``:

``"structure"`` (default)
    Native pixel data: its length against Rows x Columns x Samples per Pixel
    x Number of Frames x Bits Allocated (pydicom's
    :func:`~pydicom.pixels.utils.get_expected_length`, which knows 1-bit and
    YBR 4:2:2 data). Encapsulated pixel data: the items parse and stay inside
    the data set, a Basic Offset Table agrees with the frame count, there are
    at least as many fragments as frames, and every frame starts with the
    codestream marker of its transfer syntax (JPEG SOI, JPEG 2000 SOC or a
    JP2 signature box, an RLE header whose segment offsets lie in the frame).
    Costs a few microseconds per fragment; nothing is decoded.
``"full"``
    Also decodes every frame with pydicom's decoders (native data, and
    pylibjpeg, openjpeg, RLE for encapsulated data); a transfer syntax no
    installed decoder handles is checked for structure only. Costs a full
    decode per instance.
``"off"``
    The header is still read and checked; pixel data is not.
"""

from __future__ import annotations

import logging
import struct
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.pixels.common import PhotometricInterpretation
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from pacs_node.ingest.errors import IngestError, Status

__all__ = ["PIXEL_TAGS", "check_pixel_data"]

logger = logging.getLogger(__name__)

#: Pixel Data, Float Pixel Data, Double Float Pixel Data.
_PIXEL_ELEMENTS = {0x7FE00010: "Pixel Data", 0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data"}
#: The attributes the check needs from the header.
PIXEL_TAGS = [
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
]
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_JPEG_FAMILY = {str(u) for u in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes)}
_J2K_FAMILY = {str(u) for u in JPEG2000TransferSyntaxes} | {
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
}
#: PS3.3 C.7.6.3.1.2 (pydicom's PhotometricInterpretation, plus the
#: retired ones archives still hold).
_PHOTOMETRIC = {p.value for p in PhotometricInterpretation} | {"XYB", "YBR_PARTIAL_420", "RGBA", "CMYK"}
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _refuse(comment: str) -> IngestError:
    # DIMSE carries the first 64 characters (Error Comment is LO): the
    # reason comes first, the numbers after it.
    return IngestError(Status.CANNOT_UNDERSTAND, f"undecodable pixel data: {comment}"[:200])


def _number(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, default)  # pydicom converts IS / US on access
        if value is None or value == "":
            return default
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _refuse(f"{keyword} is not a number") from None


def check_pixel_data(
    ds: Dataset,
    body: bytes | bytearray | memoryview,
    offset: int,
    *,
    transfer_syntax_uid: str,
    mode: Literal["structure", "full", "off"],
) -> None:
    """Check the pixel data element that starts at ``body[offset:]``.

    Parameters
    ----------
    ds:
        The header read up to the pixel data element (with :data:`PIXEL_TAGS`).
    body:
        The encoded data set (inflated, for a deflated transfer syntax).
    offset:
        Where the pixel data element's tag starts in ``body``; ``len(body)``
        when there is none.
    transfer_syntax_uid:
        The data set's transfer syntax.
    mode:
        ``[ingest] decode_check``.

    Raises
    ------
    IngestError
        ``CANNOT_UNDERSTAND`` naming what is wrong.
    """
    if mode == "off":
        return
    view = memoryview(body)
    if offset >= len(view):
        return  # no pixel data (SR, presentation state, ...): nothing to check
    ts = UID(transfer_syntax_uid)
    little = ts.is_little_endian
    end = "<" if little else ">"
    if len(view) - offset < 8:
        raise _refuse("the pixel data element is truncated")
    group, element = struct.unpack_from(end + "HH", view, offset)
    tag = (group << 16) | element
    name = _PIXEL_ELEMENTS.get(tag)
    if name is None:
        return  # an element after the pixel data range; nothing to check
    pos = offset + 4
    vr = bytes(view[pos : pos + 2])
    if ts.is_implicit_VR or not (vr.isalpha() and vr.isupper()):
        # Implicit VR, or (as pydicom also accepts) a data set encoded
        # implicitly under an explicit transfer syntax.
        (length,) = struct.unpack_from(end + "L", view, pos)
        pos += 4
    else:
        if vr in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OL", b"OV"):
            if len(view) - pos < 8:
                raise _refuse("the pixel data element is truncated")
            (length,) = struct.unpack_from(end + "L", view, pos + 4)
            pos += 8
        else:
            raise _refuse(f"{name} has VR {vr.decode('latin-1')!r}")
    rows, columns = _number(ds, "Rows"), _number(ds, "Columns")
    if not rows or not columns or rows < 0 or columns < 0:
        raise _refuse(f"{name} without valid Rows and Columns")
    bits = _number(ds, "BitsAllocated")
    if bits not in (1, 8, 16, 32, 64):
        raise _refuse(f"Bits Allocated {bits} is not 1, 8, 16, 32 or 64")
    samples = _number(ds, "SamplesPerPixel")
    if samples not in (1, 3, 4):
        raise _refuse(f"Samples per Pixel {samples} is not 1, 3 or 4")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if photometric not in _PHOTOMETRIC:
        raise _refuse("Photometric Interpretation is missing or unknown")
    if tag == 0x7FE00010:
        # Type 1 in the Image Pixel module (PS3.3 C.7.6.3); the worker's
        # decoder needs every one of them.
        stored = _number(ds, "BitsStored")
        if stored is None or not 1 <= stored <= bits:
            raise _refuse(f"Bits Stored {stored} is not between 1 and Bits Allocated {bits}")
        if _number(ds, "PixelRepresentation") not in (0, 1):
            raise _refuse("Pixel Representation is missing or not 0 or 1")
    frames = _number(ds, "NumberOfFrames", 1)
    if frames is None or frames < 1:
        raise _refuse(f"Number of Frames {frames} is not a positive number")
    if length == _UNDEFINED:
        if tag != 0x7FE00010 or not ts.is_encapsulated:
            raise _refuse(f"{name} has undefined length in a native transfer syntax")
        fragments = _encapsulated_frames(view, pos, frames, end)
        _check_codestreams(fragments, frames, str(ts))
        if mode == "full":
            _decode(ds, view, offset, str(ts), frames)
        return
    if ts.is_encapsulated and tag == 0x7FE00010:
        raise _refuse("encapsulated transfer syntax but Pixel Data is not encapsulated")
    available = len(view) - pos
    if length > available:
        raise _refuse(f"{name} declares {length} bytes, {available} were received")
    expected = _expected_native_length(ds, rows, columns, samples, bits, frames)
    # Pixel data is padded to an even length (PS3.5 §8.1.1); some scanners
    # pad further, which pydicom reads (it drops the excess). A whole frame
    # or more in excess means the header's geometry is wrong.
    if length < expected or length - expected >= max(expected // frames, 2):
        raise _refuse(
            f"{name} holds {length} bytes; {rows} rows x {columns} columns x {samples} samples x "
            f"{frames} frames x {bits} bits need {expected}"
        )
    if mode == "full":
        _decode(ds, view, offset, str(ts), frames)


def _expected_native_length(ds: Dataset, rows: int, columns: int, samples: int, bits: int, frames: int) -> int:
    pixels = rows * columns * frames
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if bits == 1:
        total_bits = pixels * samples
        return (total_bits + 7) // 8
    if photometric == "YBR_FULL_422" and samples == 3:
        # Two luminance values share one chroma pair (PS3.3 C.7.6.3.1.2).
        return pixels * 2 * (bits // 8)
    return pixels * samples * (bits // 8)


def _encapsulated_frames(view: memoryview, pos: int, frames: int, end: str) -> list[list[memoryview]]:
    """Parse Basic Offset Table and fragments; return the fragments of each frame."""
    items: list[memoryview] = []
    offsets: list[int] = []
    first = True
    while True:
        if len(view) - pos < 8:
            raise _refuse("encapsulated pixel data ends without a sequence delimiter")
        group, element, length = struct.unpack_from(end + "HHL", view, pos)
        tag = (group << 16) | element
        pos += 8
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM:
            raise _refuse(f"encapsulated pixel data holds tag ({group:04X},{element:04X}) instead of an item")
        if length == _UNDEFINED or length > len(view) - pos:
            raise _refuse(f"a pixel data item declares {length} bytes, {len(view) - pos} remain")
        value = view[pos : pos + length]
        pos += length
        if first:
            first = False
            if length % 4:
                raise _refuse("the Basic Offset Table length is not a multiple of 4")
            offsets = list(struct.unpack(f"{end}{length // 4}L", value))
            continue
        items.append(value)
    if not items:
        raise _refuse("encapsulated pixel data has no fragments")
    if offsets:
        if len(offsets) != frames:
            raise _refuse(f"the Basic Offset Table lists {len(offsets)} frames, Number of Frames is {frames}")
        if offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise _refuse("the Basic Offset Table is not increasing from 0")
        # Map fragment byte positions (item headers included) to frames.
        starts, at = [], 0
        for item in items:
            starts.append(at)
            at += 8 + len(item)
        per_frame: list[list[memoryview]] = []
        for i, start in enumerate(offsets):
            stop = offsets[i + 1] if i + 1 < len(offsets) else at
            group_items = [it for s, it in zip(starts, items) if start <= s < stop]
            if not group_items or starts.count(start) == 0:
                raise _refuse(f"Basic Offset Table entry {i} does not point at a fragment")
            per_frame.append(group_items)
        return per_frame
    if frames == 1:
        return [items]
    if len(items) < frames:
        raise _refuse(f"{len(items)} fragments cannot hold {frames} frames")
    if len(items) == frames:
        return [[it] for it in items]
    # More fragments than frames and no offset table: frames are found by
    # their start markers in _check_codestreams; group loosely here.
    return [items]


def _check_codestreams(per_frame: list[list[memoryview]], frames: int, ts: str) -> None:
    for index, fragments in enumerate(per_frame):
        head = bytes(fragments[0][:12])
        if ts in _JPEG_FAMILY:
            if head[:2] != b"\xff\xd8":
                raise _refuse(f"no JPEG SOI marker at frame {index + 1}")
            if len(per_frame) == 1 and frames > 1:
                starts = sum(1 for f in fragments if bytes(f[:2]) == b"\xff\xd8")
                if starts < frames:
                    raise _refuse(f"{starts} JPEG codestreams found for {frames} frames")
        elif ts in _J2K_FAMILY:
            if head[:2] != b"\xff\x4f" and head != _JP2_SIGNATURE:
                raise _refuse(f"no JPEG 2000 codestream at frame {index + 1}")
            if len(per_frame) == 1 and frames > 1:
                starts = sum(1 for f in fragments if bytes(f[:2]) == b"\xff\x4f" or bytes(f[:12]) == _JP2_SIGNATURE)
                if starts < frames:
                    raise _refuse(f"{starts} JPEG 2000 codestreams found for {frames} frames")
        elif ts == RLELossless:
            if len(per_frame) == 1 and frames > 1:
                raise _refuse("RLE Lossless needs one fragment per frame")
            frame = fragments[0] if len(fragments) == 1 else memoryview(b"".join(bytes(f) for f in fragments))
            if len(frame) < 64:
                raise _refuse(f"frame {index + 1}: the RLE header is truncated")
            header = struct.unpack_from("<16L", frame, 0)
            count = header[0]
            if not 1 <= count <= 15:
                raise _refuse(f"frame {index + 1}: the RLE header lists {count} segments")
            seg = header[1 : 1 + count]
            if seg[0] != 64 or any(b <= a for a, b in zip(seg, seg[1:])) or seg[-1] >= len(frame):
                raise _refuse(f"frame {index + 1}: RLE segment offsets lie outside the frame")


def _decode(ds: Dataset, view: memoryview, offset: int, ts: str, frames: int) -> None:
    """Decode every frame with pydicom's decoders (``decode_check = "full"``)."""
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset
    from pydicom.pixels import get_decoder

    decoder = get_decoder(UID(ts))
    if not decoder.is_available:
        logger.debug("no installed decoder for %s; structure checked only", ts)
        return
    uid = UID(ts)
    pixel = read_dataset(
        BytesIO(bytes(view[offset:])),
        is_implicit_VR=uid.is_implicit_VR,
        is_little_endian=uid.is_little_endian,
        stop_when=lambda tag, vr, length: tag > 0x7FE00010,
    )
    full = Dataset()
    full.update(ds)
    full.update(pixel)
    full.file_meta = FileMetaDataset()
    full.file_meta.TransferSyntaxUID = uid
    try:
        for index, _ in enumerate(decoder.iter_array(full)):
            if index >= frames:
                break
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "cannot decode"
        raise _refuse(f"{exc.__class__.__name__}: {exc}") from None
