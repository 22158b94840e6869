"""Fetch a job's source series: from the node's storage directory (shared
filesystem, the embedded default) or over WADO-RS from the node (workers on
other hosts with no shared disk)."""

from __future__ import annotations

import logging
import ssl
import tempfile
from pathlib import Path

import httpx
from sqlalchemy import select

from pacs_node.db.models import Instance, Series
from pacs_node.db.session import Database
from pacs_node.ingest.multipart import MultipartError, parse_boundary, parse_content_type, parse_multipart
from pacs_node.ingest.uids import check_uid

__all__ = ["FetchError", "SeriesFiles", "fetch_series_remote", "fetch_series_shared"]

logger = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """The source series could not be fetched (transient when ``transient``)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class SeriesFiles:
    """Paths of a series' instance files; a temporary directory is removed on close."""

    def __init__(self, paths: list[Path], tmpdir: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.paths = paths
        self._tmpdir = tmpdir

    def close(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    def __enter__(self) -> SeriesFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_series_shared(db: Database, storage_root: Path, series_uid: str) -> SeriesFiles:
    """Instance files of a series in the node's storage directory.

    Raises
    ------
    FetchError
        When the series has no instances or a file is missing.
    """
    with db.sessionmaker() as s:
        rel = list(
            s.execute(
                select(Instance.path).join(Series, Series.id == Instance.series_id)
                .where(Series.series_instance_uid == series_uid)
            ).scalars()
        )
    if not rel:
        raise FetchError(f"series {series_uid} has no stored instances", transient=False)
    root = storage_root.resolve()
    paths = [root / p for p in rel]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FetchError(
            f"{len(missing)} instance file(s) missing under {root} (is the storage directory shared?)",
            transient=False,
        )
    return SeriesFiles(paths)


def fetch_series_remote(node_url: str, study_uid: str, series_uid: str, *, token: str = "",
                        timeout: float = 120.0, verify: bool | ssl.SSLContext = True) -> SeriesFiles:
    """Download a series from the node over WADO-RS into a temporary directory.

    Parameters
    ----------
    node_url:
        The node's HTTP(S) address (``[worker] node_url``).
    study_uid, series_uid:
        The series to fetch.
    token:
        The worker's own bearer token (``[worker] node_token``; the read
        scope is enough).
    timeout:
        Seconds per request.
    verify:
        Certificate verification of an https node (``WorkerSettings.node_verify``).

    Returns
    -------
    SeriesFiles
        The instance files.

    Raises
    ------
    FetchError
        Transient for connection errors and 5xx, permanent for 4xx (401/403:
        the token), a certificate that fails verification, or a malformed
        response.
    """
    check_uid(study_uid, "StudyInstanceUID")
    check_uid(series_uid, "SeriesInstanceUID")
    url = f"{node_url.rstrip('/')}/dicomweb/studies/{study_uid}/series/{series_uid}"
    headers = {"Accept": 'multipart/related; type="application/dicom"'}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        r = httpx.get(url, headers=headers, timeout=timeout, verify=verify)
    except httpx.ConnectError as exc:
        if isinstance(exc.__context__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise FetchError(f"WADO-RS {url}: the node's certificate failed verification "
                             "(worker.node_ca_file)", transient=False) from None
        raise FetchError(f"WADO-RS {url} failed: {exc.__class__.__name__}", transient=True) from None
    except httpx.HTTPError as exc:
        raise FetchError(f"WADO-RS {url} failed: {exc.__class__.__name__}", transient=True) from None
    if r.status_code >= 500:
        raise FetchError(f"WADO-RS {url} answered {r.status_code}", transient=True)
    if r.status_code in (401, 403):
        raise FetchError(f"WADO-RS {url} answered {r.status_code}: the node refused worker.node_token "
                         "(it needs a [[http.tokens]] entry with the read scope)", transient=False)
    if r.status_code != 200:
        raise FetchError(f"WADO-RS {url} answered {r.status_code}: {r.text[:200]}", transient=False)
    try:
        _, params = parse_content_type(r.headers.get("content-type", ""))
        parts = parse_multipart(r.content, parse_boundary(params))
    except MultipartError as exc:
        raise FetchError(f"WADO-RS {url}: malformed multipart response ({exc})", transient=False) from None
    tmp = tempfile.TemporaryDirectory(prefix="pacs-node-fetch-")
    paths = []
    for i, part in enumerate(parts):
        p = Path(tmp.name) / f"{i:06d}.dcm"
        p.write_bytes(part.data)
        paths.append(p)
    if not paths:
        tmp.cleanup()
        raise FetchError(f"WADO-RS {url} returned no instances", transient=False)
    logger.info("fetched %d instances over WADO-RS", len(paths))
    return SeriesFiles(paths, tmp)
