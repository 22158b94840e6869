"""Incremental ``multipart/related`` parser (RFC 2046 §5.1, RFC 2387).

STOW-RS requests (PS3.18 §10.5) carry one DICOM Part 10 file per body part.
:class:`MultipartParser` works on bytes as they arrive: it is fed chunks and
hands back every body part as soon as the delimiter that ends it has been
seen, so a request of any size is processed holding at most one part (plus
one network chunk) in memory. :func:`iter_parts` wraps it around an async
byte stream such as Starlette's ``Request.stream()``.

Syntax accepted (RFC 2046 §5.1.1)::

    preamble  CRLF? "--" boundary *LWSP CRLF  part-headers CRLF body
    *( CRLF "--" boundary *LWSP CRLF part-headers CRLF body )
    CRLF "--" boundary "--" epilogue

The delimiter is recognised only at the start of the body or right after a
line break, and only when it is followed by ``--``, white space or a line
break, so bytes such as ``--boundaryX`` inside the data are left alone. Sloppy
clients that end lines with a bare LF are tolerated: the line ending of the
first delimiter line decides how the body parts are delimited.

Why not python-multipart (the parser FastAPI uses for forms): its streaming
``MultipartParser`` (0.0.34, tried here) refuses a preamble before the first
delimiter ("Expected boundary character 45") and a bare-LF line end ("Did not
find CR at end of boundary"). RFC 2046 allows the first, real DICOMweb
clients send both, and ``tests/test_stow.py`` holds the node to them. The
node has no form endpoints, so python-multipart is not a dependency.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "MultipartError",
    "MultipartParser",
    "Part",
    "iter_parts",
    "parse_boundary",
    "parse_content_type",
    "parse_multipart",
]

#: RFC 2046 §5.1.1: a boundary is 1 to 70 characters.
MAX_BOUNDARY_LENGTH = 70
#: Upper bound of one part's header section; a real part has a few lines.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024

_CR, _LF, _SP, _HT, _DASH = 0x0D, 0x0A, 0x20, 0x09, 0x2D


class MultipartError(ValueError):
    """The body is not a well-formed multipart entity."""


@dataclass(frozen=True)
class Part:
    """One body part.

    Attributes
    ----------
    headers:
        Header fields, names lower-cased, values stripped; a repeated field's
        values are joined with ``", "``.
    data:
        The part's content, exactly as sent.
    """

    headers: Mapping[str, str]
    data: bytes

    @property
    def media_type(self) -> str | None:
        """The part's media type, lower-cased, without parameters (``None``
        when the part has no Content-Type header)."""
        value = self.headers.get("content-type")
        if value is None:
            return None
        return parse_content_type(value)[0]


def _split_params(value: str) -> list[str]:
    """Split a header value on ``;`` outside quoted strings."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return items


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        escaped = False
        for ch in inner:
            if escaped or ch != "\\":
                out.append(ch)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type value into media type and parameters.

    Parameters
    ----------
    value:
        For example ``multipart/related; type="application/dicom"; boundary=x``.

    Returns
    -------
    tuple of (str, dict)
        The media type lower-cased, and the parameters with lower-cased names
        and unquoted values (RFC 9110 §5.6.6 quoted-string rules).
    """
    items = _split_params(value)
    media_type = items[0].strip().lower()
    params: dict[str, str] = {}
    for item in items[1:]:
        name, sep, raw = item.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            continue
        params[name] = _unquote(raw.strip())
    return media_type, params


def parse_boundary(params: Mapping[str, str]) -> bytes:
    """The ``boundary`` parameter, checked against RFC 2046 §5.1.1.

    Raises
    ------
    MultipartError
        When the boundary is missing, longer than 70 characters, ends with a
        space, or contains characters that cannot appear in one.
    """
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError("the Content-Type has no boundary parameter")
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise MultipartError(f"the boundary is longer than {MAX_BOUNDARY_LENGTH} characters")
    if boundary.endswith(" ") or any(not (0x20 <= ord(ch) < 0x7F) for ch in boundary):
        raise MultipartError("the boundary contains characters not allowed in a boundary")
    return boundary.encode("ascii")


class _State(enum.Enum):
    PREAMBLE = "preamble"
    HEADERS = "headers"
    BODY = "body"
    EPILOGUE = "epilogue"


@dataclass
class _Delimiter:
    """What follows ``--boundary``: a close delimiter, or a line break."""

    close: bool
    end: int  # offset just past the delimiter line
    lf_only: bool = False


@dataclass
class MultipartParser:
    """Push parser for one multipart body.

    Feed it the body in chunks of any size with :meth:`feed`, which returns
    the parts completed by that chunk, then call :meth:`close` at the end of
    the body to check that the close delimiter was seen.

    Parameters
    ----------
    boundary:
        The ``boundary`` parameter of the Content-Type.
    max_header_bytes:
        Largest header section a part may have.

    Examples
    --------
    >>> p = MultipartParser(b"b")
    >>> [part.data for part in p.feed(b"--b\\r\\n\\r\\nhello\\r\\n--b--\\r\\n")]
    [b'hello']
    >>> p.close()
    """

    boundary: bytes
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    parts_seen: int = field(default=0, init=False)
    bytes_seen: int = field(default=0, init=False)
    _state: _State = field(default=_State.PREAMBLE, init=False)
    _buf: bytearray = field(default_factory=bytearray, init=False)
    _scan: int = field(default=0, init=False)  # where the next search may start
    _discarded: int = field(default=0, init=False)  # preamble bytes dropped
    _lf_only: bool = field(default=False, init=False)
    _headers: dict[str, str] = field(default_factory=dict, init=False)
    _last_header: str | None = field(default=None, init=False)
    _header_bytes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.boundary, str):  # tolerate str for convenience
            self.boundary = self.boundary.encode("ascii")
        if not self.boundary or len(self.boundary) > MAX_BOUNDARY_LENGTH:
            raise MultipartError("the boundary must be 1 to 70 characters")
        self._dash_boundary = b"--" + self.boundary

    @property
    def complete(self) -> bool:
        """True once the close delimiter has been seen."""
        return self._state is _State.EPILOGUE

    def feed(self, data: bytes) -> list[Part]:
        """Consume the next chunk of the body.

        Returns
        -------
        list of Part
            The parts whose ending delimiter is in this chunk (often none).

        Raises
        ------
        MultipartError
            When the structure is broken (bad part header, no body parts).
        """
        self.bytes_seen += len(data)
        if self._state is _State.EPILOGUE:
            return []  # the epilogue is ignored (RFC 2046 §5.1.1)
        self._buf += data
        parts: list[Part] = []
        while True:
            if self._state is _State.PREAMBLE:
                progressed = self._skip_preamble()
            elif self._state is _State.HEADERS:
                progressed = self._read_headers()
            elif self._state is _State.BODY:
                part = self._read_body()
                progressed = part is not None
                if part is not None:
                    parts.append(part)
            else:
                self._buf.clear()
                progressed = False
            if not progressed:
                return parts

    def close(self) -> None:
        """Signal the end of the body.

        Raises
        ------
        MultipartError
            When the body was empty or ended before the close delimiter.
        """
        if self._state is _State.EPILOGUE:
            return
        if self.bytes_seen == 0:
            raise MultipartError("the request body is empty")
        if self._state is _State.PREAMBLE:
            raise MultipartError("no multipart delimiter with the declared boundary was found")
        if self._state is _State.HEADERS:
            raise MultipartError("the body ended inside a part's headers (missing close delimiter)")
        raise MultipartError("the body ended inside a part (missing close delimiter)")

    # -- states ---------------------------------------------------------

    def _delimiter_at(self, pos: int) -> _Delimiter | bool | None:
        """Classify the bytes following ``--boundary`` at ``pos``.

        Returns a :class:`_Delimiter`, ``False`` when they show this is not a
        delimiter (e.g. ``--boundaryX``), ``None`` when more input is needed.
        """
        buf, n = self._buf, len(self._buf)
        if pos >= n:
            return None
        if buf[pos] == _DASH:
            if pos + 1 >= n:
                return None
            return _Delimiter(close=True, end=pos + 2) if buf[pos + 1] == _DASH else False
        i = pos
        while i < n and buf[i] in (_SP, _HT):  # transport padding
            i += 1
        if i >= n:
            return None
        if buf[i] == _LF:
            return _Delimiter(close=False, end=i + 1, lf_only=True)
        if buf[i] == _CR:
            if i + 1 >= n:
                return None
            return _Delimiter(close=False, end=i + 2) if buf[i + 1] == _LF else False
        return False

    def _skip_preamble(self) -> bool:
        buf, dash = self._buf, self._dash_boundary
        while True:
            idx = buf.find(dash, self._scan)
            if idx < 0:
                # Keep what could be the start of a delimiter plus the byte
                # before it (to know whether it begins a line).
                keep = len(dash)
                if len(buf) > keep:
                    drop = len(buf) - keep
                    del buf[:drop]
                    self._discarded += drop
                self._scan = 0
                return False
            at_line_start = (idx == 0 and self._discarded == 0) or (idx > 0 and buf[idx - 1] == _LF)
            if at_line_start:
                found = self._delimiter_at(idx + len(dash))
                if found is None:
                    self._scan = idx
                    return False
                if isinstance(found, _Delimiter):
                    if found.close:
                        raise MultipartError("the multipart body has no body parts")
                    del buf[: found.end]
                    self._discarded += found.end
                    self._lf_only = found.lf_only
                    self._begin_headers()
                    return True
            self._scan = idx + 1

    def _begin_headers(self) -> None:
        self._state = _State.HEADERS
        self._headers = {}
        self._last_header = None
        self._header_bytes = 0
        self._scan = 0

    def _read_headers(self) -> bool:
        buf = self._buf
        progressed = False
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if self._header_bytes + len(buf) > self.max_header_bytes:
                    raise MultipartError("a part's header section is too large")
                return progressed
            self._header_bytes += nl + 1
            if self._header_bytes > self.max_header_bytes:
                raise MultipartError("a part's header section is too large")
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            progressed = True
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                self._state = _State.BODY
                self._scan = 0
                return True
            self._add_header_line(line)

    def _add_header_line(self, line: bytes) -> None:
        text = line.decode("latin-1")
        if text[0] in " \t":  # obsolete line folding (RFC 5322 §3.2.2)
            if self._last_header is None:
                raise MultipartError("malformed part header: continuation line without a header")
            self._headers[self._last_header] += " " + text.strip()
            return
        name, sep, value = text.partition(":")
        name = name.strip().lower()
        if not sep or not name or any(ch in name for ch in " \t"):
            raise MultipartError("malformed part header line (is a blank line missing after the delimiter?)")
        value = value.strip()
        if name in self._headers:
            self._headers[name] += ", " + value
        else:
            self._headers[name] = value
        self._last_header = name

    def _read_body(self) -> Part | None:
        buf = self._buf
        delim = (b"\n" if self._lf_only else b"\r\n") + self._dash_boundary
        while True:
            idx = buf.find(delim, self._scan)
            if idx < 0:
                self._scan = max(0, len(buf) - len(delim) + 1)
                return None
            found = self._delimiter_at(idx + len(delim))
            if found is None:
                self._scan = idx
                return None
            if isinstance(found, _Delimiter):
                break
            self._scan = idx + 1  # "--boundaryX" inside the data
        end = idx
        if self._lf_only and end > 0 and buf[end - 1] == _CR:
            end -= 1  # a CRLF line end in a message that began with LF
        # One copy of the part; the bytes after the delimiter (at most a
        # chunk) are moved to a fresh buffer instead of shifting the part.
        rest = buf[found.end :]
        del buf[end:]
        data = bytes(buf)
        self._buf = rest
        part = Part(headers=self._headers, data=data)
        self.parts_seen += 1
        if found.close:
            self._state = _State.EPILOGUE
            self._buf.clear()
        else:
            self._begin_headers()
        return part


async def iter_parts(
    chunks: AsyncIterable[bytes],
    boundary: bytes,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> AsyncGenerator[Part, None]:
    """Yield the parts of a multipart body read from an async byte stream.

    Each part is yielded as soon as its ending delimiter has arrived; the
    stream is not read further until the consumer asks for the next part.

    Raises
    ------
    MultipartError
        When the body is malformed; parts before the error have been yielded.
    """
    parser = MultipartParser(boundary, max_header_bytes=max_header_bytes)
    async for chunk in chunks:
        if chunk:
            for part in parser.feed(chunk):
                yield part
    parser.close()


def parse_multipart(body: bytes, boundary: bytes) -> list[Part]:
    """Parse a complete multipart body held in memory.

    Raises
    ------
    MultipartError
        When the body is malformed.
    """
    parser = MultipartParser(boundary)
    parts = parser.feed(body)
    parser.close()
    return parts
