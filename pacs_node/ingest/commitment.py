"""Storage Commitment Push Model (PS3.4 Annex J): the reports, recorded in SQL.

After a delivery the worker asks the destination, by N-ACTION, to commit the
instances it sent (``worker.deliver.commitment``), after writing one
``storage_commitments`` row (with its Transaction UID) and one
``storage_commitment_items`` row per instance. The destination answers with an
N-EVENT-REPORT, on the N-ACTION's association or on one it opens to the node's
SCP (Orthanc always does the latter, to the modality its ``DicomModalities``
declares for the calling AE title). Both paths call :func:`record_report`,
so SQL is the one place the result lives: the worker waits for the row to
change, whichever host received the report.

The node's side (:func:`add_commitment_context`, :func:`commitment_handlers`,
wired into :class:`~pacs_node.ingest.dimse.DimseServer`):

* the Storage Commitment Push Model context is accepted with the SCU role
  for the node: the archive proposes the SCP role for itself (SCP/SCU Role
  Selection, PS3.4 J.3.3 / PS3.7 D.3.3.4) and sends N-EVENT-REPORT;
* an N-EVENT-REPORT is matched by Transaction UID (a random ``2.25.`` UID the
  worker made, which is what authenticates a report: AE titles can be
  spoofed) and must come from the AE title that was asked;
* every malformed or unexpected report gets a specific failure status with
  an Error Comment and a log line without patient data (UIDs are shown by
  their last characters only);
* the node is not a Storage Commitment SCP: an N-ACTION sent to it is
  answered 0x0211 (unrecognised operation).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import select

from pacs_node.db.models import StorageCommitment, StorageCommitmentItem, utcnow
from pacs_node.db.session import Database

__all__ = [
    "FAILURE_REASONS",
    "STORAGE_COMMITMENT_PUSH_MODEL",
    "STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE",
    "CommitmentReportError",
    "ParsedReport",
    "ReportOutcome",
    "add_commitment_context",
    "commitment_handlers",
    "handle_n_action",
    "handle_n_event_report",
    "parse_report",
    "record_report",
    "short_uid",
]

logger = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance.
STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"

#: Failure Reason (0008,1197) values, PS3.3 C.14.1.1.
FAILURE_REASONS: dict[int, str] = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP Class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}

# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8).
_SUCCESS = 0x0000
_PROCESSING_FAILURE = 0x0110
_NO_SUCH_INSTANCE = 0x0112
_NO_SUCH_EVENT_TYPE = 0x0113
_INVALID_ARGUMENT = 0x0115
_NO_SUCH_SOP_CLASS = 0x0118
_UNRECOGNISED_OPERATION = 0x0211


def short_uid(uid: str) -> str:
    """The last 8 characters of a UID, for log lines (never a whole UID)."""
    return "..." + uid[-8:]


class CommitmentReportError(Exception):
    """A report that cannot be recorded; ``status`` is the N-EVENT-REPORT answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass
class ParsedReport:
    """The Event Information of one N-EVENT-REPORT."""

    transaction_uid: str
    event_type: int
    committed: list[tuple[str, str]] = field(default_factory=list)  # (class, instance)
    failed: list[tuple[str, str, int | None]] = field(default_factory=list)  # (class, instance, reason)


@dataclass
class ReportOutcome:
    """What :func:`record_report` wrote."""

    commitment_id: int
    job_id: int
    destination: str
    state: str
    committed: int
    failed: int
    missing: int
    unknown: int


