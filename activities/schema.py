"""Alembic owns the database schema.

`referrals db upgrade` brings a database to the current schema; on PostgreSQL it holds an
advisory lock while it does, so two at once never race (the second waits, then finds nothing
to do). Every other process refuses to start on a database behind its code, with a one-line
message, rather than fail later on a missing table or column.

A database *ahead* of the code is the middle of a rolling deploy: the new release migrated
first, old processes still run and may restart. They start if the schema still serves them:
each migration says the oldest code it serves (`supports_code_from`, kept in the table
`schema_compatibility`), additive migrations (expand) keeping older code in, one that removes
what older code uses (contract, deployed a release later) shutting it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

from activities.db import make_engine
from core.errors import SettingsError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The schema of release 0.1.0, which created its tables without Alembic.
BASELINE = "0001"
# pg_advisory_xact_lock's key for `upgrade` (any constant no other code of ours uses).
MIGRATION_LOCK = 0x5245_4644  # "REFD"


class SchemaOutOfDate(SettingsError):
    """The database is not at the schema this code needs; the message says what to run."""


# Alembic is imported where it works, not here: every process checks the schema when it opens
# the database (the CLI on each command), and that check is one query against the file names.


def _config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    """The newest migration's revision, which starts its file name (`0012_receipts.py`);
    test_migrations holds Alembic's own head to it."""
    names = (path.name for path in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    return max(name.partition("_")[0] for name in names)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate to `revision`; returns (from, to). A database made by 0.1.0 (tables, no
    Alembic version) is first marked as being at the baseline. One transaction, under a
    PostgreSQL advisory lock: of two upgrades at once, the second waits and has nothing left
    to do."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        before = MigrationContext.configure(connection).get_current_revision()
        config = _config(connection)
        tables = set(inspect(connection).get_table_names())
        if before is None and "commission" in tables:
            command.stamp(config, BASELINE)
            before = BASELINE
        command.upgrade(config, revision)
        after = MigrationContext.configure(connection).get_current_revision() or "base"
        _record_compatibility(connection, after)
    return before, after


def _record_compatibility(connection: Connection, revision: str) -> None:
    """The oldest code the schema at `revision` serves, as its migration says (a migration
    that does not say serves its own revision's code only)."""
    if "schema_compatibility" not in inspect(connection).get_table_names():
        return  # before 0008
    script = _scripts().get_revision(revision)
    oldest = getattr(script.module, "supports_code_from", revision) if script else revision
    connection.execute(text("DELETE FROM schema_compatibility"))
    connection.execute(
        text("INSERT INTO schema_compatibility (id, supports_code_from) VALUES (1, :oldest)"),
        {"oldest": oldest},
    )


def supported_code(engine: Engine) -> str | None:
    """The oldest code revision the database serves, as its last `db upgrade` recorded."""
    with engine.connect() as connection:
        if "schema_compatibility" not in inspect(connection).get_table_names():
            return None
        row = connection.execute(text("SELECT supports_code_from FROM schema_compatibility"))
        return row.scalar()


def _descends_from(revision: str, ancestor: str) -> bool:
    """`revision` is `ancestor` or comes after it in this code's migrations."""
    scripts = _scripts()
    current: str | None = revision
    while current is not None:
        if current == ancestor:
            return True
        script = scripts.get_revision(current)
        down = script.down_revision if script else None
        current = down if isinstance(down, str) or down is None else down[0]
    return False


def _known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic's "no such revision"
        return False


def check_schema(engine: Engine) -> None:
    """Refuse a database behind this code, or ahead of it past what it still serves."""
    found = current_revision(engine)
    needed = head_revision()
    if found == needed:
        return
    where = engine.url.render_as_string(hide_password=True)
    if found is None or _known(found):
        state = f"at revision {found}" if found else "not initialised"
        raise SchemaOutOfDate(
            f"the database ({where}) is {state}, this code needs {needed}: "
            "run `referrals db upgrade`"
        )
    oldest = supported_code(engine)
    if oldest is not None and _known(oldest) and _descends_from(needed, oldest):
        return  # a newer release migrated it, additively: this code still works on it
    raise SchemaOutOfDate(
        f"the database ({where}) is at revision {found}, newer than this code ({needed}), and "
        f"serves code from {oldest or found} on: run the newer release"
    )


def open_database(url: str) -> Engine:
    """The engine for `url` (Settings.database()), after checking its schema."""
    engine = make_engine(url)
    check_schema(engine)
    return engine
