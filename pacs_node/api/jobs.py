"""``/api/v1/jobs``: list, show and retry analysis jobs."""

from __future__ import annotations

import logging
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import BaseModel

from pacs_node.api.auth import ReadAuth, WriteAuth, principal_name
from pacs_node.api.deps import DbSession, DispatcherDep, NodeDep
from pacs_node.jobs.actions import JobBusyError, JobNotFoundError, retry_job
from pacs_node.jobs.queries import count_job_matches, get_job, list_jobs
from pacs_node.jobs.schemas import JobDetail, JobSummary
from pacs_node.jobs.search import StudyFilter
from pacs_node.jobs.states import JobState

__all__ = ["JobAccepted", "TOTAL_HEADER", "PatientQuery", "AccessionQuery", "DateQuery", "router",
           "study_filter", "viewer_link"]

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
_LIST_DOC: dict[int | str, dict[str, str]] = {
    **_READ_DOC, 422: {"description": "a malformed parameter (e.g. a date that is not YYYYMMDD)"},
}

#: Response header of the lists: how many rows match (for next / previous pages).
TOTAL_HEADER = "X-Total-Count"

PatientQuery = Annotated[str | None, Query(
    max_length=128, description="patient name or ID, case-insensitive; `*` and `?` wildcards, "
                                "otherwise a prefix (`smith` finds `Smith^John`)")]
AccessionQuery = Annotated[str | None, Query(max_length=64, description="accession number; `*` and `?` wildcards")]
DateQuery = Annotated[str | None, Query(
    max_length=21, description="study date YYYYMMDD, or a range YYYYMMDD-YYYYMMDD, YYYYMMDD-, -YYYYMMDD")]


def study_filter(patient: str | None, accession: str | None, study_uid: str | None,
                 date: str | None) -> StudyFilter:
    """The search criteria of a list request.

    Parameters
    ----------
    patient, accession, study_uid, date:
        Query parameters (empty strings count as absent).

    Returns
    -------
    StudyFilter
        The criteria.

    Raises
    ------
    HTTPException
        422 when a value is malformed.
    """
    try:
        return StudyFilter(patient=patient or None, accession=accession or None,
                           study_uid=study_uid or None, date=date or None)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def viewer_link(template: str | None, study_uid: str) -> str | None:
    """The viewer URL of a study (``http.viewer_url`` with ``{study_uid}``
    replaced by the URL-encoded UID), or None when no viewer is configured.

    Parameters
    ----------
    template:
        ``http.viewer_url``.
    study_uid:
        Study Instance UID.

    Returns
    -------
    str or None
        The link.
    """
    if not template:
        return None
    return template.replace("{study_uid}", quote(study_uid, safe=""))


@router.get("", response_model=list[JobSummary], dependencies=[ReadAuth], responses=_LIST_DOC,
            summary="List jobs, newest first; filter by state, study, patient, accession, date")
def jobs_list(
    db: DbSession,
    node: NodeDep,
    response: Response,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    study_uid: Annotated[str | None, Query(description="only jobs of this Study Instance UID")] = None,
    patient: PatientQuery = None,
    accession: AccessionQuery = None,
    date: DateQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[JobSummary]:
    """Jobs, newest first, optionally filtered by state, study and the study's
    patient, accession number and date; ``X-Total-Count`` says how many match.

    Parameters
    ----------
    db:
        Database session.
    node:
        The node (viewer link template).
    response:
        The response (gets ``X-Total-Count``).
    state:
        Keep only jobs in this state.
    study_uid:
        Keep only jobs of this study.
    patient, accession, date:
        Keep only jobs whose study matches (:mod:`pacs_node.jobs.search`).
    limit, offset:
        Paging.

    Returns
    -------
    list of JobSummary
        The jobs.
    """
    filters = study_filter(patient, accession, None, date)
    state_value = state.value if state else None
    jobs = list_jobs(db, state=state_value, study_uid=study_uid, limit=limit, offset=offset, filters=filters)
    response.headers[TOTAL_HEADER] = str(count_job_matches(db, state=state_value, study_uid=study_uid,
                                                           filters=filters))
    template = node.settings.http.viewer_url
    for job in jobs:
        job.viewer_url = viewer_link(template, job.study_instance_uid)
    return jobs


@router.get(
    "/{job_id}",
    response_model=JobDetail,
    dependencies=[ReadAuth],
    responses={**_READ_DOC, 404: {"description": "no such job"}},
    summary="One job with events, timings, findings, outputs and deliveries",
)
def jobs_show(job_id: int, db: DbSession, node: NodeDep) -> JobDetail:
    """One job in detail.

    Parameters
    ----------
    job_id:
        Job id.
    db:
        Database session.
    node:
        The node (viewer link template).

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
    job.viewer_url = viewer_link(node.settings.http.viewer_url, job.study_instance_uid)
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
