"""Each webhook endpoint's circuit breaker: its failures in a row, and until when it is not
tried (activities/webhooks.py). Shared by every worker, so a dead endpoint costs a few
attempts in all, not a few per delivery.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None
# A new table no older code reads: code from 0007 on still works.
supports_code_from = "0007"


def upgrade() -> None:
    op.create_table(
        "webhook_endpoint",
        sa.Column("url", sa.String(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("open_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("probe_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("url"),
    )


def downgrade() -> None:
    op.drop_table("webhook_endpoint")
