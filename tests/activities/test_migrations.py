"""Alembic owns the schema: a 0.1.0 database upgrades with every row intact, the migrations
build exactly the tables the code declares, and nothing runs on an out-of-date schema."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, Table, select, text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from activities.schema import (
    BASELINE,
    MIGRATIONS,
    SchemaOutOfDate,
    check_schema,
    current_revision,
    head_revision,
    supported_code,
    upgrade,
)
from devstack.servers import REFERRALS
from devstack.settings import ROOT
from tests.conftest import POSTGRES_URL_ENV, empty_database

# Rows as release 0.1.0 wrote them, table by table (its schema is the baseline revision).
ROWS_0_1_0 = {
    "commission": [
        {
            "referral_id": "R-OLD0000001",
            "referrer_email": "claire.martin@conseil-martin.example",
            "referrer_name": "Claire Martin",
            "basis_amount": Decimal("180000.0000"),
            "rate": Decimal("0.100000"),
            "amount": Decimal("18000.0000"),
            "currency": "EUR",
            "customer_paid": Decimal("100000.0000"),
            "status": "pending",
            "updated_at": datetime(2026, 11, 20, 10, 0, tzinfo=UTC),
        }
    ],
    "commission_event": [
        {
            "id": 1,
            "event_key": "R-OLD0000001/5",
            "referral_id": "R-OLD0000001",
            "event": "won",
            "status": "pending",
            "customer_paid": Decimal("0.0000"),
            "at": datetime(2026, 11, 19, 9, 0, tzinfo=UTC),
            "actor": "carol",
            "note": "amount 180000.00 EUR",
            "recorded_at": datetime(2026, 11, 19, 9, 0, 1, tzinfo=UTC),
        },
        {
            "id": 2,
            "event_key": "R-OLD0000001/6",
            "referral_id": "R-OLD0000001",
            "event": "payment",
            "status": "pending",
            "customer_paid": Decimal("100000.0000"),
            "at": datetime(2026, 11, 20, 10, 0, tzinfo=UTC),
            "actor": "dave",
            "note": None,
            "recorded_at": datetime(2026, 11, 20, 10, 0, 1, tzinfo=UTC),
        },
    ],
    "sent_email": [
        {
            "key": "R-OLD0000001/referrer/won",
            "message_id": "<abc@nuage-logiciel.example>",
            "recipients": "claire.martin@conseil-martin.example",
            "subject": "Affaire gagnée",
            "sent_at": datetime(2026, 11, 19, 9, 0, 2, tzinfo=UTC),
        }
    ],
    "prospect_claim": [
        {
            "domain": "fromagerie-bellevue.example",
            "referral_id": "R-OLD0000001",
            "claimed_at": datetime(2026, 11, 2, 8, 0, tzinfo=UTC),
        }
    ],
}


def database_0_1_0(engine: Engine) -> None:
    """What 0.1.0 left: its tables (no Alembic version, it used create_all) and rows."""
    upgrade(engine, BASELINE)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
        for name, rows in ROWS_0_1_0.items():
            connection.execute(Table(name, MetaData(), autoload_with=connection).insert(), rows)


def read_back(engine: Engine, name: str) -> list[dict[str, object]]:
    """The table's rows as found in the database, its own column types applied."""
    with engine.connect() as connection:
        table = Table(name, MetaData(), autoload_with=connection)
        result = connection.execute(select(table).order_by(*table.primary_key.columns))
        return [{k: as_written(v) for k, v in row._mapping.items()} for row in result]


def as_written(value: object) -> object:
    """SQLite gives datetimes back without their zone; they were written in UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def db_upgrade(url: str) -> subprocess.CompletedProcess[str]:
    """`referrals db upgrade`, as an operator runs it."""
    env = {**os.environ, "REFERRALS_DATABASE_URL": url}
    return subprocess.run(
        [REFERRALS, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_head_read_from_file_names_is_alembics() -> None:
    """Opening the database compares its revision with the newest migration's file name, not
    with Alembic's graph (too slow to load on every CLI command): the two must agree."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(MIGRATIONS))
    assert head_revision() == scripts.get_current_head()
    for script in scripts.walk_revisions():
        assert Path(script.path).name.startswith(f"{script.revision}_")


def test_migrations_build_exactly_the_declared_tables(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_a_0_1_0_database_upgrades_with_every_row(engine: Engine, tmp_path: Path) -> None:
    url = engine.url.render_as_string(hide_password=False)
    if engine.dialect.name == "sqlite":
        url = f"sqlite:///{tmp_path / 'release-0.1.0.db'}"
    fresh = empty_database(url)
    database_0_1_0(fresh)
    with pytest.raises(SchemaOutOfDate, match="referrals db upgrade"):
        check_schema(fresh)

    done = db_upgrade(url)
    assert done.returncode == 0, done.stderr
    assert "upgraded from 0001 to" in done.stdout
    check_schema(fresh)
    for table, rows in ROWS_0_1_0.items():
        assert read_back(fresh, table) == rows, table
    again = db_upgrade(url)
    assert again.returncode == 0 and "already at the current schema" in again.stdout


def test_nothing_starts_on_an_out_of_date_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    database_0_1_0(empty_database(url))
    assert current_revision(empty_database(url)) is None
    env = {
        **os.environ,
        "REFERRALS_DATABASE_URL": url,
        "REFERRALS_PROGRAM": str(ROOT / "program.yaml"),
        "TEMPORAL_ADDRESS": "127.0.0.1:1",  # never reached: the schema check comes first
    }
    for command in (
        [REFERRALS, "show", "R-OLD0000001"],
        [REFERRALS, "list"],
        [REFERRALS, "commissions"],
        [REFERRALS, "web", "--port", "1"],
        [sys.executable, "-m", "worker"],
    ):
        done = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1, (command, done.stderr)
        assert len(lines) == 1 and "run `referrals db upgrade`" in lines[0], (command, lines)


def newer_release_migrated(engine: Engine, serves_code_from: str) -> None:
    """What a newer release's `db upgrade` leaves: a revision this code does not know, and the
    oldest code its schema serves."""
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        connection.execute(
            text("UPDATE schema_compatibility SET supports_code_from = :oldest"),
            {"oldest": serves_code_from},
        )


def test_an_older_process_starts_on_a_schema_migrated_additively(engine: Engine) -> None:
    """Mid rolling deploy: the new release migrated first. Old processes restarting keep
    working while its migrations were additive (expand), and stop once one was not
    (contract)."""
    head = head_revision()
    assert supported_code(engine) == "0007"  # 0008 only added a table

    newer_release_migrated(engine, serves_code_from=head)
    check_schema(engine)  # this code still works on it

    newer_release_migrated(engine, serves_code_from="9999")
    with pytest.raises(SchemaOutOfDate, match="newer than this code .* run the newer release"):
        check_schema(engine)


def test_two_upgrades_at_once_one_migrates_the_other_waits(tmp_path: Path) -> None:
    """As two `referrals db upgrade` Jobs of a rollout might: on PostgreSQL, the advisory lock
    lets one migrate; the other finds the schema current and does nothing."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if url is None:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_URL_ENV} is not set")
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    empty_database(url).dispose()
    runs = [
        subprocess.Popen(
            [REFERRALS, "db", "upgrade"],
            env={**os.environ, "REFERRALS_DATABASE_URL": url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    said = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], said
    outs = sorted(out for out, _ in said)
    assert "already at the current schema" in outs[0]
    assert f"upgraded from empty to {head_revision()}" in outs[1]
