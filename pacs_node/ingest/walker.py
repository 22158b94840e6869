"""One bounded pass over an encoded data set, as received.

:func:`walk` reads every element header of a data set (and of every
sequence item inside it) without converting values: it checks that each
length fits in what is left, that sequences and items close, that no VR is
unknown and that nesting stays under :data:`MAX_DEPTH`. It keeps only the
values of the top-level elements it is asked for (the indexed attributes and
the Image Pixel module), the position of the pixel data element and, through
a :class:`FragmentSink`, the layout of encapsulated pixel data.

Why not :func:`pydicom.dcmread`: pydicom inflates a deflated data set whole
in memory (``zlib.decompress``: a 400 KiB body becomes 400 MiB), parses
undefined-length sequences by recursion (RecursionError on deep nesting),
reads large values it is not asked for, and tolerates lengths that run past
the end. Here a deflated stream is inflated in bounded steps
(:class:`Inflater`) and refused past a maximum, values that are not kept are
skipped (a seek, or inflated and dropped), and nesting is counted. The
values kept are pydicom :class:`~pydicom.dataelem.RawDataElement` objects,
converted by pydicom as usual when read.

Errors are :class:`Malformed` (the bytes do not decode: 0xC210) and
:class:`InflateLimit` (0xA700); the caller maps them to statuses.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import lru_cache
from io import BufferedIOBase, RawIOBase
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

__all__ = [
    "MAX_DEPTH",
    "MAX_FRAGMENTS",
    "MAX_KEPT_VALUE",
    "PIXEL_TAGS",
    "FragmentSink",
    "InflateLimit",
    "Inflater",
    "Malformed",
    "PixelElement",
    "Reader",
    "Source",
    "Walk",
    "open_source",
    "walk",
]

logger = logging.getLogger(__name__)

#: What a data set can be handed over as: its bytes, a path, or a binary file.
Source = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO

#: Deepest sequence nesting accepted. SR content trees and RT structure sets
#: nest a few tens of levels at most; pydicom reads this depth without
#: approaching Python's recursion limit.
MAX_DEPTH = 64
#: Most fragments in one encapsulated Pixel Data element.
MAX_FRAGMENTS = 1_000_000
#: Longest value kept for an element asked for (they are short strings and
#: numbers; the Extended Offset Table, 8 bytes a frame, is the exception).
MAX_KEPT_VALUE = 64 * 1024
#: Longest Extended Offset Table (Lengths) kept: 8 bytes per frame.
MAX_OFFSET_TABLE = 64 * 1024 * 1024
#: Float Pixel Data, Double Float Pixel Data, Pixel Data.
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Extended Offset Table, Extended Offset Table Lengths.
OFFSET_TABLE_TAGS = frozenset({0x7FE00001, 0x7FE00002})

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_VRS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_LONG_VRS = frozenset("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_CHUNK = 64 * 1024
_INFLATE_STEP = 1024 * 1024


class Malformed(Exception):
    """The bytes are not a well-formed data set; the message says where (tags
    and lengths only, never values)."""


class InflateLimit(Exception):
    """A deflated data set inflates beyond the allowed size."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the deflated data set inflates to more than {limit} bytes")
        self.limit = limit


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class Reader(Protocol):
    """What :func:`walk` reads from: forward reads, skips and the position."""

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end)."""

    def skip(self, n: int) -> int:
        """Skip up to ``n`` bytes; returns how many were skipped."""

    def tell(self) -> int:
        """Position from the start of the stream."""

    def remaining(self) -> int | None:
        """Bytes left, or None when unknown (an inflating stream)."""


class _BufferReader:
    """Reads a bytes-like object in place (values are copied only when kept)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._mv = memoryview(data).cast("B")
        self._pos = 0
        self._size = len(self._mv)

    def read(self, n: int) -> bytes:
        start = self._pos
        self._pos = min(self._size, start + n)
        return bytes(self._mv[start : self._pos])

    def skip(self, n: int) -> int:
        start = self._pos
        self._pos = min(self._size, start + n)
        return self._pos - start

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int) -> None:
        self._pos = max(0, min(self._size, pos))

    def remaining(self) -> int | None:
        return self._size - self._pos

    def view(self, start: int, end: int) -> memoryview:
        """The bytes ``[start, end)`` without copying them."""
        return self._mv[start:end]


