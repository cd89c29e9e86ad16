"""Commission lines (an append-only ledger) and each referral's end of protection.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "commission_line",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("line_key", sa.String(), nullable=False),
        sa.Column("referral_id", sa.String(), nullable=False),
        sa.Column("referrer_email", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("amount", sa.Numeric(20, 4), nullable=False),
        sa.Column("currency", sa.String(), nullable=False),
        sa.Column("reference", sa.String(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("line_key"),
    )
    op.create_index("ix_commission_line_referral_id", "commission_line", ["referral_id"])
    op.create_index("ix_commission_line_referrer_email", "commission_line", ["referrer_email"])
    with op.batch_alter_table("referral") as table:
        table.add_column(sa.Column("protected_until", sa.DateTime(timezone=True), nullable=True))
        table.create_index("ix_referral_protected_until", ["protected_until"])


def downgrade() -> None:
    with op.batch_alter_table("referral") as table:
        table.drop_index("ix_referral_protected_until")
        table.drop_column("protected_until")
    op.drop_table("commission_line")
