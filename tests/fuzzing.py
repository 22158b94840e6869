"""A seeded mutator of DICOM data sets and the campaign that sends them to a
running node (C-STORE, STOW-RS parts, garbage PDUs).

Used by ``tests/test_fuzz_campaign.py`` (in CI) and by
``benchmarks/bench_attacks.py`` (figures for docs/reliability.md): one
implementation, so the figures are those of the test.

Every case is a pure function of ``(seed, index)``: :func:`make_case` builds
it again from those two numbers, so a failure seen in CI is reproduced with
``make_case(seed, index)`` and becomes a named regression test.

The mutations follow the strategies of fuzzers for DICOM parsers (bit flips,
truncation, length and VR corruption, hostile values for numeric strings and
UIDs, broken pixel data and encapsulation, deflate corruption and bombs, deep
sequence nesting, duplicate and out-of-order elements) on a handful of valid
base instances in the transfer syntaxes the node accepts.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import struct
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.uid import generate_uid

from dicom_factory import make_instance

__all__ = [
    "ACCEPTABLE_DIMSE",
    "Case",
    "CampaignReport",
    "STRATEGIES",
    "garbage_pdus",
    "make_case",
    "make_cases",
    "send_dimse",
    "send_garbage_pdus",
    "send_stow",
]

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
SC_MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010


def acceptable_dimse(status: int) -> bool:
    """A specific C-STORE answer: success, warning, or a failure that says why
    (out of resources, SOP class mismatch, cannot understand, UID errors).
    0x0110 "processing failure" is what an unexpected exception gives."""
    return status == 0x0000 or (status & 0xF000) in (0xA000, 0xB000, 0xC000) or status == 0x0122


ACCEPTABLE_DIMSE = acceptable_dimse


# --- encoding helpers -------------------------------------------------------------------------


def raw_element(tag: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    """One explicit-VR little-endian element; ``length`` overrides the length field."""
    g, e = tag >> 16, tag & 0xFFFF
    n = len(value) if length is None else length
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", g, e, vr, 0, n & 0xFFFFFFFF) + value
    return struct.pack("<HH2sH", g, e, vr, n & 0xFFFF) + value


def _item(value: bytes, *, length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    return struct.pack("<HHI", 0xFFFE, 0xE000, n & 0xFFFFFFFF) + value


def encode_elements(ds: Dataset, *, implicit: bool = False) -> list[tuple[int, bytes]]:
    """Each top-level element of ``ds`` encoded on its own, in tag order."""
    correct_ambiguous_vr(ds, True)
    out: list[tuple[int, bytes]] = []
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = implicit
        write_data_element(fp, elem)
        out.append((int(elem.tag), fp.getvalue()))
    return out


def _header_split(raw: bytes, implicit: bool) -> tuple[bytes, bytes, bytes]:
    """(tag+VR, length field, value) of one encoded element."""
    if implicit:
        return raw[:4], raw[4:8], raw[8:]
    vr = raw[4:6]
    if vr in _LONG_VRS:
        return raw[:8], raw[8:12], raw[12:]
    return raw[:6], raw[6:8], raw[8:]


def part10(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, body: bytes) -> bytes:
    """Preamble, a valid File Meta group, then ``body`` as is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1393.1"
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + body


# --- base instances ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    name: str
    sop_class_uid: str
    transfer_syntax_uid: str
    elements: tuple[tuple[int, bytes], ...]
    implicit: bool = False

    def body(self) -> bytes:
        data = b"".join(raw for _, raw in self.elements)
        return _deflate(data) if self.transfer_syntax_uid == DEFLATED else data


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _image(rng: random.Random, modality: str = "MR", rows: int = 16, cols: int = 16) -> Dataset:
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid(), modality=modality,
                       rows=rows, cols=cols, pixel_value=rng.randrange(0, 3000))
    del ds.file_meta
    return ds


def _jpeg_frame(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="JPEG", quality=90)
    return out.getvalue()


