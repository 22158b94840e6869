"""DICOMweb STOW-RS front end (PS3.18 §10.5 Studies Store Transaction).

``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}`` accept a
``multipart/related; type="application/dicom"`` body with one DICOM Part 10
file per part. The body is parsed while it streams in
(:mod:`pacs_node.ingest.multipart`); each part goes through the same path as a
DIMSE C-STORE (:func:`~pacs_node.ingest.recorder.parse_meta`, then
:meth:`~pacs_node.ingest.recorder.Ingestor.ingest`) in a worker thread, so an
instance is listed as stored only once its file and row are durable.

The response is a Store Instances Response Module (PS3.18 Annex I) in the DICOM
JSON model (PS3.18 Annex F), with the HTTP status of PS3.18 §10.5.3.1
Table 10.5.3-1: 200 all stored, 202 some stored with failures or warnings,
409 none stored, 400 malformed request, 413 body too large, 415 unsupported
media type. Failure Reason values (PS3.18 §I.2.2, Table I.2-2) are the DIMSE
statuses of :class:`~pacs_node.ingest.recorder.Status`, plus:

* ``0xA900`` (Error: Data Set does not match SOP Class) for an instance whose
  Study Instance UID differs from the study in the request URL. Table
  10.5.3-1 names "Study Instance UID mismatch" as a conflict; Table I.2-2 has
  no dedicated code, and A9xx ("does not conform to its specified SOP Class")
  is the closest: the data set does not match the request's target.
* ``0xC000`` (Error: Cannot understand, the generic Cxxx code of Table I.2-2)
  for a part this server cannot process at all: a media type other than
  ``application/dicom``, or a truncated last part when the body ends without
  its close delimiter. No more specific standard code exists for these.

Only PS3.10 binary parts are supported; the metadata + bulk data form
(``application/dicom+json`` / ``+xml`` root parts) is refused with 415. The
response is always ``application/dicom+json``, whatever the Accept header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydicom import dcmread
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from pacs_node.api.auth import WriteAuth
from pacs_node.ingest.header import read_file_meta
from pacs_node.ingest.multipart import MultipartError, Part, iter_parts, parse_boundary, parse_content_type
from pacs_node.ingest.recorder import IngestError, Ingestor, InstanceMeta, Status
from pacs_node.ingest.uids import is_valid_uid

__all__ = ["DICOM_JSON", "FAILURE_CANNOT_UNDERSTAND_PART", "router"]

logger = logging.getLogger(__name__)

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
#: Failure Reason for a part that is not a PS3.10 file (PS3.18 Table I.2-2, Cxxx).
FAILURE_CANNOT_UNDERSTAND_PART = 0xC000

router = APIRouter(prefix=PREFIX, tags=["dicomweb"])

# DICOM JSON model tags (PS3.18 Annex F) of the Store Instances Response Module.
_RETRIEVE_URL = "00081190"
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_CLASS_UID = "00081150"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


class _RequestError(Exception):
    """The request as a whole is refused with ``status`` (HTTP)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _BodyTooLarge(Exception):
    pass


class _ReadTimeout(Exception):
    pass


@dataclass(frozen=True)
class _Result:
    """What happened to one body part."""

    sop_class_uid: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    failure: int | None = None  # Failure Reason, None when stored
    warning: int | None = None  # Warning Reason of a stored instance
    duplicate: bool = False


@dataclass
class _Report:
    """Results of one request, in part order."""

    results: list[_Result] = field(default_factory=list)

    @property
    def stored(self) -> list[_Result]:
        return [r for r in self.results if r.failure is None]

    @property
    def failed(self) -> list[_Result]:
        return [r for r in self.results if r.failure is not None]

    def http_status(self) -> int:
        """PS3.18 §10.5.3.1, Table 10.5.3-1."""
        stored = self.stored
        if not stored:
            return 409
        if self.failed or any(r.warning is not None for r in stored):
            return 202
        return 200


