"""Indexes for the staff views at scale: `referrals list` newest first a page at a time, the
dashboard's "last change" stamp, and the figures' reading of the event log by action.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_referral_submitted_at", "referral", ["submitted_at", "referral_id"])
    op.create_index("ix_referral_updated_at", "referral", ["updated_at"])
    op.create_index(
        "ix_referral_event_action", "referral_event", ["action", "referral_id", "outcome", "at"]
    )


def downgrade() -> None:
    op.drop_index("ix_referral_event_action", table_name="referral_event")
    op.drop_index("ix_referral_updated_at", table_name="referral")
    op.drop_index("ix_referral_submitted_at", table_name="referral")
