"""Deliver a job's outputs to every configured destination.

:func:`deliver_job` is idempotent and re-entrant: it may run again for a job
that is ``delivering`` (a redelivered task), ``delivery_failed`` (``pacs-node
jobs retry``) or ``done`` (a resend); the outputs carry deterministic UIDs, so
the archive replaces instead of duplicating them.

Per destination, up to ``max_attempts`` attempts, waiting
``backoff_seconds * 2**(n-1)`` (capped at ``max_backoff_seconds``) before retry
``n`` through the injected ``sleep``. A retry resends only the instances not
yet stored. Every attempt is one ``delivery_attempts`` row (committed at
once): destination, attempt number (continuing earlier runs' numbering),
status, status code, error and the status of each instance.

The job ends ``done`` when every destination stored every output, else
``delivery_failed`` with the reason (a permanent refusal stops retrying that
destination at once).

A DIMSE destination with ``storage_commitment`` set is then asked to commit
what it stored (:mod:`.commitment`); the delivery to it succeeds only once
every instance is committed (or, with ``"auto"``, when it does not support
Storage Commitment), each request being one ``storage_commitments`` row.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from pacs_node.db.models import DeliveryAttempt, Job, Output, utcnow
from pacs_node.db.session import Database
from pacs_node.jobs.states import JobState, transition

from .base import DeliveryItem, DeliveryResult, Deliverer, InstanceStatus, make_deliverer
from .commitment import commit_delivery
from .settings import DestinationSettings, load_destinations

if TYPE_CHECKING:
    from pacs_node.config import Settings

__all__ = ["DeliveryError", "DestinationOutcome", "JobDeliveryReport", "deliver_job"]

log = logging.getLogger(__name__)

_DELIVERABLE = {JobState.RUNNING, JobState.DELIVERING, JobState.DONE, JobState.DELIVERY_FAILED}


class DeliveryError(RuntimeError):
    """The job cannot be delivered (unknown job, or a state without outputs)."""


@dataclass
class DestinationOutcome:
    name: str
    ok: bool
    attempts: int
    status: str
    error: str | None = None
    #: Storage commitment state (``committed``, ``not_supported``, ``failed``,
    #: ``timeout``, ``error``); None when not asked.
    commitment: str | None = None


@dataclass
class JobDeliveryReport:
    """Outcome of :func:`deliver_job`; ``str(report)`` is the job's final state."""

    job_id: int
    state: str
    destinations: list[DestinationOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == JobState.DONE.value

    def __str__(self) -> str:
        return self.state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _error_text(result: DeliveryResult) -> str | None:
    if result.error:
        return result.error
    bad = [i for i in result.instances if not i.ok]
    if not bad:
        return None
    shown = "; ".join(f"...{i.sop_instance_uid[-8:]}: {i.message or i.status}" for i in bad[:5])
    return f"{len(bad)} of {len(result.instances)} instance(s) not stored ({shown})"


def _finish(db: Database, job_id: int, ok: bool, message: str, seconds: float) -> str:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        timings = dict(job.timings or {})
        timings["delivery"] = round(seconds, 3)
        job.timings = timings
        if job.state != JobState.DELIVERING.value:
            log.warning("job %d is %s after delivery; state left unchanged", job_id, job.state)
            return job.state
        if ok:
            job.error = None
            transition(s, job, JobState.DONE, message)
        else:
            job.error = message
            transition(s, job, JobState.DELIVERY_FAILED, message)
        return job.state


def deliver_job(
    db: Database,
    job_id: int,
    destinations: Sequence[DestinationSettings] | None = None,
    outputs_dir: str | Path = "",
    *,
    settings: Settings | None = None,
    sleep: Callable[[float], None] = time.sleep,
    deliverer_factory: Callable[[DestinationSettings], Deliverer] = make_deliverer,
) -> JobDeliveryReport:
    """Send the job's outputs to every enabled destination, with retries.

    Parameters
    ----------
    db:
        The node database.
    job_id:
        Job whose ``outputs`` rows are sent.
    destinations:
        Validated ``[[destinations]]`` (see :func:`~.settings.load_destinations`);
        ``None``: validated from ``settings``.
    outputs_dir:
        Directory the ``outputs.path`` values are relative to.
    settings:
        Node settings, used when ``destinations`` is ``None``
        (``settings.destinations``, calling AE title ``settings.dicom.ae_title``).
    sleep:
        Called with the backoff in seconds between attempts (inject a fast
        one in tests).
    deliverer_factory:
        Makes the :class:`~.base.Deliverer` of a destination.

    Returns
    -------
    JobDeliveryReport
        The job's final state and each destination's outcome.

    Raises
    ------
    DeliveryError
        Unknown job, or a job that is not running/delivering/done/delivery_failed.
    ValueError
        Invalid ``[[destinations]]`` in ``settings``.
    """
    started = time.monotonic()
    if destinations is None:
        if settings is None:
            raise TypeError("deliver_job needs destinations or settings")
        destinations = load_destinations(settings.destinations, settings.dicom.ae_title)
    if not str(outputs_dir):
        raise TypeError("deliver_job needs outputs_dir")
    outputs_dir = Path(outputs_dir)
    active = [d for d in destinations if d.enabled]
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise DeliveryError(f"job {job_id} not found")
        state = JobState(job.state)
        if state not in _DELIVERABLE:
            raise DeliveryError(f"job {job_id} is {state.value}; only a processed job can be delivered")
        if state is not JobState.DELIVERING:
            transition(s, job, JobState.DELIVERING, f"delivering to {len(active)} destination(s)")
        rows = s.execute(select(Output).where(Output.job_id == job_id).order_by(Output.id)).scalars().all()
        outputs = [(Path(r.path), r.sop_class_uid, r.sop_instance_uid, r.kind, r.sha256) for r in rows]

    items: list[DeliveryItem] = []
    problems: list[str] = []
    for rel, sop_class, sop_uid, kind, sha in outputs:
        path = outputs_dir / rel
        if not path.is_file():
            problems.append(f"output file {rel} is missing")
        elif _sha256(path) != sha:
            problems.append(f"output file {rel} changed since it was validated (sha256 mismatch)")
        else:
            items.append(DeliveryItem(path=path, sop_class_uid=sop_class, sop_instance_uid=sop_uid, kind=kind))
    if problems:
        msg = "; ".join(problems)
        state_ = _finish(db, job_id, False, msg, time.monotonic() - started)
        return JobDeliveryReport(job_id, state_)
    if not items:
        state_ = _finish(db, job_id, False, "job has no outputs to deliver", time.monotonic() - started)
        return JobDeliveryReport(job_id, state_)
    if not active:
        state_ = _finish(db, job_id, True, "no destinations configured; outputs kept on this node", time.monotonic() - started)
        return JobDeliveryReport(job_id, state_)

    report = JobDeliveryReport(job_id, JobState.DELIVERING.value)
    for dest in active:
        outcome = _deliver_to(db, job_id, dest, items, sleep, deliverer_factory)
        if outcome.ok and dest.kind == "dimse" and dest.storage_commitment is not False:
            outcome = _commit(db, job_id, dest, items, sleep, deliverer_factory, outcome)
        report.destinations.append(outcome)
    failed = [d for d in report.destinations if not d.ok]
    if failed:
        message = "; ".join(f"{d.name}: {d.status} after {d.attempts} attempt(s): {d.error}" for d in failed)
    else:
        message = "delivered to " + ", ".join(
            d.name + (f" (storage commitment: {d.commitment})" if d.commitment else "") for d in report.destinations)
    report.state = _finish(db, job_id, not failed, message, time.monotonic() - started)
    return report


def _deliver_to(
    db: Database,
    job_id: int,
    dest: DestinationSettings,
    items: list[DeliveryItem],
    sleep: Callable[[float], None],
    factory: Callable[[DestinationSettings], Deliverer],
) -> DestinationOutcome:
    with db.session() as s:
        previous = s.execute(
            select(func.max(DeliveryAttempt.attempt)).where(
                DeliveryAttempt.job_id == job_id, DeliveryAttempt.destination == dest.name
            )
        ).scalar_one_or_none() or 0
    deliverer = factory(dest)
    pending = list(items)
    final: dict[str, InstanceStatus] = {}
    last: DeliveryResult | None = None
    for n in range(1, dest.max_attempts + 1):
        t0 = utcnow()
        try:
            result = deliverer.send(pending)
        except Exception as exc:  # noqa: BLE001 - a deliverer bug must not lose the attempt record
            log.exception("deliverer %s failed", dest.name)
            result = DeliveryResult(error=f"{type(exc).__name__}: {exc}", transient=False)
        last = result
        with db.session() as s:
            s.add(DeliveryAttempt(
                job_id=job_id,
                destination=dest.name,
                attempt=previous + n,
                status=result.status,
                status_code=result.summary_code(),
                error=_error_text(result),
                details=result.details(),
                started_at=t0,
                finished_at=utcnow(),
            ))
        log.info("job %d -> %s attempt %d: %s %s", job_id, dest.describe(), previous + n, result.status,
                 _error_text(result) or "")
        by_uid = {i.sop_instance_uid: i for i in result.instances}
        still: list[DeliveryItem] = []
        for item in pending:
            st = by_uid.get(item.sop_instance_uid)
            if st is not None and st.ok:
                final[item.sop_instance_uid] = st
            elif st is not None and not st.transient:
                final[item.sop_instance_uid] = st  # permanently refused: not retried
            else:
                still.append(item)
        refused = [st for st in final.values() if not st.ok]
        if not still and not refused:
            return DestinationOutcome(dest.name, True, n, "success")
        if not still or not result.retryable:
            break
        if n < dest.max_attempts:
            pending = still
            sleep(dest.backoff(n))
    assert last is not None
    refused = [st for st in final.values() if not st.ok]
    if refused and not last.error:
        error = f"{len(refused)} instance(s) refused: " + "; ".join(
            f"...{st.sop_instance_uid[-8:]}: {st.message or st.status_code}" for st in refused[:5]
        )
    else:
        error = _error_text(last) or "not delivered"
    status = "partial" if any(st.ok for st in final.values()) else last.status
    return DestinationOutcome(dest.name, False, n, status, error)


def _commit(
    db: Database,
    job_id: int,
    dest: DestinationSettings,
    items: list[DeliveryItem],
    sleep: Callable[[float], None],
    factory: Callable[[DestinationSettings], Deliverer],
    delivered: DestinationOutcome,
) -> DestinationOutcome:
    """Storage commitment after a successful delivery; failed instances are sent again."""

    def redeliver(again: list[DeliveryItem]) -> tuple[bool, str | None]:
        out = _deliver_to(db, job_id, dest, again, sleep, factory)
        return out.ok, out.error

    result = commit_delivery(db, job_id, dest, items, redeliver=redeliver, sleep=sleep)
    if result.ok:
        return DestinationOutcome(dest.name, True, delivered.attempts, "success", commitment=result.state)
    return DestinationOutcome(dest.name, False, result.attempts, "uncommitted",
                              f"storage commitment {result.state}: {result.error}", commitment=result.state)
