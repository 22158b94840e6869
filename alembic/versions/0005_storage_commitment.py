"""storage commitment

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

One ``storage_commitments`` row per Storage Commitment (Push Model) request
the worker sends to a destination after delivering a job's outputs (its
Transaction UID, state, N-ACTION status, N-EVENT-REPORT event type), and one
``storage_commitment_items`` row per instance asked about (pending, committed
or failed with the report's Failure Reason).
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "storage_commitments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("remote_ae", sa.String(length=16), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("event_type", sa.Integer(), nullable=True),
        sa.Column("report_association", sa.String(length=16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_storage_commitments_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_commitments")),
        sa.UniqueConstraint("transaction_uid", name=op.f("uq_storage_commitments_transaction_uid")),
    )
    with op.batch_alter_table("storage_commitments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_storage_commitments_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_storage_commitments_state"), ["state"], unique=False)

    op.create_table(
        "storage_commitment_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("commitment_id", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("failure_reason", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["commitment_id"], ["storage_commitments.id"],
            name=op.f("fk_storage_commitment_items_commitment_id_storage_commitments"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_commitment_items")),
        sa.UniqueConstraint("commitment_id", "sop_instance_uid", name="uq_storage_commitment_items_instance"),
    )
    with op.batch_alter_table("storage_commitment_items", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_storage_commitment_items_commitment_id"), ["commitment_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("storage_commitment_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_storage_commitment_items_commitment_id"))
    op.drop_table("storage_commitment_items")
    with op.batch_alter_table("storage_commitments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_storage_commitments_state"))
        batch_op.drop_index(batch_op.f("ix_storage_commitments_job_id"))
    op.drop_table("storage_commitments")
