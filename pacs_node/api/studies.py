"""``/api/v1/studies``: list stored studies and request an analysis."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict

from pacs_node.api.auth import ReadAuth, WriteAuth
from pacs_node.api.deps import DbSession, DispatcherDep, NodeDep, get_rules
from pacs_node.api.jobs import JobAccepted
from pacs_node.db.models import Job
from pacs_node.jobs.actions import StudyNotFoundError, analyze_study
from pacs_node.jobs.routing import RoutingRule
from pacs_node.jobs.queries import list_studies
from pacs_node.jobs.schemas import StudySummary

__all__ = ["AnalyzeRequest", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])


class AnalyzeRequest(BaseModel):
    """Optional body of ``POST /studies/{uid}/analyze``."""

    model_config = ConfigDict(extra="forbid")

    #: Name of a configured ``[[sources]]`` PACS to pull the study from first.
    source: str | None = None


@router.get("", response_model=list[StudySummary], dependencies=[ReadAuth], summary="List studies, newest first")
def studies_list(
    db: DbSession,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[StudySummary]:
    """Stored studies with their series.

    Parameters
    ----------
    db:
        Database session.
    limit, offset:
        Paging.

    Returns
    -------
    list of StudySummary
        The studies, newest first.
    """
    return list_studies(db, limit=limit, offset=offset)


def _source_names(node: NodeDep) -> set[str]:
    return {str(src.get("name")) for src in node.settings.sources if src.get("name")}


@router.post(
    "/{study_uid}/analyze",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    dependencies=[WriteAuth],
    responses={
        400: {"description": "unknown source"},
        401: {"description": "missing or wrong bearer token"},
        403: {"description": "API token not configured"},
        404: {"description": "the study is not stored on this node"},
    },
    summary="Create an analysis job for a stored study",
)
def studies_analyze(
    study_uid: str,
    node: NodeDep,
    dispatcher: DispatcherDep,
    rules: Annotated[list[RoutingRule], Depends(get_rules)],
    body: Annotated[AnalyzeRequest | None, Body()] = None,
) -> JobAccepted:
    """Analyse a study now (its pending version, or a re-analysis).

    Parameters
    ----------
    study_uid:
        Study Instance UID.
    node:
        The node.
    dispatcher:
        Task dispatcher.
    rules:
        Routing rules.
    body:
        Optional ``{"source": NAME}``: a configured PACS to pull from.

    Returns
    -------
    JobAccepted
        The new job's id and state (``queued``, or ``skipped`` when no
        routing rule accepts the study).

    Raises
    ------
    HTTPException
        400 (unknown source), 404 (study not stored).
    """
    if body is not None and body.source is not None and body.source not in _source_names(node):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"unknown source {body.source!r}")
    try:
        job_id = analyze_study(node.db, dispatcher, study_uid, rules)
    except StudyNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    with node.db.sessionmaker() as s:
        job = s.get(Job, job_id)
        state = job.state if job is not None else "unknown"
    logger.info("job %d: analysis of study %s requested through the API", job_id, study_uid)
    return JobAccepted(job_id=job_id, state=state)