def _rle_frame(pixels: np.ndarray) -> bytes:
    """RLE Lossless (PS3.5 Annex G) of 8-bit pixels: one segment, literal runs."""
    data = pixels.astype(np.uint8).tobytes()
    seg = bytearray()
    for i in range(0, len(data), 128):
        chunk = data[i:i + 128]
        seg.append(len(chunk) - 1)
        seg += chunk
    if len(seg) % 2:
        seg.append(0x80)  # no-op run as padding
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return header + bytes(seg)


@functools.lru_cache(maxsize=1)
def bases() -> tuple[Base, ...]:
    """The valid instances the mutations start from (the same for every seed)."""
    rng = random.Random(0)
    out: list[Base] = []
    ct = _image(rng, "CT")
    out.append(Base("ct-explicit", str(ct.SOPClassUID), EXPLICIT, tuple(encode_elements(ct))))
    mr = _image(rng, "MR")
    out.append(Base("mr-implicit", str(mr.SOPClassUID), IMPLICIT, tuple(encode_elements(mr, implicit=True)), True))
    dfl = _image(rng, "CT")
    out.append(Base("ct-deflated", str(dfl.SOPClassUID), DEFLATED, tuple(encode_elements(dfl))))
    seq = _image(rng, "MR")
    ref = Dataset()
    ref.ReferencedSOPClassUID = str(seq.SOPClassUID)
    ref.ReferencedSOPInstanceUID = generate_uid()
    inner = Dataset()
    inner.CodeValue = "T-A0100"
    inner.CodingSchemeDesignator = "SRT"
    inner.CodeMeaning = "Brain"
    ref.PurposeOfReferenceCodeSequence = [inner]
    seq.ReferencedImageSequence = [ref]
    out.append(Base("mr-sequence", str(seq.SOPClassUID), EXPLICIT, tuple(encode_elements(seq))))
    # Multi-frame secondary capture, 3 frames of 16-bit.
    mf = _image(rng, "MR")
    mf.SOPClassUID = SC_MULTIFRAME_WORD
    mf.NumberOfFrames = 3
    mf.PixelData = np.arange(3 * 16 * 16, dtype=np.uint16).tobytes()
    mf.PixelRepresentation = 0
    out.append(Base("sc-multiframe", SC_MULTIFRAME_WORD, EXPLICIT, tuple(encode_elements(mf))))
    # Encapsulated 8-bit: JPEG baseline (Pillow) and RLE, 2 frames each.
    for ts, frame_fn, name in ((JPEG_BASELINE, _jpeg_frame, "sc-jpeg"), (RLE, _rle_frame, "sc-rle")):
        enc = _image(rng, "OT")
        enc.SOPClassUID = SC_IMAGE
        enc.BitsAllocated = enc.BitsStored = 8
        enc.HighBit = 7
        enc.PixelRepresentation = 0
        enc.NumberOfFrames = 2
        frames = [frame_fn(np.full((16, 16), 40 * (k + 1), dtype=np.uint8)) for k in range(2)]
        enc.PixelData = encapsulate(frames)
        enc["PixelData"].VR = "OB"
        enc["PixelData"].is_undefined_length = True
        out.append(Base(name, SC_IMAGE, ts, tuple(encode_elements(enc))))
    return tuple(out)


# --- mutations --------------------------------------------------------------------------------

Elements = list[tuple[int, bytes]]
EVIL_NUMBERS = [b"1e400", b"-1e400", b"nan", b"inf", b"9" * 400, b"1" * 12, b"-", b"\x00\x00", b"1\\\\\\", b"0x10",
                b"1e-400", b"12345678901234567890", b" ", b"+-1"]
EVIL_TEXT = [b"\xff\xfe\xfd", b"\x1b$B\x1b(B", b"\x00" * 8, b"A" * 70000 + b"A", b"../../../etc/passwd",
             b"%s%s%n", b"\\" * 40, b"\xc3\x28"]
