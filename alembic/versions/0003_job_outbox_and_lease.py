"""job outbox and lease

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 16:40:11.503819
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


# SQLite's batch mode rebuilds the table, which a dependent view blocks:
# drop job_status around the change and create it again (same definition).
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
    op.execute("DROP VIEW IF EXISTS job_status")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("source_series_uid", sa.String(length=64), nullable=True))
    op.execute(JOB_STATUS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_status")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("source_series_uid")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("enqueued_at")
    op.execute(JOB_STATUS_VIEW)


