"""Paying referrers: payee profiles and their changes, payout runs, their items, the claim
that keeps a payable referral in one live run at a time, the documents runs issue and the
counters that number them (docs/payouts.md).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None
# New tables only: code from 0007 on still works.
supports_code_from = "0007"

MONEY = sa.Numeric(20, 4)
MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "payee",
        sa.Column("email", sa.String(), primary_key=True),
        sa.Column("iban", sa.String(), nullable=False, index=True),
        sa.Column("profile", sa.Text(), nullable=False),
        sa.Column("updated_at", MOMENT, nullable=False),
    )
    op.create_table(
        "payee_event",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("email", sa.String(), nullable=False, index=True),
        sa.Column("at", MOMENT, nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("change", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_table(
        "payout_run",
        sa.Column("run_id", sa.String(), primary_key=True),
        sa.Column("currency", sa.String(), nullable=False),
        sa.Column("cutoff", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False, index=True),
        sa.Column("total", MONEY, nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("created_at", MOMENT, nullable=False),
        sa.Column("updated_at", MOMENT, nullable=False),
    )
    op.create_table(
        "payout_item",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(), nullable=False, index=True),
        sa.Column("payee_email", sa.String(), nullable=False, index=True),
        sa.Column("currency", sa.String(), nullable=False),
        sa.Column("gross", MONEY, nullable=False),
        sa.Column("recovered", MONEY, nullable=False),
        sa.Column("net", MONEY, nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("holds", sa.String(), nullable=False),
        sa.Column("referral_ids", sa.Text(), nullable=False),
        sa.UniqueConstraint("run_id", "payee_email", name="uq_payout_item_payee"),
    )
    op.create_table(
        "payout_claim",
        sa.Column("referral_id", sa.String(), primary_key=True),
        sa.Column("run_id", sa.String(), nullable=False, index=True),
    )
    op.create_table(
        "payout_document",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("run_id", sa.String(), nullable=False, index=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("number", sa.String(), nullable=True, unique=True),
        sa.Column("payee_email", sa.String(), nullable=True, index=True),
        sa.Column("filename", sa.String(), nullable=False),
        sa.Column("media_type", sa.String(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("created_at", MOMENT, nullable=False),
    )
    op.create_table(
        "statement_counter",
        sa.Column("series", sa.String(), primary_key=True),
        sa.Column("year", sa.Integer(), primary_key=True),
        sa.Column("last", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    tables = ("statement_counter", "payout_document", "payout_claim", "payout_item")
    for table in (*tables, "payout_run", "payee_event", "payee"):
        op.drop_table(table)