def _uid(value: Any, what: str) -> str:
    text = str(value or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not all(c.isdigit() or c == "." for c in text):
        raise CommitmentReportError(_INVALID_ARGUMENT, f"invalid {what}")
    return text


def _sequence(info: Dataset, keyword: str) -> list[Dataset]:
    if keyword not in info:
        return []
    value = info[keyword].value
    if value is None:
        return []
    try:
        return list(value)
    except TypeError:
        raise CommitmentReportError(_INVALID_ARGUMENT, f"{keyword} is not a sequence") from None


def parse_report(event_type: int | None, info: Dataset) -> ParsedReport:
    """Read the Event Information of a Storage Commitment N-EVENT-REPORT.

    Parameters
    ----------
    event_type:
        The request's Event Type ID: 1 (all committed) or 2 (failures exist).
    info:
        The decoded Event Information (pydicom decodes lazily, so any element
        access may raise; every such error becomes a
        :class:`CommitmentReportError`).

    Returns
    -------
    ParsedReport
        Transaction UID, committed and failed instances.

    Raises
    ------
    CommitmentReportError
        0x0113 for another event type, 0x0115 for a missing or invalid
        Transaction UID, sequence or item.
    """
    if event_type not in (1, 2):
        raise CommitmentReportError(_NO_SUCH_EVENT_TYPE, f"event type {event_type} is not 1 or 2")
    try:
        if "TransactionUID" not in info:
            raise CommitmentReportError(_INVALID_ARGUMENT, "no Transaction UID")
        report = ParsedReport(_uid(info.TransactionUID, "Transaction UID"), int(event_type))
        for item in _sequence(info, "ReferencedSOPSequence"):
            report.committed.append((
                _uid(item.get("ReferencedSOPClassUID"), "Referenced SOP Class UID"),
                _uid(item.get("ReferencedSOPInstanceUID"), "Referenced SOP Instance UID"),
            ))
        for item in _sequence(info, "FailedSOPSequence"):
            reason = item.get("FailureReason")
            report.failed.append((
                _uid(item.get("ReferencedSOPClassUID"), "Referenced SOP Class UID"),
                _uid(item.get("ReferencedSOPInstanceUID"), "Referenced SOP Instance UID"),
                None if reason is None else int(reason),
            ))
    except CommitmentReportError:
        raise
    except Exception as exc:  # noqa: BLE001 - lazily decoded data: any parse error is the peer's
        raise CommitmentReportError(_INVALID_ARGUMENT, f"undecodable event information ({type(exc).__name__})") from None
    if event_type == 2 and not report.failed:
        logger.info("storage commitment report %s: event type 2 without failed instances",
                    short_uid(report.transaction_uid))
    return report


def record_report(db: Database, report: ParsedReport, *, calling_ae: str, association: str) -> ReportOutcome:
    """Write a report onto its ``storage_commitments`` row and items, in one transaction.

    Instances of the request that the report lists neither as committed nor
    as failed are recorded failed (no Failure Reason) and counted in
    ``missing``; instances the request did not contain are ignored (counted in
    ``unknown``). A repeated or late report (after a ``timeout``) is applied
    again: the row always shows the latest report.

    Parameters
    ----------
    db:
        The node database.
    report:
        From :func:`parse_report`.
    calling_ae:
        AE title of the association the report came on (the archive's own on
        a separate association, the destination's on the N-ACTION's).
    association:
        ``same`` or ``separate``.

    Returns
    -------
    ReportOutcome
        The row's new state and counts.

    Raises
    ------
    CommitmentReportError
        0x0115 for an unknown Transaction UID or a report from another AE
        title than the one asked.
    """
    with db.session() as s:
        q = select(StorageCommitment).where(StorageCommitment.transaction_uid == report.transaction_uid)
        if not db.is_sqlite:
            q = q.with_for_update()
        row = s.execute(q).scalar_one_or_none()
        if row is None:
            raise CommitmentReportError(_INVALID_ARGUMENT, "unknown Transaction UID")
        if calling_ae.strip() != row.remote_ae.strip():
            raise CommitmentReportError(_INVALID_ARGUMENT, "report not from the AE title that was asked")
        items = {i.sop_instance_uid: i for i in row.items}
        seen: set[str] = set()
        unknown = 0
        for sop_class, uid in report.committed:
            item = items.get(uid)
            if item is None:
                unknown += 1
                continue
            seen.add(uid)
            if item.sop_class_uid != sop_class:
                item.status, item.failure_reason = "failed", 0x0119
            else:
                item.status, item.failure_reason = "committed", None
        for sop_class, uid, reason in report.failed:
            item = items.get(uid)
            if item is None:
                unknown += 1
                continue
            seen.add(uid)
            item.status, item.failure_reason = "failed", reason
        missing = [i for uid, i in items.items() if uid not in seen]
        for item in missing:
            item.status, item.failure_reason = "failed", None
        committed = sum(1 for i in items.values() if i.status == "committed")
        failed = len(items) - committed
        row.state = "committed" if failed == 0 else "failed"
        row.event_type = report.event_type
        row.report_association = association
        row.reported_at = utcnow()
        notes = []
        if missing:
            notes.append(f"{len(missing)} instance(s) missing from the report")
        if unknown:
            notes.append(f"{unknown} instance(s) in the report were not asked for")
        if failed:
            shown = "; ".join(
                f"{short_uid(i.sop_instance_uid)}: {_reason_text(i.failure_reason)}"
                for i in items.values() if i.status == "failed"
            )
            notes.insert(0, f"{failed} of {len(items)} instance(s) not committed ({shown[:400]})")
        row.error = "; ".join(notes) or None
        outcome = ReportOutcome(row.id, row.job_id, row.destination, row.state, committed, failed,
                                len(missing), unknown)
    logger.info(
        "storage commitment %s for job %d -> %s: %s (%d committed, %d failed, %d missing, %d unknown; %s association)",
        short_uid(report.transaction_uid), outcome.job_id, outcome.destination, outcome.state,
        outcome.committed, outcome.failed, outcome.missing, outcome.unknown, association,
    )
    return outcome


def _reason_text(reason: int | None) -> str:
    if reason is None:
        return "not in the report"
    return f"{reason:#06x} {FAILURE_REASONS.get(reason, 'unknown failure reason')}"


def _status(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _peer(event: evt.Event) -> str:
    req = event.assoc.requestor
    return f"{req.ae_title}@{req.address}:{req.port}"


def handle_n_event_report(event: evt.Event, db: Database, association: str = "separate") -> tuple[Dataset, None]:
    """``EVT_N_EVENT_REPORT``: record a Storage Commitment report.

    Parameters
    ----------
    event:
        The pynetdicom event (the requestor is the archive on a separate
        association; on the N-ACTION's own association the worker passes
        ``association="same"`` and the acceptor is the archive).
    db:
        The node database.
    association:
        ``separate`` or ``same`` (recorded on the row).

    Returns
    -------
    tuple
        The response status (0x0000, or a failure with an Error Comment) and
        no Event Reply.
    """
    req = event.request
    peer = event.assoc.acceptor if association == "same" else event.assoc.requestor
    calling = str(peer.ae_title).strip()
    where = f"{calling}@{peer.address}:{peer.port}"
    try:
        if str(getattr(req, "AffectedSOPClassUID", "")) != STORAGE_COMMITMENT_PUSH_MODEL:
            raise CommitmentReportError(_NO_SUCH_SOP_CLASS, "not a Storage Commitment Push Model report")
        if str(getattr(req, "AffectedSOPInstanceUID", "")) != STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE:
            raise CommitmentReportError(_NO_SUCH_INSTANCE, "not the well-known SOP Instance 1.2.840.10008.1.20.1.1")
        try:
            info = event.event_information
        except Exception as exc:  # noqa: BLE001 - the peer's bytes
            raise CommitmentReportError(_INVALID_ARGUMENT, f"undecodable event information ({type(exc).__name__})") from None
        report = parse_report(getattr(req, "EventTypeID", None), info)
        record_report(db, report, calling_ae=calling, association=association)
    except CommitmentReportError as exc:
        logger.warning("storage commitment report from %s refused: 0x%04X %s", where, exc.status, exc.comment)
        return _status(exc.status, exc.comment), None
    except Exception:  # noqa: BLE001 - the SCP must answer, never crash
        logger.exception("storage commitment report from %s failed unexpectedly", where)
        return _status(_PROCESSING_FAILURE, "unexpected processing failure"), None
    return _status(_SUCCESS), None


def handle_n_action(event: evt.Event) -> tuple[Dataset, None]:
    """``EVT_N_ACTION``: the node is not a Storage Commitment SCP; answer 0x0211."""
    logger.warning("N-ACTION from %s refused: this node does not provide the Storage Commitment SCP role",
                   _peer(event))
    return _status(_UNRECOGNISED_OPERATION, "storage commitment SCP role not provided"), None


def add_commitment_context(ae: AE) -> None:
    """Accept the Storage Commitment Push Model context for reports.

    With ``scu_role=False, scp_role=True`` (pynetdicom's acceptor-side role
    flags): an archive that proposes the SCP role for itself (as the standard
    asks for the report's association) gets it, so the node is the SCU and
    receives N-EVENT-REPORT; a peer that proposes only the SCU role for itself
    is rejected; one that sends no role item gets the default roles, and its
    N-ACTION is answered by :func:`handle_n_action`.
    """
    ae.add_supported_context(
        STORAGE_COMMITMENT_PUSH_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        scu_role=False, scp_role=True,
    )


def commitment_handlers(db: Database) -> Iterable[tuple[Any, ...]]:
    """The event handlers the node's SCP binds for Storage Commitment."""
    return [
        (evt.EVT_N_EVENT_REPORT, handle_n_event_report, [db]),
        (evt.EVT_N_ACTION, handle_n_action),
    ]