def _check_content_type(value: str | None) -> bytes:
    """Validate the request's Content-Type and return the boundary.

    Raises
    ------
    _RequestError
        415 for anything but ``multipart/related`` of ``application/dicom``
        parts, 400 when the boundary is missing or invalid.
    """
    if not value:
        raise _RequestError(415, 'missing Content-Type: expected multipart/related; type="application/dicom"')
    media_type, params = parse_content_type(value)
    if media_type != "multipart/related":
        raise _RequestError(
            415,
            f'unsupported Content-Type {media_type!r}: STOW-RS expects multipart/related; type="application/dicom"',
        )
    root_type = params.get("type")
    if root_type is not None:
        root = parse_content_type(root_type)[0]
        if root in ("application/dicom+json", "application/dicom+xml"):
            raise _RequestError(
                415,
                f"multipart/related of {root} (metadata + bulk data) is not supported: "
                "send DICOM Part 10 files as application/dicom parts",
            )
        if root != "application/dicom":
            raise _RequestError(
                415, f"unsupported multipart/related type {root!r}: only application/dicom parts are supported"
            )
    try:
        return parse_boundary(params)
    except MultipartError as exc:
        raise _RequestError(400, f"malformed multipart/related Content-Type: {exc}") from None


async def _limited(stream: AsyncIterator[bytes], limit: int, timeout: float) -> AsyncIterator[bytes]:
    """Pass chunks through, raising :class:`_BodyTooLarge` past ``limit`` bytes
    and :class:`_ReadTimeout` when no chunk arrives for ``timeout`` seconds
    (a Content-Length larger than the body, a stalled client)."""
    total = 0
    chunks = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise _ReadTimeout() from None
        total += len(chunk)
        if total > limit:
            raise _BodyTooLarge()
        yield chunk


def _known_uids(data: bytes) -> tuple[str | None, str | None]:
    """Best effort SOP Class / Instance UIDs of a refused part, for the
    FailedSOPSequence; only values that are valid UIDs are returned.

    The data set's own UIDs come first. A deflated data set is not inflated
    again (it may be a deflate bomb): its File Meta names it."""
    try:
        file_meta, _start = read_file_meta(data)
    except Exception:  # noqa: BLE001 - no readable File Meta: the UIDs are unknown
        return None, None
    sop_class, sop_uid = file_meta.get("MediaStorageSOPClassUID"), file_meta.get("MediaStorageSOPInstanceUID")
    if not UID(str(file_meta.get("TransferSyntaxUID", "") or "")).is_deflated:
        try:
            ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            sop_class = ds.get("SOPClassUID") or sop_class
            sop_uid = ds.get("SOPInstanceUID") or sop_uid
        except Exception:  # noqa: BLE001 - an undecodable data set: keep what the File Meta says
            pass
    return (
        str(sop_class) if is_valid_uid(str(sop_class or "")) else None,
        str(sop_uid) if is_valid_uid(str(sop_uid or "")) else None,
    )


def _store_part(ingestor: Ingestor, part: Part, study_uid: str | None, arrival: str | None = None) -> _Result:
    """Parse and store one part (blocking: file fsync and SQL)."""
    media_type = part.media_type
    # A part without Content-Type is taken as application/dicom (lenient);
    # undecodable bytes then fail with CANNOT_UNDERSTAND like any other.
    if media_type is not None and media_type != "application/dicom":
        return _Result(failure=FAILURE_CANNOT_UNDERSTAND_PART)
    meta: InstanceMeta | None = None
    try:
        meta = ingestor.parse(part.data)
        if study_uid is not None and meta.study_uid != study_uid:
            raise IngestError(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "Study Instance UID differs from the study in the request URL",
            )
        outcome = ingestor.ingest(part.data, meta, source="stowrs", calling_aet=None, arrival=arrival)
    except IngestError as exc:
        logger.debug("STOW-RS part refused: 0x%04X %s", int(exc.status), exc.comment)
        if meta is not None:
            return _Result(sop_class_uid=meta.sop_class_uid, sop_uid=meta.sop_uid, failure=int(exc.status))
        sop_class, sop_uid = _known_uids(part.data)
        return _Result(sop_class_uid=sop_class, sop_uid=sop_uid, failure=int(exc.status))
    except Exception:  # noqa: BLE001 - one bad part must not fail the request
        logger.exception("STOW-RS: unexpected error storing a part")
        return _Result(
            sop_class_uid=meta.sop_class_uid if meta else None,
            sop_uid=meta.sop_uid if meta else None,
            failure=int(Status.PROCESSING_FAILURE),
        )
    return _Result(
        sop_class_uid=outcome.sop_class_uid,
        sop_uid=outcome.sop_uid,
        study_uid=meta.study_uid,
        series_uid=meta.series_uid,
        warning=None if outcome.status == Status.SUCCESS else int(outcome.status),
        duplicate=outcome.duplicate,
    )


