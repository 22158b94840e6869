"""Keeps jobs moving when something outside the job failed.

* Outbox: a committed job the broker never accepted (broker down at the
  time, ``enqueued_at`` NULL) is enqueued again.
* Lost workers: a job ``running`` or ``delivering`` whose lease expired is
  put back (``running -> queued``; a delivery is re-enqueued), so a worker
  killed mid-job never leaves it stuck; output UIDs are deterministic, so
  the re-run replaces rather than duplicates.

Call :meth:`JobSupervisor.tick` from a loop (the node's service loop) or a test.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from sqlalchemy import or_, select

from pacs_node.db.models import Job, utcnow
from pacs_node.db.session import Database
from pacs_node.jobs.actions import enqueue
from pacs_node.jobs.states import JobState, transition
from pacs_node.queue import Dispatcher

__all__ = ["JobSupervisor"]

logger = logging.getLogger(__name__)


class JobSupervisor:
    """Parameters
    ----------
    db:
        The node's database.
    dispatcher:
        Enqueues tasks.
    resend_after_seconds:
        An un-enqueued job younger than this is left to its creator.
    clock:
        Current UTC time (tests pass a fake clock).
    """

    def __init__(self, db: Database, dispatcher: Dispatcher, *, resend_after_seconds: float = 2.0,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.db = db
        self.dispatcher = dispatcher
        self.resend_after = dt.timedelta(seconds=resend_after_seconds)
        self.clock = clock

    def tick(self) -> dict[str, list[int]]:
        now = self.clock()
        recovered = self._recover_expired(now)
        with self.db.sessionmaker() as s:
            pending = list(
                s.execute(
                    select(Job.id).where(
                        Job.state.in_([JobState.QUEUED.value, JobState.DELIVERING.value]),
                        Job.enqueued_at.is_(None),
                        or_(Job.updated_at < now - self.resend_after, Job.id.in_(recovered)),
                    )
                ).scalars()
            )
        sent = [job_id for job_id in pending if enqueue(self.db, self.dispatcher, job_id)]
        return {"recovered": recovered, "enqueued": sent}

    def _recover_expired(self, now: dt.datetime) -> list[int]:
        with self.db.sessionmaker() as s:
            expired = list(
                s.execute(
                    select(Job.id).where(
                        Job.state.in_([JobState.RUNNING.value, JobState.DELIVERING.value]),
                        Job.lease_expires_at.is_not(None),
                        Job.lease_expires_at < now,
                    )
                ).scalars()
            )
        out = []
        for job_id in expired:
            with self.db.session() as s:
                job = s.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one()
                if job.lease_expires_at is None or job.lease_expires_at >= now:
                    continue  # renewed meanwhile
                host = job.worker_host or "unknown host"
                if job.state == JobState.RUNNING.value:
                    transition(s, job, JobState.QUEUED, f"worker on {host} lost (lease expired); queued again")
                else:
                    transition(s, job, JobState.DELIVERING, f"worker on {host} lost during delivery; sending again")
                job.lease_expires_at = None
                job.enqueued_at = None
            logger.warning("job %d recovered from a lost worker", job_id)
            out.append(job_id)
        return out


