"""Shared fixtures: real Temporal servers from the installed binaries, never downloads."""

from __future__ import annotations

import asyncio
import dataclasses
import mailbox
import os
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
import yaml
from sqlalchemy import text
from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment

from activities.db import make_engine
from activities.schema import upgrade
from core.actor_assertions import SIGNING_KEY_ENV, TRUSTED_KEYS_ENV, SigningKey, trust
from core.encryption import KEYS_ENV, new_key_entry
from core.program import load_program
from core.settings import DEV_ACTOR_KEY_FILE, Need, Settings, SmtpSettings
from core.temporal import data_converter, payload_codec
from starter.mail_sink import start_sink
from worker import build_webhook_worker, build_worker
from workflows.models import ProgramRules
from workflows.referral import (
    DOMAIN_KEY,
    PRODUCT_KEY,
    PROTECTED_KEY,
    REFERRER_EMAIL_KEY,
    REFERRER_KEY,
    SLA_KEY,
    STAGE_KEY,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Payloads are encrypted in every test with a key of the test run, and links are signed with
# one secret; the CLI and web processes the tests start inherit both.
os.environ.setdefault(KEYS_ENV, new_key_entry())
os.environ.setdefault(Need.SECRET.value, "test-secret-" + "x" * 32)
SECRET = os.environ[Need.SECRET.value]
# Staff actions are signed with a key of the test run, which every worker trusts.
os.environ.setdefault(SIGNING_KEY_ENV, SigningKey.new("tests", "tests").text())
os.environ.setdefault(
    TRUSTED_KEYS_ENV, SigningKey.parse(os.environ[SIGNING_KEY_ENV]).trusted_entry()
)
# The settings of the test process (its environment above; no dev stack files are read from
# tests/): the in-process workers and web apps get these, or a copy with a change.
SETTINGS = Settings.from_env(cwd=ROOT / "tests")
# Workers built without `build_worker` (tests/desk.py) check assertions with the same keys.
trust(SETTINGS.actor_trusted_keys)


def converter() -> DataConverter:
    """The data converter of every client the tests connect: the test run's key."""
    return data_converter(payload_codec(SETTINGS))


def settings_with(sink: MailSink | None = None, **changes: Any) -> Settings:
    """The test settings, sending through `sink` and with `changes` (a task queue…)."""
    if sink is not None:
        changes["smtp"] = sink.settings()
    return dataclasses.replace(SETTINGS, **changes)


SEARCH_ATTRIBUTES: list[SearchAttributeKey[Any]] = [
    STAGE_KEY,
    DOMAIN_KEY,
    REFERRER_KEY,
    REFERRER_EMAIL_KEY,  # still set by referrals started before release 0.3
    PRODUCT_KEY,
    SLA_KEY,
    PROTECTED_KEY,
]


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


# A deleted workflow is gone once the transfer queue's acknowledged level passes the deletion,
# which the server moves every 30 s by default: a test waiting for a deletion (erasure) waited
# that long, and past its limit when the suite loaded the server.
PROMPT_DELETION = 'history.transferProcessorUpdateAckInterval="1s"'


@asynccontextmanager
async def dev_server(
    *dynamic_config: str, search_attributes: bool = True
) -> AsyncIterator[WorkflowEnvironment]:
    """A dev server of its own (in memory), with the contract's search attributes unless told
    otherwise, and `dynamic_config` values (`key=value`) besides PROMPT_DELETION."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES if search_attributes else (),
        data_converter=converter(),
        dev_server_extra_args=[
            arg
            for value in (PROMPT_DELETION, *dynamic_config)
            for arg in ("--dynamic-config-value", value)
        ],
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """The real dev server, with the contract's search attributes registered."""
    async with dev_server() as env:
        yield env


POSTGRES_URL_ENV = "REFERRALS_TEST_POSTGRES_URL"


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 15) -> None:
    """Visibility and activities are asynchronous: poll until `check` holds."""
    for _ in range(int(seconds / 0.2)):
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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


