"""Alembic owns the database schema.

`referrals db upgrade` brings a database to the current schema. Every other process
refuses to start on an out-of-date one, with a one-line message, rather than fail
later on a missing table or column.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

from activities.db import make_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The schema of release 0.1.0, which created its tables without Alembic.
BASELINE = "0001"


class SchemaOutOfDate(Exception):
    """The database is not at the schema this code needs; the message says what to run."""


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate to `revision`; returns (from, to). A database made by 0.1.0 (tables, no
    Alembic version) is first marked as being at the baseline."""
    before = current_revision(engine)
    with engine.begin() as connection:
        config = _config(connection)
        tables = set(inspect(connection).get_table_names())
        if before is None and "commission" in tables:
            command.stamp(config, BASELINE)
            before = BASELINE
        command.upgrade(config, revision)
    return before, current_revision(engine) or "base"


def check_schema(engine: Engine) -> None:
    found = current_revision(engine)
    needed = head_revision()
    if found != needed:
        state = f"at revision {found}" if found else "not initialised"
        raise SchemaOutOfDate(
            f"the database ({engine.url.render_as_string(hide_password=True)}) is {state}, "
            f"this code needs {needed}: run `referrals db upgrade`"
        )


def open_database(url: str | None = None) -> Engine:
    """The engine for `url` (default REFERRALS_DATABASE_URL), after checking its schema."""
    engine = make_engine(url)
    check_schema(engine)
    return engine
