"""Shared fixtures: real Temporal servers from the installed binaries, never downloads."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.db import make_engine
from activities.schema import upgrade
from core.actor_assertions import SIGNING_KEY_ENV
from core.program import load_program
from core.settings import DEV_ACTOR_KEY_FILE
from devstack.ports import free_port, take_share
from devstack.servers import REFERRALS, MailSink, dev_server
from devstack.settings import BIN, ROOT, SETTINGS, converter, settings_with
from starter.mail_sink import start_sink
from worker import build_webhook_worker, build_worker
from workflows.models.program import ProgramRules


def in_process(
    app: Any,
    *,
    peer: str | None = None,
    raise_app_exceptions: bool = True,
    base_url: str = "http://testserver",
) -> httpx.AsyncClient:
    """A browser on `app` in this event loop: no server, no port. `peer`: the address its
    requests come from (the rate limits key on it)."""
    transport = httpx.ASGITransport(
        app=app,
        raise_app_exceptions=raise_app_exceptions,
        client=(peer or "127.0.0.1", 4000),
    )
    return httpx.AsyncClient(transport=transport, base_url=base_url)


@pytest.fixture(scope="session")
def shipped_rules() -> ProgramRules:
    return load_program(ROOT / "program.yaml")


@pytest.fixture(scope="session")
def program_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped program, except that payout closes a referral at once: most tests follow a
    referral to its end, which would otherwise wait out the clawback window (tests of the
    window use `shipped_rules`). The CLI and web app of the tests read this file."""
    data = yaml.safe_load((ROOT / "program.yaml").read_text(encoding="utf-8"))
    data["clawback"] = {"days": 0}
    path = tmp_path_factory.mktemp("program") / "program.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def rules(program_file: Path) -> ProgramRules:
    return load_program(program_file)


@pytest_asyncio.fixture
async def time_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping test server for each test: timers fire as soon as nothing else can
    happen. One per test, because its clock is global: once a workflow has completed, waiting
    on a result can leap it years ahead, or a later sleep stall, for every test after it."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(BIN / "temporal-test-server"),
        data_converter=converter(),
    )
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """The real dev server, with the contract's search attributes registered."""
    async with dev_server() as env:
        yield env


POSTGRES_URL_ENV = "REFERRALS_TEST_POSTGRES_URL"


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs the suite in parallel processes (pytest-xdist). Each takes ports of
    its own and, when the suite runs against PostgreSQL, a database of its own: its tests
    drop and recreate the public schema."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1…
    if worker is None:
        return
    take_share(int(worker.removeprefix("gw")), int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    if url := os.environ.get(POSTGRES_URL_ENV):
        os.environ[POSTGRES_URL_ENV] = own_database(url, worker)


def own_database(url: str, worker: str) -> str:
    """The URL of `url`'s database suffixed with `worker`, created if it is not there yet."""
    given = make_url(url)
    name = f"{given.database}_{worker}"
    server = create_engine(given, isolation_level="AUTOCOMMIT")
    try:
        with server.connect() as connection:
            found = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).first()
            if found is None:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        server.dispose()
    return given.set(database=name).render_as_string(hide_password=False)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 15) -> None:
    """Visibility and activities are asynchronous: poll until `check` holds."""
    for _ in range(int(seconds / 0.2)):
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(
                not os.environ.get(POSTGRES_URL_ENV),
                reason=f"set {POSTGRES_URL_ENV} (.ci/run does) to run against PostgreSQL",
            ),
        ),
    ]
)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A fresh, real database at the current schema: a SQLite file, and PostgreSQL when its
    URL is given."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'referrals.db'}"
    else:
        url = os.environ[POSTGRES_URL_ENV]
    engine = empty_database(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def empty_database(url: str) -> Engine:
    """An engine on `url` with nothing in it (PostgreSQL: the public schema recreated)."""
    engine = make_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    return engine


@pytest.fixture(scope="session")
def mail_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailSink]:
    maildir = tmp_path_factory.mktemp("mail")
    port = free_port()
    controller = start_sink("127.0.0.1", port, maildir)
    yield MailSink("127.0.0.1", port, maildir)
    controller.stop()


@dataclass
class Live:
    """A real worker (real activities) on the dev server, with its database and mail sink."""

    client: Client
    engine: Engine
    database_url: str
    sink: MailSink
    address: str


@pytest_asyncio.fixture(scope="session")
async def live(
    dev_env: WorkflowEnvironment, mail_sink: MailSink, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'referrals.db'}"
    engine = make_engine(url)
    upgrade(engine)
    settings = settings_with(mail_sink)
    worker = build_worker(dev_env.client, engine, settings, queue="referrals")
    webhooks = build_webhook_worker(dev_env.client, engine, settings, queue="referrals")
    async with worker, webhooks:
        yield Live(
            client=dev_env.client,
            engine=engine,
            database_url=url,
            sink=mail_sink,
            address=dev_env.client.service_client.config.target_host,
        )


@dataclass
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Awaitable[Result]]


@pytest.fixture
def cli(live: Live, tmp_path: Path, program_file: Path) -> Cli:
    """`referrals` as a dev stack's CLI: it signs its actions with the stack's key file (here
    the test run's key), whoever --actor names. Without that file or an identity, a CLI
    signs nothing (tests/cli/test_cli.py)."""
    assert SETTINGS.actor_signing_key is not None
    key_file = tmp_path / DEV_ACTOR_KEY_FILE
    key_file.parent.mkdir(exist_ok=True)
    key_file.write_text(SETTINGS.actor_signing_key.text())
    env = {
        **{key: value for key, value in os.environ.items() if key != SIGNING_KEY_ENV},
        "TEMPORAL_ADDRESS": live.address,
        "REFERRALS_DATABASE_URL": live.database_url,
        "REFERRALS_PROGRAM": str(program_file),
        "REFERRALS_ACTOR": "desk-anna",
    }

    async def run(*args: str, env_changes: Mapping[str, str] | None = None) -> Result:
        # Asynchronously, so the in-process worker keeps serving while the CLI waits.
        process = await asyncio.create_subprocess_exec(
            REFERRALS,
            *args,
            env={**env, **(env_changes or {})},
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())

    return run
