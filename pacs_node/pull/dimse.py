"""DIMSE source client (pynetdicom SCU): C-FIND to find a study and list its
instances, C-GET or C-MOVE to retrieve it.

* C-FIND, Study Root, STUDY level, with NumberOfStudyRelatedInstances: does
  the study exist, how many instances;
* C-FIND SERIES level, then IMAGE level per series (hierarchical queries,
  which every archive supports): SOP Instance and SOP Class UIDs, for the
  completeness check and to choose the C-GET storage contexts;
* C-GET (Study Root, STUDY level): the archive sends the instances back over
  the same association, so the node proposes a storage presentation context
  for each SOP class with the SCP role (SCP/SCU Role Selection, PS3.7 D.3.3.4).
  An association carries at most 128 presentation contexts: with the SOP
  classes known from the IMAGE-level C-FIND, one context per SOP class and
  transfer syntax (the archive can then send every instance as stored); when
  the archive does not tell the SOP classes, the 120 common storage classes
  with one context each (uncompressed and the usual compressed syntaxes);
* C-MOVE (Study Root, STUDY level) to ``move_destination`` (default the
  node's own ``[dicom] ae_title``): the archive opens its own association to
  the node's C-STORE SCP, which must be running and known to the archive
  (Orthanc: ``DicomModalities``). Instances arrive as ordinary DIMSE
  receptions (``instances.source = 'dimse'``).

Connection failures, timeouts and aborts raise :class:`SourceUnavailableError`;
a refused association or a failure status :class:`SourceError`.

With ``tls = true`` every association runs over DICOM TLS
(:func:`pacs_node.dicom_tls.peer_tls_args`). When it cannot be opened the
handshake is tried once more on its own to say why: a certificate that does
not verify or a handshake the archive refuses raises :class:`SourceError`
(the configuration must change), a port that does not answer
:class:`SourceUnavailableError`. C-MOVE sends the instances over the
archive's own association to the node's SCP, TLS or not as the archive is
configured for the node (``[dicom] tls_port``).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_node.dicom_tls import TLSConfigError, diagnose_tls, peer_tls_args
from pacs_node.ingest.recorder import Status
from pacs_node.ingest.uids import check_uid
from pacs_node.pull.base import (
    InstanceSink,
    SourceError,
    SourceListing,
    SourceUnavailableError,
    StudyNotOnSourceError,
)
from pacs_node.pull.settings import SourceSettings

__all__ = ["RetrieveOutcome", "get_study", "list_instances", "move_study", "query_study", "storage_contexts"]

logger = logging.getLogger(__name__)

#: pynetdicom (and PS3.8) limit: 128 presentation contexts per association.
MAX_CONTEXTS = 128
_UNCOMPRESSED = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
_COMPRESSED = [str(uid) for uid in (
    JPEGLosslessSV1, JPEGLossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
)]
_PENDING = (0xFF00, 0xFF01)


@dataclass(frozen=True)
class RetrieveOutcome:
    """Final C-GET / C-MOVE response: status and sub-operation counts."""

    status: int
    completed: int
    failed: int
    warning: int
    error_comment: str = ""


def _where(src: SourceSettings) -> str:
    return f"{src.ae_title}@{src.host}:{src.port}"


def _make_ae(src: SourceSettings) -> AE:
    ae = AE(ae_title=src.calling_ae_title or "PACSNODE")
    ae.connection_timeout = src.timeout
    ae.acse_timeout = src.timeout
    ae.dimse_timeout = src.timeout
    ae.network_timeout = src.timeout
    return ae


@contextmanager
def _association(src: SourceSettings, ae: AE, *, ext_neg: list[Any] | None = None,
                 handlers: list[Any] | None = None) -> Iterator[Any]:
    """An established association to the source (released on exit)."""
    seen: dict[str, Any] = {}

    def on_acse(event: Any) -> None:
        prim = event.primitive
        if getattr(prim, "result", None) is not None:
            seen["rsp"] = prim

    def on_open(event: Any) -> None:
        seen["connected"] = True

    try:
        tls_args = peer_tls_args(src, src.host)
    except TLSConfigError as exc:
        raise SourceError(f"source {src.name}: {exc}") from None
    assoc = ae.associate(src.host, src.port, ae_title=src.ae_title, max_pdu=src.max_pdu_size,
                         ext_neg=ext_neg or None, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), (evt.EVT_CONN_OPEN, on_open),
                                       *(handlers or [])])
    if not assoc.is_established:
        if tls_args is not None and seen.get("rsp") is None:
            why = diagnose_tls(src.host, src.port, tls_args, src.timeout)
            if isinstance(why, ssl.SSLError):
                raise SourceError(f"source {src.name}: TLS handshake with {_where(src)} failed: {why}")
            if why is not None and not seen.get("connected"):
                raise SourceUnavailableError(f"source {src.name} unreachable over TLS: no association with "
                                             f"{_where(src)} ({why})")
        rsp = seen.get("rsp")
        if assoc.is_rejected and rsp is not None:
            raise SourceError(f"source {src.name}: association rejected by {_where(src)}: "
                              f"{rsp.result_str}, {rsp.source_str}, {rsp.reason_str} "
                              f"(is the node's AE {ae.ae_title!r} declared on the source?)")
        raise SourceUnavailableError(f"source {src.name} unreachable: no association with {_where(src)}")
    try:
        try:
            sock: Any = assoc.dul.socket.socket  # type: ignore[union-attr]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):  # pragma: no cover - socket already gone
            pass
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _accepted(assoc: Any, sop_class: str, src: SourceSettings, what: str) -> None:
    if not any(str(cx.abstract_syntax) == sop_class for cx in assoc.accepted_contexts):
        raise SourceError(f"source {src.name} does not support {what} (presentation context rejected)")


def _find(assoc: Any, src: SourceSettings, identifier: Dataset) -> list[Dataset]:
    matches: list[Dataset] = []
    for status, ident in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if not status or "Status" not in status:
            raise SourceUnavailableError(f"source {src.name}: no C-FIND response (connection lost or timed out)")
        code = int(status.Status)
        if code in _PENDING:
            if ident is not None:
                matches.append(ident)
        elif code == 0x0000:
            break
        else:
            comment = str(status.get("ErrorComment", "") or "")
            raise SourceError(f"source {src.name}: C-FIND failed with status 0x{code:04X}"
                              + (f" ({comment})" if comment else ""))
    return matches


def _study_identifier(study_uid: str, level: str = "STUDY") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = study_uid
    return ds


def query_study(src: SourceSettings, study_uid: str) -> SourceListing:
    """C-FIND STUDY level: the study's instance count (``None`` if not told).

    Raises
    ------
    StudyNotOnSourceError, SourceUnavailableError, SourceError
    """
    check_uid(study_uid, "StudyInstanceUID")
    ae = _make_ae(src)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ident = _study_identifier(study_uid)
    ident.NumberOfStudyRelatedInstances = ""
    with _association(src, ae) as assoc:
        _accepted(assoc, str(StudyRootQueryRetrieveInformationModelFind), src, "Study Root C-FIND")
        matches = [m for m in _find(assoc, src, ident) if str(m.get("StudyInstanceUID", study_uid)) == study_uid]
    if not matches:
        raise StudyNotOnSourceError(study_uid, src.name)
    value = matches[0].get("NumberOfStudyRelatedInstances")
    try:
        count = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        count = None
    return SourceListing(study_uid, count)


def list_instances(src: SourceSettings, study_uid: str) -> SourceListing:
    """C-FIND SERIES then IMAGE level: SOP Instance UID -> SOP Class UID
    (empty string when the archive does not return the class).

    Raises
    ------
    StudyNotOnSourceError, SourceUnavailableError, SourceError
    """
    check_uid(study_uid, "StudyInstanceUID")
    ae = _make_ae(src)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    instances: dict[str, str] = {}
    with _association(src, ae) as assoc:
        _accepted(assoc, str(StudyRootQueryRetrieveInformationModelFind), src, "Study Root C-FIND")
        q = _study_identifier(study_uid, "SERIES")
        q.SeriesInstanceUID = ""
        series = [str(m.SeriesInstanceUID) for m in _find(assoc, src, q) if m.get("SeriesInstanceUID")]
        for series_uid in series:
            qi = _study_identifier(study_uid, "IMAGE")
            qi.SeriesInstanceUID = series_uid
            qi.SOPInstanceUID = ""
            qi.SOPClassUID = ""
            for m in _find(assoc, src, qi):
                sop = str(m.get("SOPInstanceUID", "") or "")
                if sop:
                    instances[sop] = str(m.get("SOPClassUID", "") or "")
    if not instances:
        raise StudyNotOnSourceError(study_uid, src.name)
    return SourceListing(study_uid, len(instances), instances)


def storage_contexts(sop_classes: set[str] | None) -> list[tuple[str, list[str]]]:
    """Storage presentation contexts (abstract syntax, transfer syntaxes) for
    a C-GET, at most ``MAX_CONTEXTS - 1`` of them (one is the C-GET's own)."""
    room = MAX_CONTEXTS - 1
    classes = sorted(c for c in (sop_classes or set()) if c)
    if classes and len(classes) <= room:
        syntaxes = _UNCOMPRESSED + _COMPRESSED
        per_class = max(1, room // len(classes))
        if per_class >= 2:
            # One context per transfer syntax: the archive sends each instance as stored.
            return [(c, [ts]) for c in classes for ts in syntaxes[:per_class]]
        return [(c, syntaxes) for c in classes]
    fallback = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
    extra = [c for c in classes if c not in fallback]
    ordered = (extra + fallback)[:room]
    return [(c, _UNCOMPRESSED + _COMPRESSED) for c in ordered]


def _final(status: Dataset | None, src: SourceSettings, op: str) -> RetrieveOutcome:
    if status is None or "Status" not in status:
        raise SourceUnavailableError(f"source {src.name}: no {op} response (connection lost or timed out)")

    def n(keyword: str) -> int:
        try:
            return int(status.get(keyword, 0) or 0)
        except (TypeError, ValueError):
            return 0

    return RetrieveOutcome(int(status.Status), n("NumberOfCompletedSuboperations"),
                           n("NumberOfFailedSuboperations"), n("NumberOfWarningSuboperations"),
                           str(status.get("ErrorComment", "") or ""))


def _retrieve(assoc: Any, responses: Iterator[tuple[Dataset, Dataset | None]], src: SourceSettings,
              op: str) -> RetrieveOutcome:
    last: Dataset | None = None
    for status, _ident in responses:
        if not status or "Status" not in status:
            raise SourceUnavailableError(f"source {src.name}: no {op} response (connection lost or timed out)")
        last = status
        if int(status.Status) not in _PENDING:
            break
    return _final(last, src, op)


def get_study(src: SourceSettings, study_uid: str, sink: InstanceSink,
              sop_classes: set[str] | None = None) -> RetrieveOutcome:
    """C-GET the study; every received instance goes to ``sink``.

    Raises
    ------
    SourceUnavailableError, SourceError
    """
    check_uid(study_uid, "StudyInstanceUID")
    ae = _make_ae(src)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles: list[Any] = []
    for sop_class, syntaxes in storage_contexts(sop_classes):
        ae.add_requested_context(sop_class, syntaxes)
        if not any(str(r.sop_class_uid) == sop_class for r in roles):
            roles.append(build_role(sop_class, scp_role=True))

    def on_store(event: Any) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001 - answer the archive with a status
            logger.exception("C-GET: cannot encode a received instance")
            return int(Status.CANNOT_UNDERSTAND)
        return sink(data)

    with _association(src, ae, ext_neg=roles, handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        _accepted(assoc, str(StudyRootQueryRetrieveInformationModelGet), src, "Study Root C-GET")
        responses = assoc.send_c_get(_study_identifier(study_uid), StudyRootQueryRetrieveInformationModelGet)
        return _retrieve(assoc, responses, src, "C-GET")


def move_study(src: SourceSettings, study_uid: str, destination: str) -> RetrieveOutcome:
    """C-MOVE the study to ``destination`` (an AE title the source knows).

    Raises
    ------
    SourceUnavailableError, SourceError
    """
    check_uid(study_uid, "StudyInstanceUID")
    ae = _make_ae(src)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    with _association(src, ae) as assoc:
        _accepted(assoc, str(StudyRootQueryRetrieveInformationModelMove), src, "Study Root C-MOVE")
        responses = assoc.send_c_move(_study_identifier(study_uid), destination,
                                      StudyRootQueryRetrieveInformationModelMove)
        return _retrieve(assoc, responses, src, "C-MOVE")
