"""The job state machine, in one place.

::

    received -> queued -> running -> delivering -> done
                   |         |            |
                   |         +-> failed   +-> delivery_failed
                   +-> skipped (routing rule) / cancelled

Every transition goes through :func:`transition`, which checks it is allowed
and writes a :class:`~pacs_node.db.models.JobEvent` (time, host, message) in
the same transaction as the state change.
"""

from __future__ import annotations

import enum
import logging
import socket

from sqlalchemy.orm import Session

from pacs_node.db.models import Job, JobEvent, utcnow

__all__ = ["IllegalTransition", "JobState", "TERMINAL_STATES", "record_created", "transition"]

logger = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"
    DELIVERY_FAILED = "delivery_failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


S = JobState
TERMINAL_STATES = frozenset({S.DONE, S.FAILED, S.DELIVERY_FAILED, S.CANCELLED, S.SKIPPED})

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.RECEIVED: frozenset({S.QUEUED, S.SKIPPED, S.CANCELLED, S.FAILED}),
    S.QUEUED: frozenset({S.QUEUED, S.RUNNING, S.CANCELLED, S.FAILED}),
    # running -> queued: the worker was lost and the task is redelivered.
    S.RUNNING: frozenset({S.RUNNING, S.QUEUED, S.DELIVERING, S.DONE, S.FAILED, S.CANCELLED}),
    S.DELIVERING: frozenset({S.DELIVERING, S.DONE, S.DELIVERY_FAILED, S.FAILED, S.CANCELLED}),
    # Terminal states can only be retried (back to queued / delivering).
    S.DONE: frozenset({S.QUEUED, S.DELIVERING}),
    S.FAILED: frozenset({S.QUEUED}),
    S.DELIVERY_FAILED: frozenset({S.DELIVERING, S.QUEUED}),
    S.CANCELLED: frozenset({S.QUEUED}),
    S.SKIPPED: frozenset({S.QUEUED}),
}

_HOST = socket.gethostname()


class IllegalTransition(ValueError):
    """The requested state change is not allowed from the job's current state."""


def record_created(session: Session, job: Job, message: str) -> None:
    """Record the creation of ``job`` (in its initial state) as its first event."""
    session.add(JobEvent(job=job, from_state=None, to_state=job.state, message=message, host=_HOST, at=utcnow()))


def transition(session: Session, job: Job, to: JobState | str, message: str, *, host: str | None = None) -> None:
    """Move ``job`` to state ``to`` and record the event.

    Raises
    ------
    IllegalTransition
        When ``to`` is not reachable from the job's current state.
    """
    target = JobState(to)
    current = JobState(job.state)
    if target not in _ALLOWED[current]:
        raise IllegalTransition(f"job {job.id}: {current} -> {target} is not allowed")
    now = utcnow()
    job.state = target.value
    job.updated_at = now
    if target is S.QUEUED:
        job.queued_at = now
    elif target is S.RUNNING:
        job.started_at = job.started_at or now
    if target in TERMINAL_STATES:
        job.finished_at = now
    session.add(JobEvent(job=job, from_state=current.value, to_state=target.value, message=message, host=host or _HOST, at=now))
    logger.info("job %s: %s -> %s (%s)", job.id, current.value, target.value, message)
