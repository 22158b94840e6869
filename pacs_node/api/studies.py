"""``/api/v1/studies``: list stored studies and request an analysis.

``POST /api/v1/studies/{uid}/analyze`` analyses a stored study; with
``{"source": NAME}`` it first pulls the study from that ``[[sources]]``
archive (:mod:`pacs_node.pull`). The endpoint is a plain (sync) function, so
FastAPI runs it in its thread pool: a retrieval never blocks the event loop
(STOW-RS, WADO-RS and the dashboard keep answering). The response comes once
the study is retrieved and its job is queued (small studies take seconds).
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated

from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict

from pacs_node.api.auth import ReadAuth, WriteAuth, principal_name
from pacs_node.api.deps import DbSession, DispatcherDep, NodeDep, get_rules
from pacs_node.api.jobs import (
    TOTAL_HEADER,
    AccessionQuery,
    DateQuery,
    JobAccepted,
    PatientQuery,
    study_filter,
    viewer_link,
)
from pacs_node.db.models import Job
from pacs_node.ingest.uids import InvalidUIDError, check_uid
from pacs_node.jobs.actions import StudyNotFoundError, analyze_study
from pacs_node.jobs.routing import RoutingRule
from pacs_node.jobs.queries import count_studies, list_studies
from pacs_node.jobs.schemas import StudySummary
from pacs_node.pull.base import PullError

__all__ = ["AnalyzeAccepted", "AnalyzeRequest", "pull_service_of", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])


class AnalyzeRequest(BaseModel):
    """Optional body of ``POST /studies/{uid}/analyze``."""

    model_config = ConfigDict(extra="forbid")

    #: Name of a configured ``[[sources]]`` PACS to pull the study from first.
    source: str | None = None


class AnalyzeAccepted(JobAccepted):
    """The job, and what was pulled when a source was given."""

    #: ``source``, ``method``, ``expected``, ``received``, ``stored``,
    #: ``duplicates``, ``failed``, ``errors``, ``seconds``; ``None`` without a source.
    pulled: dict[str, Any] | None = None


_PULL_LOCK = threading.Lock()


def pull_service_of(state: Any) -> Any:
    """The application's :class:`~pacs_node.pull.service.PullService`
    (``app.state.pulls``, set by ``NodeServer``; built on first use otherwise).

    Raises
    ------
    ValueError
        When ``[[sources]]`` is invalid.
    """
    pulls = getattr(state, "pulls", None)
    if pulls is not None:
        return pulls
    with _PULL_LOCK:
        pulls = getattr(state, "pulls", None)
        if pulls is None:
            from pacs_node.pull.service import PullService

            pulls = PullService(state.node)
            state.pulls = pulls
    return pulls


@router.get("", response_model=list[StudySummary], dependencies=[ReadAuth],
            responses={401: {"description": "missing or wrong bearer token"},
                       403: {"description": "the token lacks the read scope"},
                       422: {"description": "a malformed parameter (e.g. a date that is not YYYYMMDD)"}},
            summary="List studies, newest first; search by patient, accession, study UID, date")
def studies_list(
    db: DbSession,
    node: NodeDep,
    response: Response,
    patient: PatientQuery = None,
    accession: AccessionQuery = None,
    study_uid: Annotated[str | None, Query(max_length=64,
                                           description="Study Instance UID; `*` and `?` wildcards")] = None,
    date: DateQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[StudySummary]:
    """Stored studies with their series and newest job, optionally narrowed
    by patient, accession number, Study Instance UID and date
    (:mod:`pacs_node.jobs.search`); ``X-Total-Count`` says how many match.

    Parameters
    ----------
    db:
        Database session.
    node:
        The node (viewer link template).
    response:
        The response (gets ``X-Total-Count``).
    patient, accession, study_uid, date:
        Search criteria (combined with AND).
    limit, offset:
        Paging.

    Returns
    -------
    list of StudySummary
        The studies, newest first.
    """
    filters = study_filter(patient, accession, study_uid, date)
    studies = list_studies(db, limit=limit, offset=offset, filters=filters)
    response.headers[TOTAL_HEADER] = str(count_studies(db, filters=filters))
    for st in studies:
        st.viewer_url = viewer_link(node.settings.http.viewer_url, st.study_instance_uid)
    return studies


def _source_names(node: NodeDep) -> set[str]:
    return {str(src.get("name")) for src in node.settings.sources if src.get("name")}


@router.post(
    "/{study_uid}/analyze",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AnalyzeAccepted,
    dependencies=[WriteAuth],
    responses={
        400: {"description": "unknown source, malformed Study Instance UID"},
        401: {"description": "missing or wrong bearer token"},
        403: {"description": "the token lacks the write scope, or a session request lacks X-CSRF-Token"},
        404: {"description": "the study is not stored on this node / not found on the source"},
        409: {"description": "the study is being pulled already"},
        500: {"description": "invalid [[sources]] configuration"},
        502: {"description": "the source answered with an error (refused, failure status, bad response)"},
        503: {"description": "the source is unreachable (connection refused, timeout)"},
    },
    summary="Create an analysis job for a stored study, or pull it from a source first",
)
def studies_analyze(
    study_uid: str,
    request: Request,
    node: NodeDep,
    dispatcher: DispatcherDep,
    rules: Annotated[list[RoutingRule], Depends(get_rules)],
    body: Annotated[AnalyzeRequest | None, Body()] = None,
) -> AnalyzeAccepted:
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
        Optional ``{"source": NAME}``: a configured PACS to pull from first.
    request:
        The request (its application holds the pull service).

    Returns
    -------
    AnalyzeAccepted
        The new job's id and state (``queued``, or ``skipped`` when no
        routing rule accepts the study), and the pull's figures.

    Raises
    ------
    HTTPException
        400 (unknown source, bad UID), 404 (study not stored / not on the
        source), 409 (pull running), 500 (bad sources configuration), 502
        (source error), 503 (source unreachable).
    """
    try:
        # A malformed UID is never echoed (in the answer or the log lines below).
        study_uid = check_uid(study_uid, "StudyInstanceUID")
    except InvalidUIDError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    pulled: dict[str, Any] | None = None
    if body is not None and body.source is not None:
        if body.source not in _source_names(node):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"unknown source {body.source!r}")
        try:
            pulls = pull_service_of(request.app.state)
        except ValueError as exc:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc)) from None
        try:
            report, job_id = pulls.pull_and_analyze(dispatcher, body.source, study_uid, rules)
        except PullError as exc:
            logger.warning("pull of study %s from %s failed: %s", study_uid, body.source, exc)
            raise HTTPException(exc.http_status, str(exc)) from None
        pulled = report.as_dict()
    else:
        try:
            job_id = analyze_study(node.db, dispatcher, study_uid, rules)
        except StudyNotFoundError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    with node.db.sessionmaker() as s:
        job = s.get(Job, job_id)
        state = job.state if job is not None else "unknown"
    logger.info("job %d: analysis of study %s requested through the API by token %r%s", job_id, study_uid,
                principal_name(request),
                f" (pulled from {body.source})" if pulled is not None and body is not None else "")
    return AnalyzeAccepted(job_id=job_id, state=state, pulled=pulled)
