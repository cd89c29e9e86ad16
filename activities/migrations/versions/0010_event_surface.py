"""Who acted, proven: each event of a referral's log keeps the surface that signed its actor
(`web`, `toolbox`…) or "unauthenticated" (core/actor_assertions.py); NULL for the workflow's
own events and for those recorded before release 0.8.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None
# A new nullable column no older code reads or writes: code from 0007 on still works.
supports_code_from = "0007"


def upgrade() -> None:
    with op.batch_alter_table("referral_event") as table:
        table.add_column(sa.Column("surface", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("referral_event") as table:
        table.drop_column("surface")
