"""Erasure: when a referral's personal data was replaced by a pseudonym.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("referral") as table:
        table.add_column(sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
        table.create_index("ix_referral_erased_at", ["erased_at"])


def downgrade() -> None:
    with op.batch_alter_table("referral") as table:
        table.drop_index("ix_referral_erased_at")
        table.drop_column("erased_at")