EVIL_UIDS = [b"1.2." + b"3" * 70, b"1.2.abc", b"1..2", b"01.2.3", b"", b"../../x", b"1.2.3\x00.4", b"1.2.3.",
             b"2.25." + b"9" * 60, b"." * 10, b"1.2.840.10008.1.2.1" * 4, b"\xff\xfe"]


def _find(elements: Elements, tag: int) -> int | None:
    for i, (t, _) in enumerate(elements):
        if t == tag:
            return i
    return None


def _replace_value(raw: bytes, value: bytes, implicit: bool, *, length: int | None = None) -> bytes:
    head, _, _ = _header_split(raw, implicit)
    n = len(value) if length is None else length
    if implicit or head[4:6] in _LONG_VRS:
        return head + struct.pack("<I", n & 0xFFFFFFFF) + value
    return head + struct.pack("<H", n & 0xFFFF) + value


def _set(elements: Elements, tag: int, value: bytes, implicit: bool, vr: bytes = b"IS") -> None:
    i = _find(elements, tag)
    if i is None:
        raw = (struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value if implicit
               else raw_element(tag, vr, value))
        elements.append((tag, raw))
        elements.sort(key=lambda x: x[0])
    else:
        elements[i] = (tag, _replace_value(elements[i][1], value, implicit))


def _m_flip(rng: random.Random, els: Elements, base: Base) -> bytes:
    body = bytearray(b"".join(r for _, r in els))
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(body))
        body[pos] ^= 1 << rng.randrange(8)
    return bytes(body)


def _m_truncate(rng: random.Random, els: Elements, base: Base) -> bytes:
    body = b"".join(r for _, r in els)
    return body[: rng.randrange(0, len(body))]


def _m_insert(rng: random.Random, els: Elements, base: Base) -> bytes:
    body = b"".join(r for _, r in els)
    pos = rng.randrange(len(body))
    return body[:pos] + rng.randbytes(rng.randint(1, 64)) + body[pos:]


def _m_length(rng: random.Random, els: Elements, base: Base) -> bytes:
    i = rng.randrange(len(els))
    tag, raw = els[i]
    _, _, value = _header_split(raw, base.implicit)
    n = rng.choice([0, 1, len(value) + 1, len(value) + 2, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE,
                    len(value) * 1000 + 2, 3])
    els[i] = (tag, _replace_value(raw, value, base.implicit, length=n))
    return b"".join(r for _, r in els)


def _m_vr(rng: random.Random, els: Elements, base: Base) -> bytes:
    if base.implicit:
        return _m_length(rng, els, base)
    i = rng.randrange(len(els))
    tag, raw = els[i]
    vr = rng.choice([b"ZZ", b"\x00\x00", b"UN", b"SQ", b"OB", b"US", b"FD", b"AT", b"xx"])
    els[i] = (tag, raw[:4] + vr + raw[6:])
    return b"".join(r for _, r in els)


def _m_numeric(rng: random.Random, els: Elements, base: Base) -> bytes:
    tag = rng.choice([0x00200013, 0x00200011, 0x00180050, 0x00280030, 0x00200032, 0x00280008, 0x00281052])
    vr = b"DS" if tag in (0x00180050, 0x00280030, 0x00200032, 0x00281052) else b"IS"
    value = rng.choice(EVIL_NUMBERS)
    if len(value) % 2:
        value += b" "
    _set(els, tag, value, base.implicit, vr)
    return b"".join(r for _, r in els)


def _m_text(rng: random.Random, els: Elements, base: Base) -> bytes:
    tag = rng.choice([0x00100010, 0x00100020, 0x00081030, 0x0008103E, 0x00080005, 0x00080050, 0x00180015])
    value = rng.choice(EVIL_TEXT)
    if len(value) % 2:
        value += b" "
    vr = b"PN" if tag == 0x00100010 else b"CS" if tag in (0x00080005, 0x00180015) else b"LO"
    if tag == 0x00080050:
        vr = b"SH"
    _set(els, tag, value, base.implicit, vr)
    return b"".join(r for _, r in els)