class _FileReader:
    """Reads a seekable binary file (values that are not kept are seeked over)."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self._start = fp.tell()
        fp.seek(0, os.SEEK_END)
        self._size = fp.tell() - self._start
        fp.seek(self._start)
        self._pos = 0

    def read(self, n: int) -> bytes:
        n = max(0, min(n, self._size - self._pos))
        data = self._fp.read(n)
        self._pos += len(data)
        return data

    def skip(self, n: int) -> int:
        n = max(0, min(n, self._size - self._pos))
        self._pos += n
        self._fp.seek(self._start + self._pos)
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int) -> None:
        self._pos = max(0, min(self._size, pos))
        self._fp.seek(self._start + self._pos)

    def remaining(self) -> int | None:
        return self._size - self._pos

    def view(self, start: int, end: int) -> bytes:
        """The bytes ``[start, end)`` (read from the file)."""
        here = self._pos
        self.seek(start)
        data = self.read(end - start)
        self.seek(here)
        return data


class Inflater:
    """A raw deflate stream (PS3.5 §A.5, RFC 1951), inflated in bounded steps.

    At most :data:`_INFLATE_STEP` bytes of output are produced per
    ``decompress`` call (``max_length``) and only what the walk is reading is
    kept, so memory stays small whatever the stream inflates to; past
    ``limit`` inflated bytes :class:`InflateLimit` is raised before the next
    step is produced.

    Parameters
    ----------
    compressed:
        Where the compressed bytes are read from (from its current position).
    limit:
        Most bytes the stream may inflate to.

    Raises
    ------
    Malformed
        From the read methods, for a corrupt or truncated stream.
    InflateLimit
        From the read methods, past ``limit``.
    """

    def __init__(self, compressed: Reader, limit: int) -> None:
        self._src = compressed
        self._limit = limit
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._tail = b""  # compressed input not consumed yet
        self._buf = bytearray()
        self._off = 0  # read position in _buf
        self._pos = 0  # stream position of _buf[_off]
        self.total = 0  # bytes inflated so far
        self._eof = False

    def _more(self) -> bool:
        """Inflate one more step into the buffer; False at the end of the stream."""
        while not self._eof:
            data = self._tail or self._src.read(_CHUNK)
            if not data:
                raise Malformed("deflate stream truncated")
            room = self._limit - self.total + 1
            try:
                out = self._z.decompress(data, min(_INFLATE_STEP, room))
            except zlib.error:
                raise Malformed("deflate stream corrupt (zlib error)") from None
            self._tail = self._z.unconsumed_tail
            self._eof = self._z.eof
            self.total += len(out)
            if self.total > self._limit:
                raise InflateLimit(self._limit)
            if out:
                if self._off > _INFLATE_STEP:
                    del self._buf[: self._off]
                    self._off = 0
                self._buf += out
                return True
        return False

    def read(self, n: int) -> bytes:
        while len(self._buf) - self._off < n and self._more():
            pass
        data = bytes(self._buf[self._off : self._off + n])
        self._off += len(data)
        self._pos += len(data)
        return data

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            avail = len(self._buf) - self._off
            if avail == 0:
                if not self._more():
                    break
                continue
            step = min(avail, n - done)
            self._off += step
            self._pos += step
            done += step
        if self._off == len(self._buf):
            self._buf.clear()
            self._off = 0
        return done

    def tell(self) -> int:
        return self._pos

    def remaining(self) -> int | None:
        return None


@dataclass
class PixelElement:
    """Where the top-level pixel data element is."""

    tag: int
    vr: str | None
    #: Value length; None for undefined length (encapsulated).
    length: int | None
    #: Stream position of the value (for encapsulated data: of the Basic
    #: Offset Table item), and just past it (the sequence delimiter included).
    offset: int
    end: int = 0


class FragmentSink(Protocol):
    """Receives the layout of encapsulated pixel data while it is walked."""

    def offsets(self, basic: bytes) -> None:
        """The Basic Offset Table's value (maybe empty), in stream byte order."""

    def fragment(self, position: int, length: int, head: bytes, tail: bytes) -> None:
        """One fragment: its item's position from the first fragment item, its
        length, its first (up to 64) and last (up to 10) bytes."""


@dataclass
class Walk:
    """What one pass found."""

    #: Top-level elements asked for, by tag.
    elements: dict[BaseTag, RawDataElement] = field(default_factory=dict)
    pixel: PixelElement | None = None
    #: Number of fragments of encapsulated pixel data.
    fragments: int = 0
    #: Bytes of the data set (inflated bytes for a deflated one).
    size: int = 0


@lru_cache(maxsize=4096)
def _implicit_vr(tag: int) -> str:
    group, elem = tag >> 16, tag & 0xFFFF
    if elem == 0:
        return "UL"  # group length
    if group & 1:
        return "LO" if 0x0010 <= elem <= 0x00FF else "UN"  # private creator / private
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return "OW" if vr == "OB or OW" else vr.split(" ")[0]


