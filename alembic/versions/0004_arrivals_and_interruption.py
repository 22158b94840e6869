"""arrivals and interrupted studies

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

One ``arrivals`` row per association / STOW-RS request / pull that stored
instances of a study, written in the same commit as its first instance row and
closed when the arrival ends. A study whose last arrival was aborted, or was
still open when the node started again (crash), is marked interrupted
(``studies.interrupted_at``) and waits for a normal arrival, the source
archive's completeness check or an operator before it is analysed.
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = "0004"
down_revision = "0003"
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
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("interrupted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("interrupted_reason", sa.String(length=32), nullable=True))
    op.create_table(
        "arrivals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("calling_aet", sa.String(length=16), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("process", sa.String(length=32), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_instance_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"],
            name=op.f("fk_arrivals_study_id_studies"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_arrivals")),
        sa.UniqueConstraint("key", "study_id", name="uq_arrivals_key_study"),
    )
    with op.batch_alter_table("arrivals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_arrivals_study_id"), ["study_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_arrivals_outcome"), ["outcome"], unique=False)
    op.execute(JOB_STATUS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_status")
    with op.batch_alter_table("arrivals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_arrivals_outcome"))
        batch_op.drop_index(batch_op.f("ix_arrivals_study_id"))
    op.drop_table("arrivals")
    # Not batch mode: on SQLite it would rebuild ``studies``, and dropping the
    # old table (foreign keys on) cascades to series, instances and jobs.
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35) keeps every row.
    op.drop_column("studies", "interrupted_reason")
    op.drop_column("studies", "interrupted_at")
    op.execute(JOB_STATUS_VIEW)
