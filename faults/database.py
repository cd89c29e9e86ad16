"""The system of record under test, and how the suite takes it away.

PostgreSQL when REFERRALS_TEST_POSTGRES_URL is set: in a database (or schema) of the suite's
own, since the pytest suite recreates `public` in the configured one and sharing it would
race; the worker reaches it through a cuttable proxy. Otherwise SQLite, where "unavailable"
is a writer holding an exclusive lock longer than the worker's busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from activities.db import make_engine
from activities.schema import upgrade
from devstack.ports import free_port
from faults.proxy import CuttableProxy
from faults.stack import process_running

POSTGRES_URL_ENV = "REFERRALS_TEST_POSTGRES_URL"
PREFIX = "referral_faults_"
# Taking the SQLite lock waits this long for a writer in the middle of a transaction.
LOCK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Backend:
    """Where scenario databases live. PostgreSQL: a database created for this run, or, when
    the role may not create one, a schema of its own in the configured database (never
    `public`, which the pytest suite drops). SQLite: a file in each scenario's directory."""

    postgres: URL | None
    schema: str | None = None
    configured: URL | None = None

    @property
    def name(self) -> str:
        if self.postgres is None:
            return "sqlite"
        return f"postgresql ({self.postgres.database}" + (
            f", schema {self.schema})" if self.schema else ")"
        )

    @classmethod
    def from_env(cls, force_sqlite: bool = False) -> Backend:
        configured = os.environ.get(POSTGRES_URL_ENV)
        if force_sqlite or not configured:
            return cls(None)
        return cls(None, configured=make_url(configured))

    def prepare(self) -> Backend:
        """The backend to use, with its database (or schema) created empty."""
        if self.configured is None:
            return self
        name = f"{PREFIX}{os.getpid()}"
        try:
            with _admin(self.configured) as connection:
                for stale in _left_behind(connection) | {name}:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)'))
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            return Backend(self.configured.set(database=name), configured=self.configured)
        except SQLAlchemyError:
            url = self.configured.update_query_dict({"options": f"-csearch_path={name}"})
            return Backend(url, schema=name, configured=self.configured)

    def reset(self, engine: Engine) -> None:
        """Empty the scenario's database before it starts."""
        schema = self.schema or "public"
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop(self) -> None:
        if self.postgres is None or self.configured is None:
            return
        if self.schema is not None:
            engine = create_engine(self.configured)
            try:
                with engine.begin() as connection:
                    connection.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            finally:
                engine.dispose()
            return
        with _admin(self.configured) as connection:
            connection.execute(
                text(f'DROP DATABASE IF EXISTS "{self.postgres.database}" WITH (FORCE)')
            )


def _left_behind(connection: Connection) -> set[str]:
    """Databases of earlier runs that were killed before they could drop them (their
    process is gone): nothing else would ever remove them."""
    names = connection.execute(
        text("SELECT datname FROM pg_database WHERE datname LIKE :prefix"),
        {"prefix": PREFIX + "%"},
    ).scalars()
    stale = set()
    for name in names:
        pid = name.removeprefix(PREFIX)
        if pid.isdigit() and not process_running(int(pid)):
            stale.add(name)
    return stale


@contextlib.contextmanager
def _admin(configured: URL) -> Iterator[Connection]:
    """A connection to the server's `postgres` database, outside any transaction (CREATE
    and DROP DATABASE cannot run inside one)."""
    engine = create_engine(configured.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


class ScenarioDatabase:
    """An empty database at the current schema; the harness's engine is direct, the
    worker's URL goes through the proxy (PostgreSQL)."""

    def __init__(self, backend: Backend, workdir: Path) -> None:
        self.backend = backend
        self.proxy: CuttableProxy | None = None
        self._lock: sqlite3.Connection | None = None
        if backend.postgres is None:
            self.path: Path | None = workdir / "referrals.db"
            self.url = f"sqlite:///{self.path}"
            self.worker_url = self.url
        else:
            self.path = None
            target = backend.postgres
            self.url = target.render_as_string(hide_password=False)
            self.proxy = CuttableProxy(
                "127.0.0.1", free_port(), target.host or "127.0.0.1", target.port or 5432
            )
            self.worker_url = target.set(
                host="127.0.0.1", port=self.proxy.listen_port
            ).render_as_string(hide_password=False)
        self.engine = make_engine(self.url)

    async def start(self) -> None:
        if self.backend.postgres is not None:
            await asyncio.to_thread(self.backend.reset, self.engine)
        await asyncio.to_thread(upgrade, self.engine)
        if self.proxy is not None:
            await self.proxy.start()

    # --- the fault -------------------------------------------------------------------------

    @property
    def unavailable(self) -> bool:
        return self._lock is not None or (self.proxy is not None and self.proxy.is_cut)

    def make_unavailable(self) -> str:
        """Take the database away from the worker; returns how, for the report. Synchronous,
        so it can land at an exact point of an SMTP exchange (the SMTP server's hook)."""
        if self.proxy is not None:
            self.proxy.cut_now()
            return "PostgreSQL proxy cut"
        assert self.path is not None
        connection = sqlite3.connect(
            self.path, timeout=LOCK_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute("BEGIN EXCLUSIVE")
        except sqlite3.Error:
            connection.close()
            raise
        self._lock = connection
        return "SQLite BEGIN EXCLUSIVE"

    async def make_available(self) -> None:
        if self.proxy is not None:
            await self.proxy.restore()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()

    async def close(self) -> None:
        await self.make_available()
        if self.proxy is not None:
            await self.proxy.cut()
        self.engine.dispose()
