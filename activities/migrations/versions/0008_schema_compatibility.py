"""The oldest code this schema still serves, so that a rolling deploy can migrate first: a
process whose code is older than the database starts if the migrations it does not know were
all additive (expand), and refuses once one removed what it relies on (contract). See
activities/schema.py and docs/deploy.md.

Every migration from this one on says, in `supports_code_from`, the oldest head revision whose
code still works on the schema it leaves: the previous value for an additive migration, its
own revision for one that removes or changes what older code reads or writes.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None
# A new table no older code reads: code from 0007 on still works (it only checks exactly).
supports_code_from = "0007"


def upgrade() -> None:
    op.create_table(
        "schema_compatibility",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("supports_code_from", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("schema_compatibility")
