"""WADO-RS (PS3.18 §10.4) for the node's stored objects: the instances it
received and its own results (:mod:`pacs_node.api.objects`), for remote
workers (no shared disk) and for viewers such as OHIF.

* ``GET /dicomweb/studies/{study}``, ``.../series/{series}``,
  ``.../instances/{sop}``: multipart/related; type="application/dicom", one
  part per instance, bytes as stored (no transcoding: a ``transfer-syntax``
  other than ``*`` or the stored one answers 406).
* ``.../metadata`` of a study, series or instance: DICOM JSON, with
  BulkDataURI for pixel data and binary values over 1 KiB
  (:mod:`pacs_node.api.dicom_json`).
* ``.../instances/{sop}/frames/{1,2,...}``: multipart/related frames, native
  (decoded) or as stored, chosen by the Accept header (:mod:`pacs_node.api.frames`).
* ``.../instances/{sop}/bulk/{tag}[/{item}/{tag}...]``: the value a BulkDataURI
  names. Pixel data, negotiated as ``frames``: natively one part (the
  uncompressed value), as stored one part per compressed frame.

Every route needs a token with the ``read`` scope (:mod:`pacs_node.api.auth`);
a remote worker uses its own read-only token (``[worker] node_token``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from pacs_node.api.auth import ReadAuth
from pacs_node.api.dicom_json import PIXEL_TAGS, BulkPathError, bulk_value, dataset_json, parse_bulk_path, read_header
from pacs_node.api.dicomweb import (
    AUTH_DOC,
    DICOM_JSON,
    PREFIX,
    Part,
    base_url,
    check_path_uids,
    multipart_response,
    node_of,
    parse_accept,
    require_json,
)
from pacs_node.api.frames import (
    OCTET,
    FrameError,
    NoPixelDataError,
    choose_frame_media,
    parse_frame_list,
    read_frames,
    read_pixel_data,
)
from pacs_node.api.objects import StoredObject, find_objects

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix=PREFIX, tags=["dicomweb"])
_DICOM = "application/dicom"


def _objects(request: Request, study_uid: str, series_uid: str | None = None,
             sop_uid: str | None = None) -> list[StoredObject]:
    check_path_uids(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=sop_uid)
    return find_objects(node_of(request), study_uid, series_uid, sop_uid)


def _stored_ts(obj: StoredObject) -> str:
    if obj.transfer_syntax_uid:
        return obj.transfer_syntax_uid
    try:
        return str(read_file_meta_info(obj.path).get("TransferSyntaxUID", ""))
    except (OSError, InvalidDicomError) as exc:
        raise HTTPException(status_code=500, detail="the stored file is unreadable") from exc


def _check_dicom_accept(request: Request, objects: list[StoredObject]) -> None:
    """406 unless the Accept header admits multipart application/dicom as stored."""
    for r in parse_accept(request.headers.get("accept")):
        if r.media_type == "multipart/related":
            if r.params.get("type", _DICOM) not in ("*/*", "application/*", _DICOM):
                continue
        elif r.media_type not in ("*/*", "multipart/*"):
            continue
        ts = r.params.get("transfer-syntax")
        if ts in (None, "", "*") or all(_stored_ts(o) == ts for o in objects):
            return
    raise HTTPException(status_code=406, detail='instances are served as multipart/related; type="application/dicom" '
                                                "in their stored transfer syntax (transfer-syntax=* or none)")


def _retrieve(request: Request, objects: list[StoredObject]) -> StreamingResponse:
    _check_dicom_accept(request, objects)
    logger.info("WADO-RS retrieve: %d instance(s)", len(objects))
    return multipart_response((Part(_DICOM, path=o.path) for o in objects), _DICOM)


def _metadata(request: Request, objects: list[StoredObject]) -> StreamingResponse:
    require_json(request)
    base = base_url(request)

    def body() -> Iterator[bytes]:
        yield b"["
        first = True
        for obj in objects:
            try:
                header = read_header(obj.path)
            except (OSError, InvalidDicomError) as exc:
                logger.warning("WADO-RS metadata: a stored file is unreadable (%s)", exc.__class__.__name__)
                continue
            url = f"{base}/studies/{obj.study_uid}/series/{obj.series_uid}/instances/{obj.sop_uid}"
            item = dataset_json(header.dataset, bulk_url=url, pixel=header.pixel,
                                transfer_syntax_uid=header.transfer_syntax_uid)
            yield (b"" if first else b",") + json.dumps(item, separators=(",", ":")).encode()
            first = False
        yield b"]"

    return StreamingResponse(body(), media_type=DICOM_JSON)


@router.get("/studies/{study_uid}", dependencies=[ReadAuth], responses=AUTH_DOC,
            summary="Retrieve a study (WADO-RS)")
def retrieve_study(study_uid: str, request: Request) -> StreamingResponse:
    """All instances of a study (received and the node's results) as multipart/related application/dicom."""
    return _retrieve(request, _objects(request, study_uid))


@router.get("/studies/{study_uid}/metadata", dependencies=[ReadAuth], responses=AUTH_DOC,
            summary="Metadata of a study (WADO-RS, DICOM JSON)")
def study_metadata(study_uid: str, request: Request) -> StreamingResponse:
    """DICOM JSON of every instance of a study, with BulkDataURIs for pixel and bulk data."""
    return _metadata(request, _objects(request, study_uid))


@router.get("/studies/{study_uid}/series/{series_uid}", dependencies=[ReadAuth], responses=AUTH_DOC,
            summary="Retrieve a series (WADO-RS)")
def retrieve_series(study_uid: str, series_uid: str, request: Request) -> StreamingResponse:
    """All instances of a series as multipart/related application/dicom."""
    return _retrieve(request, _objects(request, study_uid, series_uid))


@router.get("/studies/{study_uid}/series/{series_uid}/metadata", dependencies=[ReadAuth], responses=AUTH_DOC,
            summary="Metadata of a series (WADO-RS, DICOM JSON)")
def series_metadata(study_uid: str, series_uid: str, request: Request) -> StreamingResponse:
    """DICOM JSON of every instance of a series, with BulkDataURIs for pixel and bulk data."""
    return _metadata(request, _objects(request, study_uid, series_uid))


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", dependencies=[ReadAuth],
            responses=AUTH_DOC, summary="Retrieve an instance (WADO-RS)")