def _m_uid(rng: random.Random, els: Elements, base: Base) -> bytes:
    tag = rng.choice([0x0020000D, 0x0020000E, 0x00080018, 0x00080016, 0x00200052])
    value = rng.choice(EVIL_UIDS)
    if len(value) % 2:
        value += b"\x00"
    _set(els, tag, value, base.implicit, b"UI")
    return b"".join(r for _, r in els)


def _us(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def _m_image(rng: random.Random, els: Elements, base: Base) -> bytes:
    choice = rng.randrange(7)
    if choice == 0:
        _set(els, 0x00280010, _us(rng.choice([0, 1, 65535, 17])), base.implicit, b"US")  # Rows
    elif choice == 1:
        _set(els, 0x00280100, _us(rng.choice([0, 1, 13, 64, 12, 255])), base.implicit, b"US")  # BitsAllocated
    elif choice == 2:
        _set(els, 0x00280002, _us(rng.choice([0, 3, 4, 65535])), base.implicit, b"US")  # SamplesPerPixel
    elif choice == 3:
        _set(els, 0x00280008, rng.choice([b"0 ", b"-1", b"1000000000", b"4 ", b"1e9 "]), base.implicit, b"IS")
    else:
        i = _find(els, _PIXEL_DATA)
        if i is not None:
            tag, raw = els[i]
            _, _, value = _header_split(raw, base.implicit)
            if choice == 4:
                value = value[: max(0, len(value) - rng.choice([1, 2, 100, len(value) // 2]))]
            elif choice == 5:
                value = value + rng.randbytes(rng.choice([2, 64, 512]))
            else:
                value = b""
            if raw[4:6] in _LONG_VRS and raw[8:12] == b"\xff\xff\xff\xff":  # encapsulated: keep it undefined
                els[i] = (tag, raw[:12] + value)
            else:
                els[i] = (tag, _replace_value(raw, value, base.implicit))
    return b"".join(r for _, r in els)


def _m_encaps(rng: random.Random, els: Elements, base: Base) -> bytes:
    i = _find(els, _PIXEL_DATA)
    if i is None or base.transfer_syntax_uid not in (JPEG_BASELINE, RLE):
        return _m_image(rng, els, base)
    tag, raw = els[i]
    head = raw[:12]
    choice = rng.randrange(8)
    frames = [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(0, 4))]
    if choice == 0:  # garbage fragments, empty offset table
        value = _item(b"") + b"".join(_item(f + b"\x00" * (len(f) % 2)) for f in frames)
        value += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    elif choice == 1:  # no sequence delimiter
        value = raw[12:-8]
    elif choice == 2:  # a fragment longer than the data
        value = _item(b"") + _item(b"\xff\xd8\xff", length=0x7FFFFFF0)
    elif choice == 3:  # wrong item tag
        value = b"\x00\x00\x00\x00" + raw[16:]
    elif choice == 4:  # offsets pointing outside
        value = _item(struct.pack("<2I", 0, 0x7FFFFFF0)) + raw[12 + 8:]
    elif choice == 5:  # more frames than NumberOfFrames
        body = raw[12:-8]
        value = body + _item(b"\xff\xd8\xff\xd9") * rng.randint(1, 5) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    elif choice == 6:  # fragments of garbage with plausible markers
        marker = b"\xff\xd8" if base.transfer_syntax_uid == JPEG_BASELINE else struct.pack("<I", 9)
        value = _item(b"") + b"".join(_item(marker + f + b"\x00" * (len(f) % 2)) for f in frames[:2] or [b""])
        value += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    else:  # flip bytes inside the fragments
        data = bytearray(raw[12:])
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        value = bytes(data)
    els[i] = (tag, head + value)
    return b"".join(r for _, r in els)


@functools.lru_cache(maxsize=4)
def deflate_bomb(inflated_mib: int) -> bytes:
    """A deflated explicit-VR data set whose private OB element inflates to
    ``inflated_mib`` MiB of zeros (the issue's 398 KiB -> 400 MiB attack)."""
    base = bases()[2]
    els = list(base.elements)
    n = inflated_mib * 1024 * 1024
    head = b"".join(r for t, r in els if t < 0x00091010)
    tail = b"".join(r for t, r in els if t > 0x00091010)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [c.compress(head + raw_element(0x00090010, b"LO", b"BOMB") +
                      struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, n))]
    zeros = b"\x00" * (1 << 20)
    for _ in range(inflated_mib):
        out.append(c.compress(zeros))
    out.append(c.compress(tail))
    out.append(c.flush())
    return b"".join(out)


def _m_deflate(rng: random.Random, els: Elements, base: Base) -> bytes:
    if base.transfer_syntax_uid != DEFLATED:
        return _m_flip(rng, els, base)
    data = _deflate(b"".join(r for _, r in els))
    choice = rng.randrange(4)
    if choice == 0:
        return data[: rng.randrange(1, len(data))]
    if choice == 1:
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] ^= 0xFF
        return bytes(b)
    if choice == 2:
        return rng.randbytes(rng.randint(1, 2000))
    return deflate_bomb(rng.choice([8, 64]))


def _m_nest(rng: random.Random, els: Elements, base: Base) -> bytes:
    """Deeply nested sequences of undefined length (RecursionError bait)."""
    depth = rng.choice([50, 500, 3000, 20000])
    if base.implicit:
        open_ = struct.pack("<HHI", 0x0008, 0x1140, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    else:
        open_ = raw_element(0x00081140, b"SQ", b"", length=0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    nested = open_ * depth + close * depth
    before = b"".join(r for t, r in els if t < 0x00081140)
    after = b"".join(r for t, r in els if t > 0x00081140)
    return before + nested + after


def _m_dup(rng: random.Random, els: Elements, base: Base) -> bytes:
    i = rng.randrange(len(els))
    if rng.random() < 0.5:
        els.insert(i, els[i])
    else:
        j = rng.randrange(len(els))
        els[i], els[j] = els[j], els[i]
    return b"".join(r for _, r in els)


def _m_private(rng: random.Random, els: Elements, base: Base) -> bytes:
    n = rng.choice([0x7FFFFFFF, 0xFFFFFFF0, 1 << 30, 4096])
    if base.implicit:
        el = struct.pack("<HHI", 0x0009, 0x1010, n) + b"\x00" * 16
    else:
        el = raw_element(0x00091010, rng.choice([b"OB", b"UN", b"UT", b"LO"]), b"\x00" * 16, length=n)
    before = b"".join(r for t, r in els if t < 0x00091010)
    after = b"".join(r for t, r in els if t > 0x00091010)
    return before + el + after


def _m_undefined(rng: random.Random, els: Elements, base: Base) -> bytes:
    candidates = [k for k, (t, _) in enumerate(els) if t not in (_PIXEL_DATA,) and t > 0x00080000]
    i = rng.choice(candidates)
    tag, raw = els[i]
    if base.implicit:
        els[i] = (tag, raw[:4] + b"\xff\xff\xff\xff" + raw[8:])
    else:
        vr = rng.choice([b"UN", b"OB", b"UT"])
        _, _, value = _header_split(raw, False)
        els[i] = (tag, raw[:4] + vr + b"\x00\x00\xff\xff\xff\xff" + value)
    return b"".join(r for _, r in els)


def _m_meta_in_body(rng: random.Random, els: Elements, base: Base) -> bytes:
    junk = raw_element(0x00020010, b"UI", b"1.2.840.10008.1.2.4.50\x00") + raw_element(0x00020000, b"UL", b"\xff" * 4)
    # After the first element: a File Meta element leading the data set
    # would be read as part of the File Meta group by the sender itself.
    return els[0][1] + junk + b"".join(r for _, r in els[1:])


def _m_empty(rng: random.Random, els: Elements, base: Base) -> bytes:
    return rng.choice([b"", b"\x00" * rng.randint(1, 64), els[0][1], rng.randbytes(rng.randint(1, 512))])


Mutator = Callable[[random.Random, Elements, Base], bytes]
STRATEGIES: dict[str, Mutator] = {
    "flip": _m_flip,
    "truncate": _m_truncate,
    "insert": _m_insert,
    "length": _m_length,
    "vr": _m_vr,
    "numeric": _m_numeric,
    "text": _m_text,
    "uid": _m_uid,
    "image": _m_image,
    "encaps": _m_encaps,
    "deflate": _m_deflate,
    "nest": _m_nest,
    "dup": _m_dup,
    "private": _m_private,
    "undefined": _m_undefined,
    "meta-in-body": _m_meta_in_body,
    "empty": _m_empty,
}


@dataclass(frozen=True)
class Case:
    """One mutated data set, as a C-STORE request or a STOW-RS part carries it."""

    seed: int
    index: int
    strategy: str
    base: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    body: bytes

    def part10(self) -> bytes:
        return part10(self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax_uid, self.body)

    @property
    def key(self) -> str:
        return f"seed={self.seed} index={self.index} {self.strategy}/{self.base}"

    def answer_uids(self) -> set[str]:
        """The SOP Instance UIDs a receiver may name this part by: the one the
        case was given (its File Meta) and the data set's own, which a
        mutation may have changed."""
        uids = {self.sop_instance_uid}
        try:
            ds = dcmread(BytesIO(self.part10()), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            value = ds.get("SOPInstanceUID")
        except Exception:  # noqa: BLE001 - an unreadable data set names no other UID
            return uids
        if value:
            uids.add(str(value))
        return uids


def _fresh_uids(els: Elements, implicit: bool, rng: random.Random) -> str:
    """Give the case its own Study/Series/SOP Instance UIDs (cases do not collide)."""
    sop = generate_uid(entropy_srcs=[str(rng.random())])
    for tag, value in ((0x0020000D, generate_uid(entropy_srcs=[str(rng.random())])),
                       (0x0020000E, generate_uid(entropy_srcs=[str(rng.random())])), (0x00080018, sop)):
        raw = value.encode()
        _set(els, tag, raw + b"\x00" * (len(raw) % 2), implicit, b"UI")
    return sop


def make_case(seed: int, index: int) -> Case:
    """The case ``index`` of the campaign ``seed`` (deterministic)."""
    rng = random.Random(f"{seed}:{index}")
    base = rng.choice(bases())
    strategy = rng.choice(sorted(STRATEGIES))
    els = list(base.elements)
    sop = _fresh_uids(els, base.implicit, rng)
    body = STRATEGIES[strategy](rng, els, base)
    if base.transfer_syntax_uid == DEFLATED and strategy != "deflate":
        body = _deflate(body)
    return Case(seed, index, strategy, base.name, base.sop_class_uid, sop, base.transfer_syntax_uid, body)


def make_cases(seed: int, count: int, start: int = 0) -> Iterator[Case]:
    for i in range(start, start + count):
        yield make_case(seed, i)


# --- sending ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    status: int | None  # DIMSE status / STOW FailureReason (0 = stored); None: no answer
    channel: str  # "dimse" | "stow"
    note: str = ""


@dataclass
class CampaignReport:
    outcomes: list[Outcome] = field(default_factory=list)
    pdus: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def counts(self, channel: str) -> Counter[str]:
        return Counter("none" if o.status is None else f"0x{o.status:04X}" for o in self.outcomes
                       if o.channel == channel)

    def violations(self) -> list[str]:
        return [f"{o.channel} {o.case.key}: {'no answer' if o.status is None else hex(o.status)} {o.note}"
                for o in self.outcomes if o.status is None or not acceptable_dimse(o.status)]


def _contexts() -> list[tuple[str, str]]:
    """One presentation context per (SOP class, transfer syntax): an SCP
    accepts one transfer syntax per context."""
    return sorted({(b.sop_class_uid, b.transfer_syntax_uid) for b in bases()})


def send_dimse(cases: Iterable[Case], host: str, port: int, *, called: str = "PACSNODE",
               calling: str = "FUZZER", timeout: float = 30.0) -> list[Outcome]:
    """C-STORE every case as is (pynetdicom sends the data set bytes from a
    file without decoding them: ``STORE_SEND_CHUNKED_DATASET``). A lost
    association is recorded as "no answer" and the next case reconnects."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop, syntax in _contexts():
            ae.add_requested_context(sop, [syntax])
        out: list[Outcome] = []
        assoc = None
        with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
            path = Path(tmp) / "case.dcm"
            for case in cases:
                if assoc is None or not assoc.is_established:
                    assoc = ae.associate(host, port, ae_title=called)
                    if not assoc.is_established:
                        out.append(Outcome(case, None, "dimse", "association not established"))
                        assoc = None
                        continue
                path.write_bytes(case.part10())
                try:
                    rsp = assoc.send_c_store(path)
                except (RuntimeError, ValueError, OSError) as exc:
                    out.append(Outcome(case, None, "dimse", f"not sent: {exc}"))
                    continue
                status = rsp.get("Status") if rsp is not None else None
                note = str(rsp.get("ErrorComment", "")) if rsp is not None else "no response"
                out.append(Outcome(case, None if status is None else int(status), "dimse", note))
            if assoc is not None and assoc.is_established:
                assoc.release()
        return out
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def send_stow(cases: Iterable[Case], url: str, *, token: str = "", per_request: int = 20,
              timeout: float = 60.0) -> list[Outcome]:
    """POST the cases as STOW-RS parts, ``per_request`` per request; each
    part's outcome is read from the response (stored: 0, failed: its
    FailureReason). An HTTP error with no per-part answer is "no answer"."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out: list[Outcome] = []
    batch: list[Case] = []

    def flush() -> None:
        if not batch:
            return
        boundary = os.urandom(12).hex()
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + c.part10() + b"\r\n"
                        for c in batch) + b"--" + boundary.encode() + b"--\r\n"
        ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
        try:
            r = httpx.post(f"{url}/studies", content=body, headers={**headers, "Content-Type": ctype},
                           timeout=timeout)
        except httpx.HTTPError as exc:
            out.extend(Outcome(c, None, "stow", f"request failed: {exc}") for c in batch)
            batch.clear()
            return
        stored, failed = _stow_results(r)
        for c in batch:
            names = c.answer_uids()
            failed_as = [failed[u] for u in names if u in failed]
            if names & stored:
                out.append(Outcome(c, 0, "stow"))
            elif failed_as:
                out.append(Outcome(c, failed_as[0], "stow"))
            elif r.status_code in (200, 202, 409) and failed.get("") is not None:
                out.append(Outcome(c, failed[""], "stow", "failure without a readable UID"))
            else:
                out.append(Outcome(c, None, "stow", f"HTTP {r.status_code}, part not in the response"))
        batch.clear()

    for case in cases:
        batch.append(case)
        if len(batch) >= per_request:
            flush()
    flush()
    return out


def _stow_results(r: object) -> tuple[set[str], dict[str, int]]:
    """SOP Instance UIDs stored, and failed ones with their Failure Reason
    ("" collects failures whose UID could not be read)."""
    import httpx

    assert isinstance(r, httpx.Response)
    stored: set[str] = set()
    failed: dict[str, int] = {}
    try:
        body = r.json()
    except ValueError:
        return stored, failed

    def uid(item: dict[str, object]) -> str:
        el = item.get("00081155", {})
        values = el.get("Value", []) if isinstance(el, dict) else []
        return str(values[0]) if values else ""

    for item in body.get("00081199", {}).get("Value", []) if isinstance(body, dict) else []:
        stored.add(uid(item))
    for item in body.get("00081198", {}).get("Value", []) if isinstance(body, dict) else []:
        reason = item.get("00081197", {}).get("Value", [None])[0]
        failed.setdefault(uid(item), int(reason) if reason is not None else -1)
    return stored, failed


# --- garbage PDUs -----------------------------------------------------------------------------


def garbage_pdus(seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """Byte strings a hostile peer writes right after connecting."""
    rng = random.Random(f"pdu:{seed}")
    kinds = ["random", "huge-rq", "short-rq", "bad-type", "pdata-first", "release-first", "abort", "bad-items",
             "zero-length"]
    for _ in range(count):
        kind = rng.choice(kinds)
        if kind == "random":
            data = rng.randbytes(rng.randint(1, 4096))
        elif kind == "huge-rq":
            data = struct.pack(">BBI", 0x01, 0, rng.choice([0xFFFFFFFF, 1 << 30, 1 << 26])) + rng.randbytes(1024)
        elif kind == "short-rq":
            data = struct.pack(">BBI", 0x01, 0, 68) + rng.randbytes(rng.randint(0, 68))
        elif kind == "bad-type":
            data = struct.pack(">BBI", rng.choice([0, 8, 9, 0x7F, 0xFF]), 0, 16) + rng.randbytes(16)
        elif kind == "pdata-first":
            data = struct.pack(">BBI", 0x04, 0, 12) + struct.pack(">IBB", 6, 1, 0x03) + rng.randbytes(6)
        elif kind == "release-first":
            data = struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4
        elif kind == "abort":
            data = struct.pack(">BBI", 0x07, 0, 4) + b"\x00\x00" + bytes([rng.randrange(3), rng.randrange(7)])
        elif kind == "zero-length":
            data = struct.pack(">BBI", 0x01, 0, 0)
        else:  # A-ASSOCIATE-RQ header with garbage variable items
            fixed = struct.pack(">HH", 1, 0) + b"PACSNODE".ljust(16) + b"FUZZER".ljust(16) + b"\x00" * 32
            items = b"".join(struct.pack(">BBH", rng.choice([0x10, 0x20, 0x50, 0x51, 0x52, 0x99]), 0, n) +
                             rng.randbytes(min(n, 64)) for n in (rng.randint(0, 300) for _ in range(rng.randint(1, 6))))
            data = struct.pack(">BBI", 0x01, 0, len(fixed) + len(items)) + fixed + items
        yield kind, data


def send_garbage_pdus(seed: int, count: int, host: str, port: int, *, read_timeout: float = 0.2) -> Counter[str]:
    """Connect, write one garbage PDU, read what comes back (briefly), close.
    Counts what the node did: "rejected"/"aborted" (it answered with an
    A-ASSOCIATE-RJ / A-ABORT PDU), "closed" (it closed the connection),
    "silent" (nothing within ``read_timeout``; the pre-association timeout
    closes it later) and "refused" (could not connect)."""
    outcomes: Counter[str] = Counter()
    for kind, data in garbage_pdus(seed, count):
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                try:
                    s.sendall(data)
                except OSError:
                    outcomes["closed"] += 1
                    continue
                s.settimeout(read_timeout)
                try:
                    reply = s.recv(16)
                except TimeoutError:
                    outcomes["silent"] += 1
                    continue
                except OSError:
                    outcomes["closed"] += 1
                    continue
                if not reply:
                    outcomes["closed"] += 1
                elif reply[0] == 0x03:
                    outcomes["rejected"] += 1
                elif reply[0] == 0x07:
                    outcomes["aborted"] += 1
                else:
                    outcomes[f"pdu-0x{reply[0]:02x}"] += 1
        except OSError:
            outcomes["refused"] += 1
    return outcomes


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
