"""SQLAlchemy 2 typed models: the single source of truth of the node.

The schema is created and changed only by the Alembic migrations in
``alembic/versions``; ``tests/test_migrations.py`` checks that these models and
the migrations agree. ``docs/database.md`` describes the tables for people who
query them directly.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ARRIVAL_ABNORMAL",
    "Arrival",
    "Base",
    "DeliveryAttempt",
    "Instance",
    "Job",
    "JobEvent",
    "Output",
    "Series",
    "StorageCommitment",
    "StorageCommitmentItem",
    "Study",
    "UTCDateTime",
    "utcnow",
]

UID = String(64)
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Timezone-aware current UTC time (all timestamps are stored in UTC)."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timestamps in UTC, returned timezone-aware on every backend (SQLite
    returns naive values for ``DateTime(timezone=True)``)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        dt.datetime: UTCDateTime(),
        dict[str, Any]: JSON,
    }


class Study(Base):
    """A study as received. ``version`` counts arrivals after a job was made.

    Instances received while ``job_version < version`` belong to the pending
    version; the scheduler claims it by setting ``job_version = version``
    atomically and creating the job. An instance arriving after that starts
    ``version + 1`` (a re-analysis), never merging into the claimed one.
    """

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(128))
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    version_started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    version: Mapped[int] = mapped_column(Integer, default=1)
    job_version: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    # The pending version's arrival ended abnormally (see Arrival): the study
    # waits for a complete resend, source verification or an operator.
    # interrupted_at is the cut arrival's last instance; interrupted_reason
    # its outcome (aborted, lost, crashed).
    interrupted_at: Mapped[dt.datetime | None] = mapped_column()
    interrupted_reason: Mapped[str | None] = mapped_column(String(32))

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")

    __table_args__ = (Index("ix_studies_pending", "job_version", "version"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(128))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance; ``path`` is relative to ``storage.root``."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    study_version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))  # dimse | stowrs | pull
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    receive_count: Mapped[int] = mapped_column(Integer, default=1)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One analysis of one study version. State changes go through
    :mod:`pacs_node.jobs.states` so that each one leaves a :class:`JobEvent`."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(24), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    model_profile: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    series_count: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    queued_at: Mapped[dt.datetime | None] = mapped_column()
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    findings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    study_score: Mapped[float | None] = mapped_column(Float)
    # Outbox and lease: enqueued_at is set once the broker accepted the task;
    # a running job whose lease expired (worker lost) is queued again.
    enqueued_at: Mapped[dt.datetime | None] = mapped_column()
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column()
    source_series_uid: Mapped[str | None] = mapped_column(UID)
    # The worker's current stage (load, inference, postprocess, build,
    # delivery), written when it starts; a failed job keeps the stage it
    # failed in. A queued job is in queue_wait (not written).
    stage: Mapped[str | None] = mapped_column(String(24))
    stage_started_at: Mapped[dt.datetime | None] = mapped_column()

    study: Mapped[Study] = relationship(back_populates="jobs")
    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )
    outputs: Mapped[list[Output]] = relationship(
        back_populates="job", order_by="Output.id", cascade="all, delete-orphan"
    )
    deliveries: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="job", order_by="DeliveryAttempt.id", cascade="all, delete-orphan"
    )

    __table_args__ = (UniqueConstraint("study_id", "study_version", name="uq_jobs_study_version"),)


class JobEvent(Base):
    """Audit trail: one row per state change of a job."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(24))
    to_state: Mapped[str] = mapped_column(String(24))
    message: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(255))

    job: Mapped[Job] = relationship(back_populates="events")


class Output(Base):
    """A DICOM object the node produced for a job (SEG, SR, map, overlay).

    UIDs are derived from job id + kind + model version, so re-running a job
    replaces its outputs (same SOP Instance UIDs) instead of duplicating them.
    ``path`` is relative to the node's output directory.
    """

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # seg | sr | map | overlay
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    validation: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="outputs")


class DeliveryAttempt(Base):
    """One attempt to send a job's outputs to one destination.

    ``status`` is ``success``, ``partial`` (some instances refused),
    ``refused`` or ``error`` (destination unreachable, timeout...).
    ``status_code`` is the DIMSE status or HTTP code of the attempt and
    ``details`` holds the status of each instance.
    """

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()

    job: Mapped[Job] = relationship(back_populates="deliveries")


# ---------------------------------------------------------------- storage commitment
class StorageCommitment(Base):
    """One Storage Commitment (Push Model) request to a destination: the
    N-ACTION sent after a delivery and the N-EVENT-REPORT that answers it.

    ``state``: ``pending`` (asked, no report yet), ``committed`` (event type
    1: every instance), ``failed`` (event type 2: some instances failed),
    ``timeout`` (no report within ``commitment_timeout``; a late report still
    updates the row), ``not_supported`` (the destination rejected the SOP
    Class), ``error`` (N-ACTION refused or not answered). ``attempt`` counts
    the requests of one job to one destination. The report may arrive on the
    N-ACTION's association (recorded by the worker) or on one the archive
    opens to the node's SCP (recorded by the node): ``report_association``
    says which.
    """

    __tablename__ = "storage_commitments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    #: AE title of the destination (the reporting association must come from it).
    remote_ae: Mapped[str] = mapped_column(String(16))
    transaction_uid: Mapped[str] = mapped_column(UID, unique=True)
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    #: N-ACTION response status; None when there was no answer.
    status_code: Mapped[int | None] = mapped_column(Integer)
    #: N-EVENT-REPORT Event Type ID (1: all committed, 2: failures exist).
    event_type: Mapped[int | None] = mapped_column(Integer)
    report_association: Mapped[str | None] = mapped_column(String(16))  # same | separate
    error: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    reported_at: Mapped[dt.datetime | None] = mapped_column()

    items: Mapped[list[StorageCommitmentItem]] = relationship(
        back_populates="commitment", order_by="StorageCommitmentItem.id", cascade="all, delete-orphan"
    )


class StorageCommitmentItem(Base):
    """One instance of a :class:`StorageCommitment`: ``status`` is ``pending``,
    ``committed`` or ``failed`` (with the report's Failure Reason, PS3.3 C.14.1.1)."""

    __tablename__ = "storage_commitment_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    commitment_id: Mapped[int] = mapped_column(
        ForeignKey("storage_commitments.id", ondelete="CASCADE"), index=True
    )
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    status: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[int | None] = mapped_column(Integer)

    commitment: Mapped[StorageCommitment] = relationship(back_populates="items")

    __table_args__ = (
        UniqueConstraint("commitment_id", "sop_instance_uid", name="uq_storage_commitment_items_instance"),
    )


#: Arrival outcomes that leave a study interrupted.
ARRIVAL_ABNORMAL = ("aborted", "lost", "crashed")


class Arrival(Base):
    """One association, STOW-RS request or pull that stored instances of a study.

    Written in the same commit as the first instance it stored (so a crash
    leaves it open) and closed when the arrival ends: ``outcome`` is
    ``released`` (normal end), ``aborted`` (A-ABORT received or sent, STOW-RS
    body cut, pull failed), ``lost`` (connection closed without release) or
    ``crashed`` (still open when the node started again); NULL while open.
    ``host``/``pid``/``process`` name the node process that owns it, so a
    start-up only closes arrivals of processes that are gone.
    """

    __tablename__ = "arrivals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))  # dimse | stowrs | pull
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    process: Mapped[str] = mapped_column(String(32))
    opened_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_instance_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column()
    outcome: Mapped[str | None] = mapped_column(String(16), index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (UniqueConstraint("key", "study_id", name="uq_arrivals_key_study"),)
