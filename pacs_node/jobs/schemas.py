"""Response schemas (separate from the table models), shared by CLI and API."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CommitmentItemOut",
    "DeliveryAttemptOut",
    "JobDetail",
    "JobEventOut",
    "JobSummary",
    "OutputOut",
    "SeriesSummary",
    "StorageCommitmentOut",
    "StudySummary",
]


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: dt.datetime
    from_state: str | None
    to_state: str
    message: str | None
    host: str | None


class JobSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    state: str
    study_instance_uid: str
    study_version: int
    modalities: list[str]
    instance_count: int
    series_count: int
    model_profile: str | None
    attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    study_score: float | None
    error: str | None
    #: Seconds per stage (``queue_wait``, ``load``, ``inference``, ...).
    timings: dict[str, Any] = Field(default_factory=dict)
    #: Number of findings (``findings.count``); None before the job ran.
    findings_count: int | None = None
    accession_number: str | None = None
    source_series_uid: str | None = None
    #: The study's patient and description (PHI: the endpoints need a read token).
    patient_name: str | None = None
    patient_id: str | None = None
    #: DICOM DA, ``YYYYMMDD``.
    study_date: str | None = None
    study_description: str | None = None
    #: Where the job is: ``queue_wait`` (queued), ``load``, ``inference``,
    #: ``postprocess``, ``build``, ``delivery``; for a finished job the last
    #: stage it entered (a failed job: the stage it failed in).
    stage: str | None = None
    stage_started_at: dt.datetime | None = None
    #: The study in the configured viewer (``http.viewer_url``), or None.
    viewer_url: str | None = None


class OutputOut(BaseModel):
    """A DICOM object produced for a job (``path`` relative to the outputs directory)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str
    size_bytes: int
    sha256: str
    validation: str | None
    created_at: dt.datetime


class DeliveryAttemptOut(BaseModel):
    """One attempt to send a job's outputs to one destination."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    destination: str
    attempt: int
    status: str
    status_code: int | None
    error: str | None
    details: dict[str, Any]
    started_at: dt.datetime
    finished_at: dt.datetime | None


class CommitmentItemOut(BaseModel):
    """One instance of a storage commitment request: ``pending``, ``committed`` or
    ``failed`` (with the archive's Failure Reason, PS3.3 C.14.1.1)."""

    model_config = ConfigDict(from_attributes=True)

    sop_class_uid: str
    sop_instance_uid: str
    status: str
    failure_reason: int | None


class StorageCommitmentOut(BaseModel):
    """One Storage Commitment request to a destination after a delivery.

    ``state``: ``pending``, ``committed``, ``failed``, ``timeout``,
    ``not_supported`` or ``error``.
    """

    model_config = ConfigDict(from_attributes=True)

    id: int
    destination: str
    attempt: int
    transaction_uid: str
    state: str
    status_code: int | None
    event_type: int | None
    report_association: str | None
    error: str | None
    requested_at: dt.datetime
    reported_at: dt.datetime | None
    instances: list[CommitmentItemOut] = Field(default_factory=list)


class JobDetail(JobSummary):
    reason: str | None
    worker_host: str | None
    queued_at: dt.datetime | None
    started_at: dt.datetime | None
    findings: dict[str, Any]
    events: list[JobEventOut]
    outputs: list[OutputOut] = Field(default_factory=list)
    deliveries: list[DeliveryAttemptOut] = Field(default_factory=list)
    #: Storage commitment requests after delivery, oldest first.
    commitments: list[StorageCommitmentOut] = Field(default_factory=list)


class SeriesSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    num_instances: int


class StudySummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    calling_aet: str | None
    num_instances: int
    version: int
    job_version: int
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    series: list[SeriesSummary]
    #: Set while the pending version's arrival was cut (aborted, lost,
    #: crashed): the study waits for a complete resend, source verification
    #: or an operator (``interrupted_at``: the cut arrival's last instance).
    interrupted_at: dt.datetime | None = None
    interrupted_reason: str | None = None
    #: PHI, like the rest of the study (the endpoints need a read token).
    patient_name: str | None = None
    patient_id: str | None = None
    study_description: str | None = None
    modalities: list[str] = Field(default_factory=list)
    #: The study's newest job (id and state), None before the first one.
    latest_job_id: int | None = None
    latest_job_state: str | None = None
    #: The study in the configured viewer (``http.viewer_url``), or None.
    viewer_url: str | None = None
