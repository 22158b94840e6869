"""running stage of a job

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

``jobs.stage`` is the stage the worker is in (``load``, ``inference``,
``postprocess``, ``build``, ``delivery``), written when the stage starts,
with ``jobs.stage_started_at``; a failed job keeps the stage it failed in.
The dashboard shows it for a running job.
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Plain ALTER TABLE (not batch mode): on SQLite batch mode would rebuild
# ``jobs``. The view job_status is dropped around the change and created again
# (same definition as in 0004).
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
    op.add_column("jobs", sa.Column("stage", sa.String(length=24), nullable=True))
    op.add_column("jobs", sa.Column("stage_started_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(JOB_STATUS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_status")
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35) keeps every row.
    op.drop_column("jobs", "stage_started_at")
    op.drop_column("jobs", "stage")
    op.execute(JOB_STATUS_VIEW)
