"""Storage Commitment Push Model SCU (PS3.4 Annex J): after a delivery, ask
the destination to commit what it stored, and wait for its answer.

One request (:func:`request_commitment`):

1. a ``storage_commitments`` row (state ``pending``, a new random ``2.25.``
   Transaction UID) and one ``storage_commitment_items`` row per instance are
   committed *before* the N-ACTION, so a report that arrives at once, on any
   host, finds them;
2. an association (over DICOM TLS when the destination has ``tls = true``,
   like its C-STOREs) proposing the Storage Commitment Push Model (and
   Verification, so that a destination without Storage Commitment still
   accepts the association and is recorded ``not_supported`` after a clean
   release instead of an abort) carries the N-ACTION (Action Type 1,
   Transaction UID, Referenced SOP Sequence);
3. the report (N-EVENT-REPORT, event type 1 or 2) is recorded in SQL by
   :func:`pacs_node.ingest.commitment.record_report`, either by this
   association's handler (a destination that reports on the same
   association) or by the node's SCP (one that opens its own association, as
   Orthanc does); this side watches the row. The association is held open for
   at most ``min(commitment_timeout, timeout / 2)`` (pynetdicom's own idle
   timeout is ``timeout``), then released; the row is watched until
   ``commitment_timeout``, after which it becomes ``timeout`` (a late report
   still updates it).

:func:`commit_delivery` repeats requests under the destination's
``max_attempts`` / backoff rules: instances reported failed are delivered
again (C-STORE) before being asked about again, unreported ones are asked
about again. A destination that rejects the SOP Class is ``not_supported``:
fine with ``storage_commitment = "auto"``, a failure with ``true``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select, update

from pacs_node.db.models import StorageCommitment, StorageCommitmentItem
from pacs_node.db.session import Database
from pacs_node.dicom_tls import TLSConfigError, diagnose_tls, peer_tls_args
from pacs_node.ingest.commitment import (
    FAILURE_REASONS,
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    handle_n_event_report,
    short_uid,
)

from .base import DeliveryItem, dimse_status_is_transient
from .settings import DestinationSettings

__all__ = ["CommitmentOutcome", "CommitmentRound", "commit_delivery", "request_commitment"]

log = logging.getLogger(__name__)

#: Seconds between looks at the commitment row while waiting for the report.
POLL_SECONDS = 0.1

#: N-ACTION statuses worth asking again for: processing failure, resource limitation.
_TRANSIENT_ACTION_STATUSES = {0x0110, 0x0213}


@dataclass
class CommitmentRound:
    """Outcome of one request (one Transaction UID)."""

    commitment_id: int
    transaction_uid: str
    state: str
    committed: set[str] = field(default_factory=set)
    failed: dict[str, int | None] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    error: str | None = None
    transient: bool = False


@dataclass
class CommitmentOutcome:
    """Outcome of :func:`commit_delivery` for one destination."""

    ok: bool
    state: str
    attempts: int
    committed: int = 0
    error: str | None = None


def _new_request(db: Database, job_id: int, dest: DestinationSettings, items: Sequence[DeliveryItem],
                 attempt: int) -> tuple[int, str]:
    uid = str(generate_uid(prefix=None))  # 2.25.<random 128 bits>
    with db.session() as s:
        row = StorageCommitment(job_id=job_id, destination=dest.name, remote_ae=dest.ae_title,
                                transaction_uid=uid, attempt=attempt, state="pending")
        row.items = [StorageCommitmentItem(sop_class_uid=i.sop_class_uid, sop_instance_uid=i.sop_instance_uid,
                                           status="pending") for i in items]
        s.add(row)
        s.flush()
        return row.id, uid


def _set_state(db: Database, commitment_id: int, state: str, *, error: str | None = None,
               status_code: int | None = None, only_if_pending: bool = False) -> bool:
    with db.session() as s:
        q = update(StorageCommitment).where(StorageCommitment.id == commitment_id)
        if only_if_pending:
            q = q.where(StorageCommitment.state == "pending")
        values: dict[str, Any] = {"state": state, "error": error}
        if status_code is not None:
            values["status_code"] = status_code
        return bool(s.execute(q.values(**values)).rowcount)  # type: ignore[attr-defined]


def _state(db: Database, commitment_id: int) -> str:
    with db.session() as s:
        return str(s.execute(select(StorageCommitment.state).where(StorageCommitment.id == commitment_id)).scalar_one())


def _round(db: Database, commitment_id: int, uid: str, transient: bool = False) -> CommitmentRound:
    with db.session() as s:
        row = s.get(StorageCommitment, commitment_id)
        assert row is not None
        out = CommitmentRound(commitment_id, uid, row.state, error=row.error, transient=transient)
        for item in row.items:
            if item.status == "committed":
                out.committed.add(item.sop_instance_uid)
            elif item.status == "failed":
                out.failed[item.sop_instance_uid] = item.failure_reason
            else:
                out.pending.add(item.sop_instance_uid)
        return out


def _action_information(uid: str, items: Sequence[DeliveryItem]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = uid
    refs = []
    for item in items:
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.sop_class_uid
        ref.ReferencedSOPInstanceUID = item.sop_instance_uid
        refs.append(ref)
    ds.ReferencedSOPSequence = refs
    return ds


def request_commitment(db: Database, job_id: int, dest: DestinationSettings, items: Sequence[DeliveryItem],
                       attempt: int, *, clock: Callable[[], float] = time.monotonic) -> CommitmentRound:
    """Ask ``dest`` to commit ``items`` and wait for the report (one Transaction UID).

    Parameters
    ----------
    db:
        The node database (the row is written before the N-ACTION is sent).
    job_id:
        The job whose outputs were delivered.
    dest:
        A DIMSE destination.
    items:
        The instances the destination stored.
    attempt:
        The row's ``attempt`` (continuing earlier requests of this job to this
        destination).
    clock:
        Monotonic seconds (the wait for the report).

    Returns
    -------
    CommitmentRound
        ``committed`` / ``failed`` (event report received), ``timeout``,
        ``not_supported`` or ``error``; which instances are committed,
        failed (with Failure Reason) or still pending. Never raises for
        network or peer failures.
    """
    commitment_id, uid = _new_request(db, job_id, dest, items, attempt)
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    ae = AE(ae_title=dest.calling_ae_title or "PACSNODE")
    for attr in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attr, dest.timeout)
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, syntaxes)
    ae.add_requested_context(Verification, syntaxes)
    seen: dict[str, Any] = {}

    def on_acse(event: Any) -> None:
        if getattr(event.primitive, "result", None) is not None:
            seen["assoc_rsp"] = event.primitive

    def fail(state: str, error: str, *, code: int | None = None, transient: bool = False) -> CommitmentRound:
        # Only a row still pending: a report that came on the archive's own
        # association (the N-ACTION response lost on the way) is kept.
        if _set_state(db, commitment_id, state, error=error, status_code=code, only_if_pending=True):
            log.info("job %d -> %s storage commitment %s: %s: %s", job_id, dest.name, short_uid(uid), state, error)
            return _round(db, commitment_id, uid, transient)
        return _round(db, commitment_id, uid)

    try:
        tls_args = peer_tls_args(dest, dest.host)  # DICOM TLS as for the C-STOREs (tls* keys)
    except TLSConfigError as exc:
        return fail("error", f"destination {dest.name}: {exc}")
    started = clock()
    try:
        assoc = ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, max_pdu=dest.max_pdu_size, tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: seen.__setitem__("connected", True)),
                          (evt.EVT_ACSE_RECV, on_acse),
                          (evt.EVT_N_EVENT_REPORT, handle_n_event_report, [db, "same"])],
        )
    except (OSError, ValueError, RuntimeError) as exc:
        return fail("error", f"cannot open an association with {where}: {exc}", transient=True)
    if not assoc.is_established:
        rsp = seen.get("assoc_rsp")
        if assoc.is_rejected and rsp is not None:
            return fail("error", f"association rejected by {where}: {rsp.result_str}, {rsp.reason_str}",
                        transient=int(rsp.result) == 0x02)
        if tls_args is not None and not seen.get("connected"):
            tls_error = diagnose_tls(dest.host, dest.port, tls_args, dest.timeout)
            if isinstance(tls_error, ssl.SSLError):  # certificates: retrying does not change them
                return fail("error", f"TLS handshake with {where} failed: {tls_error}")
        if not seen.get("connected"):
            return fail("error", f"cannot connect to {where} (refused or unreachable)", transient=True)
        return fail("error", f"association with {where} aborted or timed out", transient=True)
    try:
        try:
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        except (AttributeError, OSError):  # pragma: no cover - socket already gone
            pass
        if STORAGE_COMMITMENT_PUSH_MODEL not in {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}:
            return fail("not_supported", f"{where} does not support the Storage Commitment Push Model "
                        "(presentation context rejected)", code=0x0122)
        try:
            status, _ = assoc.send_n_action(_action_information(uid, items), 1, STORAGE_COMMITMENT_PUSH_MODEL,
                                            STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        except (ValueError, RuntimeError, OSError) as exc:
            return fail("error", f"N-ACTION not sent: {exc}", transient=True)
        code = status.get("Status") if status is not None else None
        if code is None and (assoc.acse.is_aborted("a-abort") or assoc.acse.is_aborted("a-p-abort")):
            # The peer aborted (Orthanc does so to a calling AE title missing from
            # its DicomModalities). pynetdicom's reactor has not processed the
            # A-ABORT yet (is_established is still True, measured): let it end the
            # association, or the release below would wait acse_timeout for nothing.
            assoc.join(timeout=dest.timeout)
            return fail("error", f"{where} aborted the association instead of answering the N-ACTION (does it "
                        f"know the calling AE title {ae.ae_title}?)", transient=True)
        if code is None:
            return fail("error", "no N-ACTION response (connection lost or timed out)", transient=True)
        code = int(code)
        if code != 0x0000 and (code & 0xF000) != 0xB000:
            comment = str(status.get("ErrorComment", "") or "")
            text = f"N-ACTION status {code:#06x}" + (f" ({comment[:64]})" if comment else "")
            return fail("error", text, code=code,
                        transient=code in _TRANSIENT_ACTION_STATUSES or dimse_status_is_transient(code))
        with db.session() as s:
            s.execute(update(StorageCommitment).where(StorageCommitment.id == commitment_id).values(status_code=code))
        log.info("job %d -> %s: storage commitment of %d instance(s) requested (%s)",
                 job_id, dest.name, len(items), short_uid(uid))
        started = clock()
        hold = min(dest.commitment_timeout, dest.timeout / 2)
        while clock() - started < hold and assoc.is_established:
            if _state(db, commitment_id) != "pending":
                break
            time.sleep(POLL_SECONDS)
    finally:
        if assoc.is_established:
            assoc.release()
    while _state(db, commitment_id) == "pending":
        if clock() - started >= dest.commitment_timeout:
            if _set_state(db, commitment_id, "timeout", only_if_pending=True,
                          error=f"no N-EVENT-REPORT within {dest.commitment_timeout:g} s"):
                log.warning("job %d -> %s: no storage commitment report within %g s (%s)",
                            job_id, dest.name, dest.commitment_timeout, short_uid(uid))
                return _round(db, commitment_id, uid, transient=True)
            break  # the report arrived in between
        time.sleep(POLL_SECONDS)
    return _round(db, commitment_id, uid)


def _committed_uids(db: Database, commitment_ids: list[int]) -> set[str]:
    """Instances committed by any of these requests (a late report counts)."""
    if not commitment_ids:
        return set()
    with db.session() as s:
        return set(s.execute(
            select(StorageCommitmentItem.sop_instance_uid).where(
                StorageCommitmentItem.commitment_id.in_(commitment_ids),
                StorageCommitmentItem.status == "committed",
            )
        ).scalars())


def _failure_text(failed: dict[str, int | None]) -> str:
    shown = "; ".join(
        f"{short_uid(uid)}: " + ("not in the report" if reason is None
                                 else f"{reason:#06x} {FAILURE_REASONS.get(reason, 'unknown failure reason')}")
        for uid, reason in list(failed.items())[:5]
    )
    return f"{len(failed)} instance(s) not committed ({shown})"


def commit_delivery(
    db: Database,
    job_id: int,
    dest: DestinationSettings,
    items: Sequence[DeliveryItem],
    *,
    redeliver: Callable[[list[DeliveryItem]], tuple[bool, str | None]],
    sleep: Callable[[float], None] = time.sleep,
) -> CommitmentOutcome:
    """Get ``items`` committed by ``dest``, retrying under its attempt / backoff rules.

    Parameters
    ----------
    db:
        The node database.
    job_id:
        The delivered job.
    dest:
        The destination (``storage_commitment`` is ``True`` or ``"auto"``).
    items:
        The instances it stored.
    redeliver:
        Sends instances again; returns ``(ok, error)``.
    sleep:
        Called with the backoff in seconds before each new request.

    Returns
    -------
    CommitmentOutcome
        ``committed``, ``not_supported`` (ok only with ``"auto"``), or the
        last request's state with the reason.
    """
    with db.session() as s:
        previous = s.execute(
            select(func.max(StorageCommitment.attempt)).where(
                StorageCommitment.job_id == job_id, StorageCommitment.destination == dest.name)
        ).scalar_one_or_none() or 0
    by_uid = {i.sop_instance_uid: i for i in items}
    ids: list[int] = []
    pending = list(items)
    last: CommitmentRound | None = None
    n = 0
    for n in range(1, dest.max_attempts + 1):
        last = request_commitment(db, job_id, dest, pending, previous + n)
        ids.append(last.commitment_id)
        if last.state == "not_supported":
            required = dest.storage_commitment is True
            return CommitmentOutcome(not required, "not_supported", n, 0,
                                     last.error if required else None)
        committed = _committed_uids(db, ids)
        remaining = [by_uid[u] for u in by_uid if u not in committed]
        if not remaining:
            return CommitmentOutcome(True, "committed", n, len(committed))
        if last.state == "error" and not last.transient:
            break
        if n == dest.max_attempts:
            break
        sleep(dest.backoff(n))
        resend = [i for i in remaining if i.sop_instance_uid in last.failed]
        if resend:
            ok, error = redeliver(resend)
            if not ok:
                return CommitmentOutcome(False, "failed", n, len(committed),
                                         f"{_failure_text(last.failed)}; sending them again failed: {error}")
        pending = remaining
    assert last is not None
    committed = _committed_uids(db, ids)
    if last.state == "failed":
        error = _failure_text({u: r for u, r in last.failed.items() if u not in committed})
    else:
        error = last.error or last.state
    return CommitmentOutcome(False, last.state, n, len(committed), error)
