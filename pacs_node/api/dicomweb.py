"""What the DICOMweb routers share: the node of a request, UID checks on path
parameters, the base URL of RetrieveURL / BulkDataURI values, ``Accept``
header parsing (PS3.18 §8.7) and streamed multipart/related answers.

Used by :mod:`pacs_node.api.wado` (WADO-RS) and :mod:`pacs_node.api.qido`
(QIDO-RS); the objects they serve are found by :mod:`pacs_node.api.objects`.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse

from pacs_node.ingest.uids import InvalidUIDError, check_uid
from pacs_node.node import Node

__all__ = [
    "AUTH_DOC",
    "DICOM_JSON",
    "MediaRange",
    "PREFIX",
    "Part",
    "base_url",
    "check_path_uids",
    "multipart_response",
    "node_of",
    "parse_accept",
    "require_json",
]

logger = logging.getLogger(__name__)

#: Prefix of every DICOMweb route (STOW-RS, WADO-RS, QIDO-RS).
PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
_CHUNK = 1 << 20

#: OpenAPI ``responses`` of the DICOMweb routes.
AUTH_DOC: dict[int | str, dict[str, str]] = {
    400: {"description": "malformed UID, frame list or query parameter"},
    401: {"description": "missing or wrong bearer token"},
    403: {"description": "the token lacks the read scope"},
    404: {"description": "no such study, series or instance on this node"},
    406: {"description": "the Accept header asks for a representation this node cannot produce"},
}


def node_of(request: Request) -> Node:
    """The node the application serves.

    Parameters
    ----------
    request:
        The current request.

    Returns
    -------
    Node
        ``request.app.state.node``.
    """
    node: Node = request.app.state.node
    return node


def check_path_uids(**uids: str | None) -> None:
    """Check the UIDs of a request path (keyword = attribute name).

    Parameters
    ----------
    **uids:
        E.g. ``StudyInstanceUID=study_uid``; ``None`` values are skipped.

    Raises
    ------
    HTTPException
        400 naming the attribute (never echoing the value).
    """
    try:
        for name, value in uids.items():
            if value is not None:
                check_uid(value, name)
    except InvalidUIDError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


def base_url(request: Request) -> str:
    """Base of the node's DICOMweb URLs as the client reached it.

    Parameters
    ----------
    request:
        The current request.

    Returns
    -------
    str
        E.g. ``http://node:8080/dicomweb`` (no trailing slash).
    """
    return str(request.base_url).rstrip("/") + PREFIX


# -------------------------------------------------------------------- Accept
@dataclass(frozen=True)
class MediaRange:
    """One entry of an ``Accept`` header: ``type/subtype`` and its parameters
    (lower-case names; the ``type`` of a multipart range unquoted)."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        """Whether this range accepts ``media_type`` (wildcards allowed).

        Parameters
        ----------
        media_type:
            A concrete media type, e.g. ``application/dicom+json``.

        Returns
        -------
        bool
            ``*/*``, ``type/*`` or an exact match.
        """
        return _media_match(self.media_type, media_type)


def _media_match(pattern: str, media_type: str) -> bool:
    if pattern in ("*/*", "*"):
        return True
    major, _, minor = pattern.partition("/")
    want_major, _, want_minor = media_type.partition("/")
    return major == want_major and minor in ("*", want_minor)


_SPLIT = re.compile(r'((?:[^,"]|"[^"]*")+)')
_PARAM = re.compile(r'\s*([^=;\s]+)\s*=\s*("([^"]*)"|[^;]*)')


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an ``Accept`` header, most preferred first.

    Quoted and unquoted parameters are both understood (OHIF sends
    ``multipart/related; type=application/octet-stream; transfer-syntax=*``
    without quotes).

    Parameters
    ----------
    header:
        The header's value; ``None`` or empty means ``*/*``.

    Returns
    -------
    list of MediaRange
        Sorted by ``q`` (stable); ranges with ``q=0`` are dropped.
    """
    if not header or not header.strip():
        return [MediaRange("*/*")]
    out: list[MediaRange] = []
    for chunk in _SPLIT.findall(header):
        head, _, rest = chunk.partition(";")
        media = head.strip().lower()
        if not media:
            continue
        params: dict[str, str] = {}
        for m in _PARAM.finditer(rest):
            value = m.group(3) if m.group(3) is not None else m.group(2).strip()
            params[m.group(1).lower()] = value
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            if "type" in params:
                params["type"] = params["type"].strip().lower()
            out.append(MediaRange(media, params, q))
    return sorted(out, key=lambda r: -r.q)


def require_json(request: Request) -> None:
    """Check that the client accepts ``application/dicom+json``.

    Parameters
    ----------
    request:
        The current request.

    Raises
    ------
    HTTPException
        406 when no range of the ``Accept`` header matches DICOM JSON (or
        plain JSON).
    """
    ranges = parse_accept(request.headers.get("accept"))
    if not any(r.matches(DICOM_JSON) or r.matches("application/json") for r in ranges):
        raise HTTPException(status_code=406, detail="this resource is available as application/dicom+json only")


# ----------------------------------------------------------------- multipart
@dataclass(frozen=True)
class Part:
    """One part of a multipart/related answer: its Content-Type and either
    bytes or a file streamed in chunks."""

    content_type: str
    data: bytes | None = None
    path: Path | None = None

    def size(self) -> int:
        """Length of the part's body in bytes.

        Returns
        -------
        int
            ``len(data)`` or the file's size.
        """
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        return self.path.stat().st_size

    def chunks(self) -> Iterator[bytes]:
        """The part's body.

        Yields
        ------
        bytes
            The bytes, or the file in chunks of 1 MiB.
        """
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        with self.path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk


def _body(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    for part in parts:
        yield (f"--{boundary}\r\nContent-Type: {part.content_type}\r\n"
               f"Content-Length: {part.size()}\r\n\r\n").encode()
        yield from part.chunks()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def multipart_response(parts: Iterable[Part], media_type: str, *, transfer_syntax: str | None = None,
                       headers: dict[str, str] | None = None) -> StreamingResponse:
    """A streamed ``multipart/related`` answer.

    Parameters
    ----------
    parts:
        The parts, in order (consumed while the answer is sent).
    media_type:
        The ``type`` parameter, e.g. ``application/dicom``.
    transfer_syntax:
        Optional ``transfer-syntax`` parameter of the answer's Content-Type.
    headers:
        More response headers.

    Returns
    -------
    StreamingResponse
        ``multipart/related; type="..."; boundary=...``.
    """
    boundary = uuid.uuid4().hex
    ctype = f'multipart/related; type="{media_type}"'
    if transfer_syntax:
        ctype += f"; transfer-syntax={transfer_syntax}"
    return StreamingResponse(_body(parts, boundary), media_type=f"{ctype}; boundary={boundary}", headers=headers)