@dataclass
class MailSink:
    """A real SMTP server on loopback that keeps what it receives in a Maildir."""

    host: str
    port: int
    maildir: Path
    # Each message parsed once: the session's sink holds every test's mail, and a bench's
    # thousands, so parsing them all again on every poll would cost seconds a poll.
    _parsed: dict[str, EmailMessage] = field(default_factory=dict, repr=False, compare=False)

    def _delivered(self) -> list[EmailMessage]:
        """Every message, oldest first (by the delivery time in the Maildir key, finer than
        the Date header's second)."""
        box = mailbox.Maildir(self.maildir, create=False)

        def delivered(key: str) -> tuple[int, ...]:
            found = re.match(r"(\d+)\.M(\d+)P\d+Q(\d+)", key)
            return tuple(int(n) for n in found.groups()) if found else ()

        for key in box.keys():
            if key not in self._parsed:
                parsed = message_from_bytes(box.get_bytes(key), policy=policy.default)
                if isinstance(parsed, EmailMessage):
                    self._parsed[key] = parsed
        return [self._parsed[key] for key in sorted(self._parsed, key=delivered)]

    def messages(self) -> list[EmailMessage]:
        return self._delivered()

    def settings(self) -> SmtpSettings:
        return SmtpSettings(host=self.host, port=self.port)

    def sign_in_links(self, to: str) -> list[str]:
        """The paths (with query) of the sign-in links emailed to `to`, oldest first."""
        links = []
        for message in self._delivered():
            if str(message["To"]).lower() != to.lower():
                continue
            body = message.get_body(("plain",))
            text = body.get_content() if body is not None else ""
            for url in re.findall(r"https?://\S+/sign-in/\S+", text):
                links.append(f"{urlsplit(url).path}?{urlsplit(url).query}")
        return links


def csrf_of(page: str) -> str:
    """The CSRF token of the form on `page`."""
    return page.split('name="csrf" value="')[1].split('"')[0]


async def use_sign_in_link(client: httpx.AsyncClient, link: str) -> httpx.Response:
    """What a person does with an emailed sign-in link: open it (a page, which spends
    nothing), then press its button. The answer of the button: 303 and a session, or why not."""
    page = await client.get(link)
    if page.status_code != 200:
        return page
    path = link.partition("?")[0]
    lang = dict(httpx.URL(link).params).get("lang", "en")
    return await client.post(path, data={"csrf": csrf_of(page.text), "lang": lang})


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


REFERRALS = str(BIN / "referrals")


@asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """`app` on a loopback port (uvicorn, in this event loop); its base URL while it runs."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the server stopped"
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@asynccontextmanager
async def referrals_web(workdir: Path, ready: str, **settings: str) -> AsyncIterator[str]:
    """`referrals web` as its own process, with `settings` added to its environment; the base
    URL once `ready` answers 200."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REFERRALS_DEV_MAILDIR", "TEMPORAL_PROFILE", "TEMPORAL_CONFIG_FILE")
    }
    env.update(
        {
            "REFERRALS_PROGRAM": str(ROOT / "program.yaml"),
            "REFERRALS_PUBLIC_URL": base,
            "REFERRALS_SECRET_KEY": "browser-test-secret-" + "x" * 32,
            **settings,
        }
    )
    log_path = workdir / "web.log"
    with log_path.open("wb") as log:
        # Asynchronously, so the in-process worker keeps serving while the server runs.
        process = await asyncio.create_subprocess_exec(
            REFERRALS, "web", "--host", "127.0.0.1", "--port", str(port),
            env=env, cwd=workdir, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            async with httpx.AsyncClient(timeout=2) as http:
                while True:
                    if process.returncode is not None:
                        pytest.fail(f"referrals web exited early:\n{log_path.read_text()}")
                    try:
                        if (await http.get(f"{base}{ready}")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        pytest.fail(
                            f"referrals web never answered {ready}:\n{log_path.read_text()}"
                        )
                    await asyncio.sleep(0.2)
            yield base
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), timeout=10)
                except TimeoutError:
                    process.kill()
                    await process.wait()


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
    signs nothing (tests/test_cli.py)."""
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
