"""Receipts: the append-only, hash-chained, signed log of registrations and their outcomes,
its head, its signing keys and the referrers' disclosures (docs/receipts.md).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None
# New tables only: code from 0007 on still works (it appends no receipts).
supports_code_from = "0007"

MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "receipt",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("referral_id", sa.String(), nullable=True, index=True),
        sa.Column("source", sa.String(), nullable=False, unique=True),
        sa.Column("body", sa.Text(), nullable=False),
    )
    head = op.create_table(
        "receipt_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("entry_hash", sa.String(), nullable=False),
        sa.Column("at", sa.String(), nullable=True),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "entry_hash": "0" * 64, "at": None}])
    op.create_table(
        "receipt_key",
        sa.Column("key_id", sa.String(), primary_key=True),
        sa.Column("public_key", sa.String(), nullable=False),
        sa.Column("sealed_private", sa.LargeBinary(), nullable=True),
        sa.Column("sealed_with", sa.String(), nullable=True),
        sa.Column("created_at", MOMENT, nullable=False),
        sa.Column("retired_at", MOMENT, nullable=True),
    )
    op.create_table(
        "receipt_disclosure",
        sa.Column("referral_id", sa.String(), primary_key=True),
        sa.Column("disclosures", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    for table in ("receipt_disclosure", "receipt_key", "receipt_head", "receipt"):
        op.drop_table(table)
