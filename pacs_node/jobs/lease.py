"""Atomic claims on jobs: a worker takes a job with a lease it renews; a job
whose lease expired (worker killed, host gone) can be taken again.

Each function runs in its own transaction. On PostgreSQL the job row is
locked with ``SELECT ... FOR UPDATE``; on SQLite the transaction takes the
write lock at BEGIN. Either way two workers can never both claim a job.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select, update

from pacs_node.db.models import Job, utcnow
from pacs_node.db.session import Database
from pacs_node.jobs.states import JobState, transition

__all__ = ["claim", "release", "renew"]

logger = logging.getLogger(__name__)


def claim(db: Database, job_id: int, *, from_state: JobState, to_state: JobState, host: str,
          lease_seconds: float, message: str) -> bool:
    """Move ``job_id`` from ``from_state`` to ``to_state`` under a new lease.

    A job already in ``to_state`` whose lease expired is claimed again (its
    previous holder is gone). Returns False when the job is not claimable:
    another worker holds it, it is finished, or it does not exist.
    """
    now = utcnow()
    with db.session() as s:
        job = s.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None:
            logger.warning("job %d does not exist", job_id)
            return False
        expired = job.lease_expires_at is None or job.lease_expires_at < now
        if job.state == from_state.value and (from_state is not to_state or expired):
            pass
        elif job.state == to_state.value and expired:
            message = f"{message} (previous worker lost: lease expired)"
        else:
            logger.info("job %d is %s; not claimed", job_id, job.state)
            return False
        transition(s, job, to_state, message, host=host)
        job.worker_host = host
        job.lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
        if to_state is JobState.RUNNING:
            job.attempts += 1
    return True


def renew(db: Database, job_id: int, *, state: JobState, lease_seconds: float) -> bool:
    """Extend the lease of a job still in ``state`` (the claimed step)."""
    with db.session() as s:
        n = s.execute(  # type: ignore[attr-defined]
            update(Job)
            .where(Job.id == job_id, Job.state == state.value, Job.lease_expires_at.is_not(None))
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        ).rowcount
    return n == 1


def release(db: Database, job_id: int) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=None))
