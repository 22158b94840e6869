"""Job creation and the actions users take on jobs (retry, analyze).

Shared by the assembler, the REST API and the CLI. Every state change goes
through :func:`pacs_node.jobs.states.transition`.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pacs_node.db.models import Job, Series, Study, utcnow
from pacs_node.db.session import Database
from pacs_node.jobs.routing import Route, RoutingRule, choose_route
from pacs_node.jobs.states import JobState, record_created, transition
from pacs_node.queue import Dispatcher

__all__ = ["JobBusyError", "JobNotFoundError", "StudyNotFoundError", "analyze_study", "create_job", "enqueue", "retry_job"]

logger = logging.getLogger(__name__)


class JobNotFoundError(LookupError):
    pass


class StudyNotFoundError(LookupError):
    pass


class JobBusyError(RuntimeError):
    """The job is queued or running; it cannot be retried now."""


def create_job(s: Session, study: Study, version: int, reason: str, rules: list[RoutingRule]) -> Job:
    """Create the job of ``study`` version ``version`` (already claimed) and
    route it: ``queued`` with a profile and series, or ``skipped``."""
    series = list(s.execute(select(Series).where(Series.study_id == study.id)).scalars())
    now = utcnow()
    interrupted = ""
    if study.interrupted_at is not None:
        # The version is claimed now: its interruption is settled (the
        # arrivals table keeps the history).
        interrupted = f"; its last arrival was interrupted ({study.interrupted_reason or 'unknown'})"
        logger.info("study %d: job created although its arrival was interrupted (%s): %s",
                    study.id, study.interrupted_reason, reason)
        study.interrupted_at = None
        study.interrupted_reason = None
    job = Job(
        study_id=study.id,
        study_version=version,
        state=JobState.RECEIVED.value,
        reason=reason,
        instance_count=study.num_instances,
        series_count=len(series),
        created_at=now,
        updated_at=now,
        timings={},
        findings={},
    )
    s.add(job)
    s.flush()
    record_created(
        s, job, f"created: {reason} ({study.num_instances} instances, {len(series)} series){interrupted}"
    )
    route = choose_route(rules, study, series)
    if isinstance(route, Route):
        job.model_profile = route.profile
        job.source_series_uid = route.series_uid
        transition(s, job, JobState.QUEUED, f"routed by rule {route.rule!r} to profile {route.profile!r}")
    else:
        transition(s, job, JobState.SKIPPED, route.reason)
    return job


def enqueue(db: Database, dispatcher: Dispatcher, job_id: int) -> bool:
    """Hand a committed, queued job to the broker and mark it enqueued.

    Returns False (and logs) when the broker is unreachable; the supervisor
    tries again later.
    """
    with db.sessionmaker() as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in (JobState.QUEUED.value, JobState.DELIVERING.value):
            return False
        deliver = job.state == JobState.DELIVERING.value
    try:
        if deliver:
            dispatcher.enqueue_delivery(job_id)
        else:
            dispatcher.enqueue_process(job_id)
    except Exception as exc:  # noqa: BLE001 - broker down: retried by the supervisor
        logger.warning("job %d: broker unavailable (%s); will retry", job_id, exc.__class__.__name__)
        return False
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
    return True


def retry_job(db: Database, dispatcher: Dispatcher, job_id: int) -> None:
    """Run a finished job again.

    A ``delivery_failed`` job with outputs is re-delivered; any other finished
    job is processed again (output UIDs are deterministic, so results replace
    the previous ones at the destination).

    Raises
    ------
    JobNotFoundError
        No such job.
    JobBusyError
        The job is queued, running or delivering.
    """
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} not found")
        state = JobState(job.state)
        if state in (JobState.QUEUED, JobState.RUNNING, JobState.DELIVERING, JobState.RECEIVED):
            raise JobBusyError(f"job {job_id} is {state.value}")
        job.error = None
        job.enqueued_at = None
        if state is JobState.DELIVERY_FAILED and job.outputs:
            transition(s, job, JobState.DELIVERING, "delivery retry requested")
        else:
            transition(s, job, JobState.QUEUED, "retry requested")
    enqueue(db, dispatcher, job_id)


def analyze_study(db: Database, dispatcher: Dispatcher, study_uid: str, rules: list[RoutingRule]) -> int:
    """Create a job for the study now (a pending version, or a re-analysis).

    Raises
    ------
    StudyNotFoundError
        The node holds no such study.
    """
    with db.session() as s:
        study = s.execute(
            select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
        ).scalar_one_or_none()
        if study is None:
            raise StudyNotFoundError(f"study {study_uid} is not stored on this node")
        if study.job_version >= study.version:
            study.version += 1
            study.version_started_at = utcnow()
        version = study.version
        s.execute(
            update(Study).where(Study.id == study.id).values(job_version=version).execution_options(
                synchronize_session=False
            )
        )
        study.job_version = version
        job = create_job(s, study, version, "analysis requested", rules)
        job_id = job.id
        queued = job.state == JobState.QUEUED.value
    if queued:
        enqueue(db, dispatcher, job_id)
    return job_id


def count_jobs(s: Session) -> dict[str, int]:
    return {str(state): int(n) for state, n in s.execute(select(Job.state, func.count(Job.id)).group_by(Job.state))}
