"""``/api/v1/jobs``: list, show and retry analysis jobs."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel

from pacs_node.api.auth import ReadAuth, WriteAuth, principal_name
from pacs_node.api.deps import DbSession, DispatcherDep, NodeDep
from pacs_node.jobs.actions import JobBusyError, JobNotFoundError, retry_job
from pacs_node.jobs.queries import get_job, list_jobs
from pacs_node.jobs.schemas import JobDetail, JobSummary
from pacs_node.jobs.states import JobState

__all__ = ["JobAccepted", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


class JobAccepted(BaseModel):
    """Answer of an accepted action: the job and its state afterwards."""

    job_id: int
    state: str


_READ_DOC: dict[int | str, dict[str, str]] = {
    401: {"description": "missing or wrong bearer token"},
    403: {"description": "the token lacks the read scope"},
}


@router.get("", response_model=list[JobSummary], dependencies=[ReadAuth], responses=_READ_DOC,
            summary="List jobs, newest first")
def jobs_list(
    db: DbSession,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    study_uid: Annotated[str | None, Query(description="only jobs of this Study Instance UID")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[JobSummary]:
    """Jobs, newest first, optionally filtered by state and study.

    Parameters
    ----------
    db:
        Database session.
    state:
        Keep only jobs in this state.
    study_uid:
        Keep only jobs of this study.
    limit, offset:
        Paging.

    Returns
    -------
    list of JobSummary
        The jobs.
    """
    return list_jobs(db, state=state.value if state else None, study_uid=study_uid, limit=limit, offset=offset)


@router.get(
    "/{job_id}",
    response_model=JobDetail,
    dependencies=[ReadAuth],
    responses={**_READ_DOC, 404: {"description": "no such job"}},
    summary="One job with events, timings, findings, outputs and deliveries",
)
def jobs_show(job_id: int, db: DbSession) -> JobDetail:
    """One job in detail.

    Parameters
    ----------
    job_id:
        Job id.
    db:
        Database session.

    Returns
    -------
    JobDetail
        The job.

    Raises
    ------
    HTTPException
        404 when there is no such job.
    """
    job = get_job(db, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


@router.post(
    "/{job_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    dependencies=[WriteAuth],
    responses={
        401: {"description": "missing or wrong bearer token"},
        403: {"description": "the token lacks the write scope, or a session request lacks X-CSRF-Token"},
        404: {"description": "no such job"},
        409: {"description": "the job is queued, running or delivering"},
    },
    summary="Run a finished job again (re-deliver a delivery_failed job)",
)
def jobs_retry(job_id: int, request: Request, node: NodeDep, dispatcher: DispatcherDep) -> JobAccepted:
    """Retry a finished job.

    Parameters
    ----------
    job_id:
        Job id.
    request:
        The request (the token's name is logged).
    node:
        The node.
    dispatcher:
        Task dispatcher.

    Returns
    -------
    JobAccepted
        The job id and its new state (``queued`` or ``delivering``).

    Raises
    ------
    HTTPException
        404 (no such job) or 409 (job busy).
    """
    try:
        retry_job(node.db, dispatcher, job_id)
    except JobNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except JobBusyError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    with node.db.sessionmaker() as s:
        job = get_job(s, job_id)
    logger.info("job %d: retry requested through the API by token %r", job_id, principal_name(request))
    return JobAccepted(job_id=job_id, state=job.state if job else "unknown")
