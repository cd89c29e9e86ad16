"""System of record: each referral's current facts and its append-only event log.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "referral",
        sa.Column("referral_id", sa.String(), nullable=False),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("prospect_company", sa.String(), nullable=False),
        sa.Column("prospect_domain", sa.String(), nullable=False),
        sa.Column("product", sa.String(), nullable=False),
        sa.Column("referrer_email", sa.String(), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("contact_deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("contact_sla_breached", sa.Boolean(), nullable=False),
        sa.Column("commission_amount", sa.Numeric(20, 4), nullable=True),
        sa.Column("commission_currency", sa.String(), nullable=True),
        sa.Column("commission_status", sa.String(), nullable=True),
        sa.Column("customer_paid", sa.Numeric(20, 4), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("referral_id"),
    )
    for column in ("product", "prospect_domain", "referrer_email", "stage"):
        op.create_index(f"ix_referral_{column}", "referral", [column])
    op.create_table(
        "referral_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("referral_id", sa.String(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("request_id", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("referral_id", "seq", name="uq_referral_event_seq"),
    )
    op.create_index("ix_referral_event_referral_id", "referral_event", ["referral_id"])


def downgrade() -> None:
    op.drop_table("referral_event")
    op.drop_table("referral")
