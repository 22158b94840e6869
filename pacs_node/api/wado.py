"""WADO-RS (PS3.18 §10.4) for the node's stored instances, so that workers on
other hosts (no shared disk) can fetch a job's series over HTTP.

* ``GET /dicomweb/studies/{study}/series/{series}``: multipart/related;
  type="application/dicom", one part per instance, bytes as stored.
* ``GET /dicomweb/studies/{study}/series/{series}/metadata``: DICOM JSON
  (bulk data left out).
* ``GET /dicomweb/studies/{study}/series/{series}/instances/{sop}``: one instance.

Every route needs a token with the ``read`` scope (:mod:`pacs_node.api.auth`);
a remote worker uses its own read-only token (``[worker] node_token``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom import dcmread
from sqlalchemy import select

from pacs_node.api.auth import ReadAuth
from pacs_node.db.models import Instance, Series, Study
from pacs_node.ingest.uids import InvalidUIDError, check_uid
from pacs_node.node import Node

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
_AUTH_DOC: dict[int | str, dict[str, str]] = {
    400: {"description": "malformed UID in the path"},
    401: {"description": "missing or wrong bearer token"},
    403: {"description": "the token lacks the read scope"},
    404: {"description": "no such series or instance on this node"},
}
_CHUNK = 1 << 20


def _node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


def _instances(node: Node, study_uid: str, series_uid: str, sop_uid: str | None = None) -> list[Path]:
    try:
        check_uid(study_uid, "StudyInstanceUID")
        check_uid(series_uid, "SeriesInstanceUID")
        if sop_uid is not None:
            check_uid(sop_uid, "SOPInstanceUID")
    except InvalidUIDError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    q = (
        select(Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Instance.study_id)
        .where(Study.study_instance_uid == study_uid, Series.series_instance_uid == series_uid)
        .order_by(Instance.instance_number, Instance.id)
    )
    if sop_uid is not None:
        q = q.where(Instance.sop_instance_uid == sop_uid)
    with node.db.sessionmaker() as s:
        rel = list(s.execute(q).scalars())
    if not rel:
        raise HTTPException(status_code=404, detail="no such series or instance on this node")
    return [node.store.path_of(p) for p in rel]


def _multipart(paths: list[Path], boundary: str) -> Iterator[bytes]:
    for p in paths:
        yield (f"--{boundary}\r\nContent-Type: application/dicom\r\n"
               f"Content-Length: {p.stat().st_size}\r\n\r\n").encode()
        with p.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


@router.get("/studies/{study_uid}/series/{series_uid}", dependencies=[ReadAuth], responses=_AUTH_DOC,
            summary="Retrieve a series (WADO-RS)")
def retrieve_series(study_uid: str, series_uid: str, request: Request) -> StreamingResponse:
    """All instances of a series as multipart/related application/dicom."""
    paths = _instances(_node(request), study_uid, series_uid)
    boundary = uuid.uuid4().hex
    logger.info("WADO-RS series: %d instances", len(paths))
    return StreamingResponse(
        _multipart(paths, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", dependencies=[ReadAuth],
            responses=_AUTH_DOC, summary="Retrieve an instance (WADO-RS)")
def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str, request: Request) -> StreamingResponse:
    """One instance as multipart/related application/dicom."""
    paths = _instances(_node(request), study_uid, series_uid, sop_uid)
    boundary = uuid.uuid4().hex
    return StreamingResponse(
        _multipart(paths, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


@router.get("/studies/{study_uid}/series/{series_uid}/metadata", dependencies=[ReadAuth], responses=_AUTH_DOC,
            summary="Metadata of a series (WADO-RS, DICOM JSON)")
def series_metadata(study_uid: str, series_uid: str, request: Request) -> JSONResponse:
    """DICOM JSON of every instance (pixel data and other bulk data left out)."""
    paths = _instances(_node(request), study_uid, series_uid)
    out = []
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        out.append(ds.to_json_dict(bulk_data_threshold=1 << 16, bulk_data_element_handler=lambda _e: ""))
    return JSONResponse(out, media_type="application/dicom+json")