def _uid_element(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def _response_body(base_url: str, report: _Report) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table I.1-1), DICOM JSON."""
    body: dict[str, Any] = {}
    studies = {r.study_uid for r in report.stored}
    # Retrieve URL is Type 2: empty when the stored instances span several
    # studies (or none was stored).
    if len(studies) == 1:
        body[_RETRIEVE_URL] = {"vr": "UR", "Value": [f"{base_url}/studies/{next(iter(studies))}"]}
    else:
        body[_RETRIEVE_URL] = {"vr": "UR"}
    failed = report.failed
    if failed:
        items: list[dict[str, Any]] = []
        for r in failed:
            item: dict[str, Any] = {}
            if r.sop_class_uid:
                item[_REFERENCED_SOP_CLASS_UID] = _uid_element(r.sop_class_uid)
            if r.sop_uid:
                item[_REFERENCED_SOP_INSTANCE_UID] = _uid_element(r.sop_uid)
            item[_FAILURE_REASON] = {"vr": "US", "Value": [r.failure]}
            items.append(item)
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": items}
    stored = report.stored
    if stored:
        refs: list[dict[str, Any]] = []
        for r in stored:
            assert r.sop_class_uid and r.sop_uid and r.study_uid and r.series_uid
            ref: dict[str, Any] = {
                _REFERENCED_SOP_CLASS_UID: _uid_element(r.sop_class_uid),
                _REFERENCED_SOP_INSTANCE_UID: _uid_element(r.sop_uid),
                _RETRIEVE_URL: {
                    "vr": "UR",
                    "Value": [f"{base_url}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"],
                },
            }
            if r.warning is not None:
                ref[_WARNING_REASON] = {"vr": "US", "Value": [r.warning]}
            refs.append(ref)
        body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": refs}
    return body


def _log(kind: str, status: int, report: _Report, nbytes: int, started: float, note: str = "") -> None:
    """One line per request: counts and codes only, never patient data."""
    failed = report.failed
    codes = ",".join(sorted({f"0x{r.failure:04X}" for r in failed if r.failure is not None}))
    logger.info(
        "STOW-RS %s -> HTTP %d: %d part(s), %d stored (%d duplicate), %d failed%s, %d bytes, %.3f s%s",
        kind,
        status,
        len(report.results),
        len(report.stored),
        sum(1 for r in report.stored if r.duplicate),
        len(failed),
        f" [{codes}]" if codes else "",
        nbytes,
        time.monotonic() - started,
        f" ({note})" if note else "",
    )


async def _store(request: Request, study_uid: str | None) -> Response:
    started = time.monotonic()
    kind = "/studies/{study}" if study_uid is not None else "/studies"
    report = _Report()
    nbytes = 0

    def error(status: int, detail: str) -> JSONResponse:
        _log(kind, status, report, nbytes, started, detail)
        return JSONResponse({"detail": detail}, status_code=status)

    node = request.app.state.node
    limit: int = node.settings.http.max_request_bytes
    checks = node.settings.ingest
    try:
        if study_uid is not None and not is_valid_uid(study_uid):
            raise _RequestError(400, "the Study Instance UID in the request URL is not a valid UID")
        boundary = _check_content_type(request.headers.get("content-type"))
        length = request.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise _RequestError(413, f"request body of {int(length)} bytes exceeds http.max_request_bytes ({limit})")
    except _RequestError as exc:
        return error(exc.status, exc.detail)

    async def counted() -> AsyncGenerator[bytes, None]:
        nonlocal nbytes
        async for chunk in _limited(request.stream(), limit, checks.stow_read_timeout):
            nbytes += len(chunk)
            yield chunk

    ingestor: Ingestor = node.ingestor
    # This request is one arrival (pacs_node.ingest.arrivals): "released" only
    # when the whole body was read; cut, truncated or too large is "aborted".
    arrival, arrival_outcome = ingestor.arrivals.new_key("stowrs"), "aborted"
    body = counted()
    parts = iter_parts(body, boundary)
    try:
        async for part in parts:
            if len(report.results) >= checks.stow_max_parts:
                return error(
                    413,
                    f"request has more than ingest.stow_max_parts ({checks.stow_max_parts}) parts; "
                    f"{len(report.stored)} instance(s) before the limit were stored",
                )
            report.results.append(await run_in_threadpool(_store_part, ingestor, part, study_uid, arrival))
        arrival_outcome = "released"
    except _ReadTimeout:
        return error(
            408,
            f"no request body bytes for ingest.stow_read_timeout ({checks.stow_read_timeout:g} s); "
            f"{len(report.stored)} instance(s) received before were stored",
        )
    except _BodyTooLarge:
        stored = len(report.stored)
        return error(
            413,
            f"request body exceeds http.max_request_bytes ({limit} bytes); "
            f"{stored} instance(s) received before the limit were stored",
        )
    except MultipartError as exc:
        if not report.results:
            return error(400, f"malformed multipart/related body: {exc}")
        # Parts completed before the error were stored durably and are
        # reported; the unreadable remainder is one failed entry.
        logger.warning("STOW-RS: malformed multipart body after %d part(s): %s", len(report.results), exc)
        report.results.append(_Result(failure=FAILURE_CANNOT_UNDERSTAND_PART))
    except ClientDisconnect:
        _log(kind, 499, report, nbytes, started, "client disconnected")
        return Response(status_code=400)
    finally:
        await parts.aclose()
        await body.aclose()
        await ingestor.arrivals.aclose(arrival, arrival_outcome)

    base_url = str(request.base_url).rstrip("/") + PREFIX
    status = report.http_status()
    _log(kind, status, report, nbytes, started)
    return Response(
        content=json.dumps(_response_body(base_url, report)),
        status_code=status,
        media_type=DICOM_JSON,
    )


_REQUEST_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One DICOM Part 10 file per part, each with Content-Type: application/dicom.",
        "content": {
            'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
        },
    }
}
_RESPONSES_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "All instances stored.", "content": {DICOM_JSON: {}}},
    202: {"description": "Some instances stored, others failed or have warnings.", "content": {DICOM_JSON: {}}},
    400: {"description": "Malformed multipart body or invalid Study Instance UID in the URL."},
    409: {"description": "No instance stored; reasons in FailedSOPSequence.", "content": {DICOM_JSON: {}}},
    408: {"description": "The body stalled for longer than ingest.stow_read_timeout."},
    413: {"description": "Request body larger than http.max_request_bytes, or more parts than ingest.stow_max_parts."},
    415: {"description": 'Content-Type is not multipart/related; type="application/dicom".'},
}


@router.post(
    "/studies",
    summary="Store instances (STOW-RS)",
    dependencies=[WriteAuth],  # a token with the write scope (pacs_node.api.auth)
    response_class=Response,
    responses=_RESPONSES_DOC,
    openapi_extra=_REQUEST_BODY_DOC,
)
async def store_instances(request: Request) -> Response:
    """Store the instances of a ``multipart/related`` body (PS3.18 §10.5)."""
    return await _store(request, None)


@router.post(
    "/studies/{study_uid}",
    summary="Store instances of one study (STOW-RS)",
    dependencies=[WriteAuth],
    response_class=Response,
    responses=_RESPONSES_DOC,
    openapi_extra=_REQUEST_BODY_DOC,
)
async def store_study_instances(study_uid: str, request: Request) -> Response:
    """Store instances that all belong to ``study_uid``; others are refused
    with Failure Reason 0xA900 (PS3.18 §10.5)."""
    return await _store(request, study_uid)
