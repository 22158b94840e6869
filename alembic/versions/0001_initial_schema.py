"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Tables for studies, series, instances, jobs and the job audit trail, and the
read-only view ``job_status`` for people who query job status directly
(see docs/database.md).
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JOB_STATUS_VIEW = """
CREATE VIEW job_status AS
SELECT j.id AS job_id,
       j.state AS state,
       s.study_instance_uid AS study_instance_uid,
       s.accession_number AS accession_number,
       j.study_version AS study_version,
       j.instance_count AS instance_count,
       j.series_count AS series_count,
       j.model_profile AS model_profile,
       j.attempts AS attempts,
       j.worker_host AS worker_host,
       j.created_at AS created_at,
       j.started_at AS started_at,
       j.finished_at AS finished_at,
       j.updated_at AS updated_at,
       j.study_score AS study_score,
       j.error AS error,
       (SELECT e.message FROM job_events e WHERE e.job_id = j.id
         ORDER BY e.id DESC LIMIT 1) AS last_event
FROM jobs j JOIN studies s ON s.id = j.study_id
"""


def upgrade() -> None:
    op.create_table("studies",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("patient_id", sa.String(length=64), nullable=True),
    sa.Column("patient_name", sa.String(length=324), nullable=True),
    sa.Column("accession_number", sa.String(length=64), nullable=True),
    sa.Column("study_date", sa.String(length=8), nullable=True),
    sa.Column("study_description", sa.String(length=128), nullable=True),
    sa.Column("calling_aet", sa.String(length=16), nullable=True),
    sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("version_started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("job_version", sa.Integer(), nullable=False),
    sa.Column("num_instances", sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
    sa.UniqueConstraint("study_instance_uid", name=op.f("uq_studies_study_instance_uid"))
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_studies_last_received_at"), ["last_received_at"], unique=False)
        batch_op.create_index("ix_studies_pending", ["job_version", "version"], unique=False)

    op.create_table("jobs",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("study_version", sa.Integer(), nullable=False),
    sa.Column("state", sa.String(length=24), nullable=False),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("model_profile", sa.String(length=64), nullable=True),
    sa.Column("instance_count", sa.Integer(), nullable=False),
    sa.Column("series_count", sa.Integer(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("worker_host", sa.String(length=255), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("timings", sa.JSON(), nullable=False),
    sa.Column("findings", sa.JSON(), nullable=False),
    sa.Column("study_score", sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_jobs_study_id_studies"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    sa.UniqueConstraint("study_id", "study_version", name="uq_jobs_study_version")
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_study_id"), ["study_id"], unique=False)

    op.create_table("series",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("modality", sa.String(length=16), nullable=True),
    sa.Column("series_number", sa.Integer(), nullable=True),
    sa.Column("series_description", sa.String(length=128), nullable=True),
    sa.Column("body_part_examined", sa.String(length=64), nullable=True),
    sa.Column("num_instances", sa.Integer(), nullable=False),
    sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_series_study_id_studies"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
    sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid"))
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_series_study_id"), ["study_id"], unique=False)

    op.create_table("instances",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
    sa.Column("instance_number", sa.Integer(), nullable=True),
    sa.Column("path", sa.String(length=255), nullable=False),
    sa.Column("size_bytes", sa.BigInteger(), nullable=False),
    sa.Column("sha256", sa.String(length=64), nullable=False),
    sa.Column("study_version", sa.Integer(), nullable=False),
    sa.Column("source", sa.String(length=16), nullable=False),
    sa.Column("calling_aet", sa.String(length=16), nullable=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("receive_count", sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(["series_id"], ["series.id"], name=op.f("fk_instances_series_id_series"), ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_instances_study_id_studies"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid"))
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instances_series_id"), ["series_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_instances_study_id"), ["study_id"], unique=False)

    op.create_table("job_events",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("job_id", sa.Integer(), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("from_state", sa.String(length=24), nullable=True),
    sa.Column("to_state", sa.String(length=24), nullable=False),
    sa.Column("message", sa.Text(), nullable=True),
    sa.Column("host", sa.String(length=255), nullable=True),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events"))
    )
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_events_job_id"), ["job_id"], unique=False)

    op.execute(JOB_STATUS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_status")
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_events_job_id"))

    op.drop_table("job_events")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_study_id"))
        batch_op.drop_index(batch_op.f("ix_instances_series_id"))

    op.drop_table("instances")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_id"))

    op.drop_table("series")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_study_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_state"))

    op.drop_table("jobs")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_pending")
        batch_op.drop_index(batch_op.f("ix_studies_last_received_at"))

    op.drop_table("studies")
