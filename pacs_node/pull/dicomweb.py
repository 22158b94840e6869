"""DICOMweb source client: QIDO-RS to find a study and list its instances,
WADO-RS to retrieve it.

* ``GET {url}/studies?StudyInstanceUID=UID&includefield=00201208`` (QIDO-RS,
  PS3.18 §10.6): does the study exist, how many instances;
* ``GET {url}/studies/UID/instances`` (paged with ``limit``/``offset``): its
  SOP Instance UIDs, for the completeness check;
* ``GET {url}/studies/UID`` with ``Accept: multipart/related;
  type="application/dicom"; transfer-syntax=*`` (WADO-RS, PS3.18 §10.4): the
  instances as stored, parsed part by part as the response streams in
  (:class:`~pacs_node.ingest.multipart.MultipartParser`), so memory holds one
  instance at a time. A server that refuses ``transfer-syntax=*`` (406/400) is
  asked again without it (it then sends Explicit VR Little Endian).

Connection failures and timeouts raise :class:`SourceUnavailableError`;
error statuses and malformed answers :class:`SourceError`.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from pacs_node.ingest.multipart import MultipartError, MultipartParser, parse_boundary, parse_content_type
from pacs_node.ingest.uids import check_uid
from pacs_node.pull.base import (
    InstanceSink,
    SourceError,
    SourceListing,
    SourceUnavailableError,
    StudyNotOnSourceError,
)
from pacs_node.pull.settings import SourceSettings

__all__ = ["list_instances", "query_study", "retrieve_study"]

logger = logging.getLogger(__name__)

_JSON = "application/dicom+json"
_MULTIPART_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_MULTIPART = 'multipart/related; type="application/dicom"'
PAGE = 1000


def _client(src: SourceSettings) -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(src.timeout), verify=src.verify_tls, headers=src.http_headers())


def _unavailable(src: SourceSettings, exc: Exception) -> SourceUnavailableError:
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else f"unreachable ({exc.__class__.__name__})"
    return SourceUnavailableError(f"source {src.name} {what}: {src.url}")


def _http_error(src: SourceSettings, what: str, r: httpx.Response) -> SourceError:
    text = r.text[:200].strip() if r.headers.get("content-type", "").startswith(("text/", "application/json")) else ""
    hint = " (check the source's token/headers)" if r.status_code in (401, 403) else ""
    return SourceError(f"source {src.name}: {what} answered HTTP {r.status_code}{hint}" + (f": {text}" if text else ""))


def _json_list(src: SourceSettings, what: str, r: httpx.Response) -> list[dict[str, Any]]:
    if r.status_code == 204 or not r.content.strip():
        return []
    try:
        data = r.json()
    except ValueError:
        raise SourceError(f"source {src.name}: {what} did not answer JSON") from None
    if not isinstance(data, list):
        raise SourceError(f"source {src.name}: {what} did not answer a JSON array")
    return [d for d in data if isinstance(d, dict)]


def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def query_study(src: SourceSettings, study_uid: str) -> SourceListing:
    """QIDO-RS: the study's instance count (``None`` if the source does not say).

    Raises
    ------
    StudyNotOnSourceError, SourceUnavailableError, SourceError
    """
    check_uid(study_uid, "StudyInstanceUID")
    try:
        with _client(src) as c:
            r = c.get(f"{src.url}/studies", params={"StudyInstanceUID": study_uid, "includefield": "00201208"},
                      headers={"Accept": _JSON})
    except httpx.HTTPError as exc:
        raise _unavailable(src, exc) from None
    if r.status_code == 404:
        raise StudyNotOnSourceError(study_uid, src.name)
    if r.status_code not in (200, 204):
        raise _http_error(src, "QIDO-RS", r)
    matches = [m for m in _json_list(src, "QIDO-RS", r) if _value(m, "0020000D") in (None, study_uid)]
    if not matches:
        raise StudyNotOnSourceError(study_uid, src.name)
    count = _value(matches[0], "00201208")
    try:
        return SourceListing(study_uid, int(count) if count is not None else None)
    except (TypeError, ValueError):
        return SourceListing(study_uid, None)


def list_instances(src: SourceSettings, study_uid: str) -> SourceListing:
    """QIDO-RS ``/studies/{uid}/instances``: every SOP Instance UID of the study.

    Raises
    ------
    StudyNotOnSourceError, SourceUnavailableError, SourceError
    """
    check_uid(study_uid, "StudyInstanceUID")
    instances: dict[str, str] = {}
    offset = 0
    try:
        with _client(src) as c:
            while True:
                r = c.get(f"{src.url}/studies/{study_uid}/instances",
                          params={"includefield": "00080016", "limit": PAGE, "offset": offset},
                          headers={"Accept": _JSON})
                if r.status_code == 404:
                    raise StudyNotOnSourceError(study_uid, src.name)
                if r.status_code not in (200, 204):
                    raise _http_error(src, "QIDO-RS instances", r)
                page = _json_list(src, "QIDO-RS instances", r)
                before = len(instances)
                for item in page:
                    sop = _value(item, "00080018")
                    if sop:
                        instances[str(sop)] = str(_value(item, "00080016") or "")
                # A server that ignores limit/offset answers everything at once
                # (or the same page again): stop when nothing new came.
                if len(page) < PAGE or len(instances) == before:
                    break
                offset += len(page)
    except httpx.HTTPError as exc:
        raise _unavailable(src, exc) from None
    if not instances:
        raise StudyNotOnSourceError(study_uid, src.name)
    return SourceListing(study_uid, len(instances), instances)


def retrieve_study(src: SourceSettings, study_uid: str, sink: InstanceSink) -> int:
    """WADO-RS: stream the study's instances into ``sink``; return how many.

    Raises
    ------
    StudyNotOnSourceError, SourceUnavailableError, SourceError
    """
    check_uid(study_uid, "StudyInstanceUID")
    url = f"{src.url}/studies/{study_uid}"
    count = 0
    try:
        with _client(src) as c:
            for accept in (_MULTIPART_ANY, _MULTIPART):
                with c.stream("GET", url, headers={"Accept": accept}) as r:
                    if r.status_code in (400, 406) and accept == _MULTIPART_ANY:
                        logger.info("source %s refused transfer-syntax=*; asking for the default", src.name)
                        continue
                    if r.status_code == 404:
                        raise StudyNotOnSourceError(study_uid, src.name)
                    if r.status_code == 204:
                        raise StudyNotOnSourceError(study_uid, src.name)
                    if r.status_code != 200:
                        r.read()
                        raise _http_error(src, "WADO-RS", r)
                    try:
                        media, params = parse_content_type(r.headers.get("content-type", ""))
                        if media != "multipart/related":
                            raise MultipartError(f"content type {media or '(none)'}, not multipart/related")
                        parser = MultipartParser(parse_boundary(params))
                        for chunk in r.iter_bytes():
                            for part in parser.feed(chunk):
                                count += 1
                                sink(part.data)
                        parser.close()
                    except MultipartError as exc:
                        raise SourceError(f"source {src.name}: malformed WADO-RS response ({exc})") from None
                break
    except httpx.HTTPError as exc:
        raise _unavailable(src, exc) from None
    if count == 0:
        raise StudyNotOnSourceError(study_uid, src.name)
    return count
