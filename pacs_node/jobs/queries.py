"""Read queries over studies and jobs, shared by the CLI and the REST API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, selectinload

from pacs_node.db.models import Job, StorageCommitment, Study
from pacs_node.jobs.schemas import (
    CommitmentItemOut,
    DeliveryAttemptOut,
    JobDetail,
    JobEventOut,
    JobSummary,
    OutputOut,
    SeriesSummary,
    StorageCommitmentOut,
    StudySummary,
)
from pacs_node.jobs.search import StudyFilter
from pacs_node.jobs.states import JobState

__all__ = ["count_job_matches", "count_studies", "get_job", "job_stage", "list_jobs", "list_studies"]

#: States in which the worker's recorded stage is the current one.
_WORKING = (JobState.RUNNING.value, JobState.DELIVERING.value)


def _modalities(study: Study) -> list[str]:
    return sorted({s.modality for s in study.series if s.modality})


def _findings_count(findings: dict[str, Any] | None) -> int | None:
    """``findings.count`` (or the number of items); None when absent."""
    if not findings:
        return None
    count = findings.get("count")
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    items = findings.get("items")
    return len(items) if isinstance(items, list) else None


def job_stage(job: Job) -> str | None:
    """The stage a job is in: ``queue_wait`` when queued, the worker's stage
    while running or delivering, the last stage entered once finished."""
    if job.state == JobState.QUEUED.value:
        return "queue_wait"
    if job.state == JobState.DELIVERING.value and not job.stage:
        return "delivery"
    if job.state == JobState.RUNNING.value and not job.stage:
        return "load"
    return job.stage


def _summary_fields(job: Job) -> dict[str, object]:
    return dict(
        id=job.id,
        state=job.state,
        study_instance_uid=job.study.study_instance_uid,
        study_version=job.study_version,
        modalities=_modalities(job.study),
        instance_count=job.instance_count,
        series_count=job.series_count,
        model_profile=job.model_profile,
        attempts=job.attempts,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        study_score=job.study_score,
        error=job.error,
        timings=job.timings or {},
        findings_count=_findings_count(job.findings),
        accession_number=job.study.accession_number,
        source_series_uid=job.source_series_uid,
        patient_name=job.study.patient_name,
        patient_id=job.study.patient_id,
        study_date=job.study.study_date,
        study_description=job.study.study_description,
        stage=job_stage(job),
        stage_started_at=job.stage_started_at if job.state in _WORKING else None,
    )


def _job_query(state: str | None, study_uid: str | None, filters: StudyFilter | None) -> Select[Job]:
    q = select(Job).join(Study, Job.study_id == Study.id)
    if state:
        q = q.where(Job.state == state)
    if study_uid:
        q = q.where(Study.study_instance_uid == study_uid)
    if filters is not None:
        q = q.where(*filters.conditions())
    return q


def list_jobs(
    s: Session, *, state: str | None = None, study_uid: str | None = None, limit: int = 100, offset: int = 0,
    filters: StudyFilter | None = None,
) -> list[JobSummary]:
    """Jobs, newest first, optionally filtered (``filters``: by their study)."""
    q = _job_query(state, study_uid, filters).options(selectinload(Job.study).selectinload(Study.series))
    q = q.order_by(Job.id.desc()).limit(limit).offset(offset)
    return [JobSummary(**_summary_fields(j)) for j in s.execute(q).scalars()]  # type: ignore[arg-type]


def count_job_matches(s: Session, *, state: str | None = None, study_uid: str | None = None,
                      filters: StudyFilter | None = None) -> int:
    """How many jobs :func:`list_jobs` pages through with these filters."""
    q = _job_query(state, study_uid, filters).with_only_columns(func.count(Job.id))
    return int(s.execute(q).scalar_one())


def get_job(s: Session, job_id: int) -> JobDetail | None:
    """One job with its events, outputs and delivery attempts; None if absent."""
    job = s.execute(
        select(Job)
        .where(Job.id == job_id)
        .options(
            selectinload(Job.study).selectinload(Study.series),
            selectinload(Job.events),
            selectinload(Job.outputs),
            selectinload(Job.deliveries),
        )
    ).scalar_one_or_none()
    if job is None:
        return None
    commitments = s.execute(
        select(StorageCommitment)
        .where(StorageCommitment.job_id == job_id)
        .options(selectinload(StorageCommitment.items))
        .order_by(StorageCommitment.id)
    ).scalars()
    return JobDetail(
        **_summary_fields(job),  # type: ignore[arg-type]
        reason=job.reason,
        worker_host=job.worker_host,
        queued_at=job.queued_at,
        started_at=job.started_at,
        findings=job.findings or {},
        events=[JobEventOut.model_validate(e) for e in job.events],
        outputs=[OutputOut.model_validate(o) for o in job.outputs],
        deliveries=[
            DeliveryAttemptOut(
                id=d.id,
                destination=d.destination,
                attempt=d.attempt,
                status=d.status,
                status_code=d.status_code,
                error=d.error,
                details=d.details or {},
                started_at=d.started_at,
                finished_at=d.finished_at,
            )
            for d in job.deliveries
        ],
        commitments=[
            StorageCommitmentOut(
                **{k: getattr(c, k) for k in StorageCommitmentOut.model_fields if k != "instances"},
                instances=[CommitmentItemOut.model_validate(i) for i in c.items],
            )
            for c in commitments
        ],
    )


def count_studies(s: Session, *, filters: StudyFilter | None = None) -> int:
    """How many studies :func:`list_studies` pages through with ``filters``."""
    q = select(func.count(Study.id))
    if filters is not None:
        q = q.where(*filters.conditions())
    return int(s.execute(q).scalar_one())


def list_studies(s: Session, *, limit: int = 100, offset: int = 0,
                 filters: StudyFilter | None = None) -> list[StudySummary]:
    """Studies, newest first, optionally narrowed by ``filters``."""
    q = select(Study).options(selectinload(Study.series))
    if filters is not None:
        q = q.where(*filters.conditions())
    studies = list(s.execute(q.order_by(Study.id.desc()).limit(limit).offset(offset)).scalars())
    latest: dict[int, tuple[int, str]] = {}
    if studies:
        rows = s.execute(
            select(Job.study_id, Job.id, Job.state).where(Job.study_id.in_([st.id for st in studies])).order_by(Job.id)
        )
        latest = {study_id: (job_id, state) for study_id, job_id, state in rows}
    out = []
    for st in studies:
        job = latest.get(st.id)
        out.append(
            StudySummary(
                id=st.id,
                study_instance_uid=st.study_instance_uid,
                accession_number=st.accession_number,
                study_date=st.study_date,
                calling_aet=st.calling_aet,
                num_instances=st.num_instances,
                version=st.version,
                job_version=st.job_version,
                first_received_at=st.first_received_at,
                last_received_at=st.last_received_at,
                series=[SeriesSummary.model_validate(x) for x in st.series],
                interrupted_at=st.interrupted_at,
                interrupted_reason=st.interrupted_reason,
                patient_name=st.patient_name,
                patient_id=st.patient_id,
                study_description=st.study_description,
                modalities=_modalities(st),
                latest_job_id=job[0] if job else None,
                latest_job_state=job[1] if job else None,
            )
        )
    return out