def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str, request: Request) -> StreamingResponse:
    """One instance as multipart/related application/dicom."""
    return _retrieve(request, _objects(request, study_uid, series_uid, sop_uid))


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata", dependencies=[ReadAuth],
            responses=AUTH_DOC, summary="Metadata of an instance (WADO-RS, DICOM JSON)")
def instance_metadata(study_uid: str, series_uid: str, sop_uid: str, request: Request) -> StreamingResponse:
    """DICOM JSON of one instance (an array of one object)."""
    return _metadata(request, _objects(request, study_uid, series_uid, sop_uid))


def _frames_response(request: Request, obj: StoredObject, numbers: list[int] | None) -> StreamingResponse:
    """Frames ``numbers``, or (``None``) the whole pixel data for its BulkDataURI."""
    ts = _stored_ts(obj)
    media = choose_frame_media(parse_accept(request.headers.get("accept")), ts)
    if media is None:
        raise HTTPException(status_code=406, detail=(
            f"frames are stored as {ts}: ask for application/octet-stream (decoded, uncompressed), "
            "transfer-syntax=* or the stored syntax's media type; the node does not re-encode"))
    try:
        frames = read_pixel_data(obj.path, media) if numbers is None else read_frames(obj.path, numbers, media)
    except FrameError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    except NoPixelDataError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except (OSError, InvalidDicomError) as exc:
        raise HTTPException(status_code=500, detail="the stored file is unreadable") from exc
    except Exception as exc:  # noqa: BLE001 - a decoder failure names the codec problem
        logger.warning("WADO-RS frames: decoding %s failed: %s", ts, exc.__class__.__name__)
        raise HTTPException(status_code=500, detail=f"decoding {ts} failed; transfer-syntax=* returns the "
                                                     "frames as stored") from None
    logger.info("WADO-RS pixel data: %d part(s) as %s", len(frames), media.part_type)
    return multipart_response((Part(media.part_type, data=f) for f in frames), media.media_type,
                              transfer_syntax=media.transfer_syntax)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frames}",
            dependencies=[ReadAuth], responses=AUTH_DOC, summary="Retrieve frames of an instance (WADO-RS)")
def retrieve_frames(study_uid: str, series_uid: str, sop_uid: str, frames: str, request: Request) -> StreamingResponse:
    """Frames (comma-separated, from 1) as multipart/related, decoded or as stored (Accept)."""
    check_path_uids(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=sop_uid)
    try:
        numbers = parse_frame_list(frames)
    except FrameError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    obj = _objects(request, study_uid, series_uid, sop_uid)[0]
    return _frames_response(request, obj, numbers)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulk/{tag_path:path}",
            dependencies=[ReadAuth], responses=AUTH_DOC, summary="Retrieve bulk data of an instance (WADO-RS)")
def retrieve_bulk(study_uid: str, series_uid: str, sop_uid: str, tag_path: str, request: Request) -> StreamingResponse:
    """The value a metadata BulkDataURI names (pixel data: negotiated as ``frames``)."""
    check_path_uids(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=sop_uid)
    try:
        steps = parse_bulk_path(tag_path)
    except BulkPathError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    obj = _objects(request, study_uid, series_uid, sop_uid)[0]
    if len(steps) == 1 and steps[0] in PIXEL_TAGS:
        return _frames_response(request, obj, None)
    ranges = parse_accept(request.headers.get("accept"))
    if not any(r.media_type in ("*/*", "multipart/*") or (
            r.media_type == "multipart/related" and r.params.get("type", OCTET) in ("*/*", "application/*", OCTET))
            for r in ranges):
        raise HTTPException(status_code=406, detail='bulk data is served as multipart/related; '
                                                    'type="application/octet-stream"')
    try:
        found = bulk_value(obj.path, steps)
    except OSError as exc:
        raise HTTPException(status_code=500, detail="the stored file is unreadable") from exc
    if found is None:
        raise HTTPException(status_code=404, detail="no such bulk data element in this instance")
    return multipart_response([Part(OCTET, data=found[1])], OCTET)