class _Walker:
    def __init__(self, r: Reader, *, implicit: bool, little: bool, keep: Collection[int],
                 sink: FragmentSink | None) -> None:
        self.r = r
        self.implicit = implicit
        self.little = little
        self.e = "<" if little else ">"
        self.keep = keep
        self.sink = sink
        self.out = Walk()
        self._seen: set[int] = set()
        self._hh = struct.Struct(self.e + "HH").unpack
        self._l = struct.Struct(self.e + "L").unpack
        self._h = struct.Struct(self.e + "H").unpack

    def need(self, n: int, what: str) -> bytes:
        data = self.r.read(n)
        if len(data) < n:
            raise Malformed(f"truncated {what}")
        return data

    def skip(self, n: int, tag: int) -> None:
        left = self.r.remaining()
        if left is not None and n > left:
            raise Malformed(f"{_tag(tag)} length {n} past the end")
        if self.r.skip(n) < n:
            raise Malformed(f"{_tag(tag)} length {n} past the end")

    def fits(self, n: int, what: str) -> None:
        left = self.r.remaining()
        if left is not None and n > left:
            raise Malformed(f"{what} length {n} past the end")

    # -- data sets ---------------------------------------------------------

    def dataset(self, end: int | None, depth: int, delimited: bool) -> None:
        """Walk elements up to ``end`` (defined-length item), an item
        delimiter (``delimited``), or the end of the stream (top level)."""
        top = depth == 0
        while True:
            if end is not None:
                pos = self.r.tell()
                if pos == end:
                    return
                if pos > end:
                    raise Malformed("element overruns its item")
            head = self.r.read(8)
            if len(head) < 8:
                if top and not head.strip(b"\x00"):
                    return  # end of the data set (pydicom also ignores < 8 zero bytes)
                raise Malformed("truncated element header" if top or head else
                                "item without delimiter")
            group, elem = self._hh(head[:4])
            tag = group << 16 | elem
            if group == 0xFFFE:
                if tag == _ITEM_END and delimited:
                    return
                raise Malformed(f"unexpected delimiter {_tag(tag)}")
            vr, length = self.element_header(head, tag)
            self.element(tag, vr, length, depth)

    def element_header(self, head: bytes, tag: int) -> tuple[str, int]:
        if not self.implicit:
            raw_vr = head[4:6]
            if 0x41 <= raw_vr[0] <= 0x5A and 0x41 <= raw_vr[1] <= 0x5A:
                vr = raw_vr.decode("ascii")
                if vr not in _VRS:
                    raise Malformed(f"unknown VR {vr!r} in {_tag(tag)}")
                if vr in _LONG_VRS:
                    return vr, self._l(self.need(4, f"{_tag(tag)} header"))[0]
                return vr, self._h(head[6:8])[0]
            # Not a VR: a writer switched to implicit VR inside an explicit
            # data set (pydicom reads these the same way; issue #1067).
        return _implicit_vr(tag), self._l(head[4:8])[0]

    def element(self, tag: int, vr: str, length: int, depth: int) -> None:
        top = depth == 0
        if top:
            if tag in self._seen:
                raise Malformed(f"{_tag(tag)} appears twice")
            self._seen.add(tag)
        value_pos = self.r.tell()
        if top and tag in PIXEL_TAGS:
            if self.out.pixel is not None:
                raise Malformed("more than one pixel data element")
            pixel = PixelElement(tag, vr, None if length == _UNDEFINED else length, value_pos)
            self.out.pixel = pixel
            if length == _UNDEFINED:
                self.out.fragments = self.fragments(tag, self.sink)
            else:
                self.skip(length, tag)
            pixel.end = self.r.tell()
            return
        if vr == "SQ":
            self.sequence(tag, length, depth)
            return
        if length == _UNDEFINED and vr == "UN":
            # PS3.5 §6.2.2: a UN value of undefined length is a sequence
            # encoded in implicit VR little endian.
            implicit, self.implicit = self.implicit, True
            try:
                self.sequence(tag, length, depth)
            finally:
                self.implicit = implicit
            return
        if length == _UNDEFINED:
            if vr in ("OB", "OW"):  # items, like encapsulated pixel data
                self.fragments(tag, None)
                return
            raise Malformed(f"{_tag(tag)} {vr} of undefined length")
        if top and tag in self.keep:
            cap = MAX_OFFSET_TABLE if tag in OFFSET_TABLE_TAGS else MAX_KEPT_VALUE
            if length > cap:
                raise Malformed(f"{_tag(tag)} value of {length} bytes too long")
            self.fits(length, _tag(tag))
            value = self.need(length, _tag(tag)) if length else b""
            key = BaseTag(tag)
            self.out.elements[key] = RawDataElement(key, None if self.implicit else vr, length, value, value_pos,
                                                    self.implicit, self.little)
            return
        self.skip(length, tag)

    def sequence(self, tag: int, length: int, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise Malformed(f"sequences nested deeper than {MAX_DEPTH} levels")
        end = None
        if length != _UNDEFINED:
            self.fits(length, f"sequence {_tag(tag)}")
            end = self.r.tell() + length
        while True:
            if end is not None:
                pos = self.r.tell()
                if pos == end:
                    return
                if pos > end:
                    raise Malformed(f"item overruns sequence {_tag(tag)}")
            head = self.need(8, f"sequence {_tag(tag)}")
            group, elem = self._hh(head[:4])
            item_tag, item_len = group << 16 | elem, self._l(head[4:8])[0]
            if item_tag == _SEQ_END and end is None:
                return
            if item_tag != _ITEM:
                raise Malformed(f"{_tag(item_tag)} instead of an item in {_tag(tag)}")
            if item_len == _UNDEFINED:
                self.dataset(None, depth + 1, True)
            else:
                self.fits(item_len, f"item of {_tag(tag)}")
                self.dataset(self.r.tell() + item_len, depth + 1, False)

    def fragments(self, tag: int, sink: FragmentSink | None) -> int:
        """Items of undefined-length OB/OW data up to the sequence delimiter;
        returns the number of fragments (items after the first)."""
        first, base, count = True, 0, 0
        while True:
            head = self.need(8, f"{_tag(tag)} (no delimiter)")
            group, elem = self._hh(head[:4])
            item_tag, length = group << 16 | elem, self._l(head[4:8])[0]
            if item_tag == _SEQ_END:
                break
            if item_tag != _ITEM:
                raise Malformed(f"{_tag(item_tag)} instead of an item in {_tag(tag)}")
            if length == _UNDEFINED:
                raise Malformed("fragment of undefined length")
            self.fits(length, "fragment")
            if first:
                first = False
                if sink is not None:
                    sink.offsets(self.need(length, "Basic Offset Table") if length else b"")
                else:
                    self.skip(length, tag)
                base = self.r.tell()
                continue
            count += 1
            if count > MAX_FRAGMENTS:
                raise Malformed(f"more than {MAX_FRAGMENTS} fragments")
            if sink is None:
                self.skip(length, tag)
                continue
            position = self.r.tell() - 8 - base
            head_bytes = self.need(min(length, 64), "fragment")
            tail = b""
            if length > 64:
                rest = length - 64
                if rest > 10:
                    self.skip(rest - 10, tag)
                tail = self.need(min(rest, 10), "fragment")
            sink.fragment(position, length, head_bytes, (head_bytes + tail)[-10:])
        return count


def open_source(source: Source) -> tuple[_BufferReader | _FileReader, BinaryIO | None]:
    """A reader over ``source``, and the file it opened (to close), if any.

    Raises
    ------
    OSError
        When a path cannot be opened.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _BufferReader(source), None
    if isinstance(source, (str, os.PathLike)):
        fp = Path(source).open("rb")
        return _FileReader(fp), fp
    if isinstance(source, (RawIOBase, BufferedIOBase)) or hasattr(source, "read"):
        return _FileReader(source), None
    raise TypeError(f"cannot read a data set from {type(source).__name__}")


def walk(
    r: Reader,
    *,
    implicit: bool,
    little: bool,
    keep: Collection[int],
    sink: FragmentSink | None = None,
) -> Walk:
    """Walk one data set from ``r``'s position to its end.

    Parameters
    ----------
    r:
        The data set's bytes (an :class:`Inflater` for a deflated one).
    implicit, little:
        Its encoding (from the transfer syntax).
    keep:
        Top-level tags whose values are kept (as raw elements).
    sink:
        Receives the layout of encapsulated top-level pixel data.

    Returns
    -------
    Walk
        The kept elements, the pixel data element, the data set's size.

    Raises
    ------
    Malformed
        When the bytes are not a well-formed data set.
    InflateLimit
        When ``r`` is an :class:`Inflater` and its limit is reached.
    """
    w = _Walker(r, implicit=implicit, little=little, keep=keep, sink=sink)
    start = r.tell()
    w.dataset(None, 0, False)
    w.out.size = r.tell() - start
    return w.out
