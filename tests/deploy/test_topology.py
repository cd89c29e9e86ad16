"""A production-like topology, as processes (the container image and compose run the same
commands): PostgreSQL, a Temporal server, two workers, two web processes and the codec server,
every one configured from one env file. One referral goes from web A's form to
`commission_paid` by the CLI, its emailed status link opening on web B; a worker is stopped
(SIGTERM) mid-lifecycle and the other carries on; a sign-in link used on one web process is
refused on the other; the codec server decodes its history for an operator with the token."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from google.protobuf.json_format import MessageToDict
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from activities.db import make_engine
from activities.queries import load_referral
from core.actor_assertions import SigningKey
from core.encryption import KEYS_ENV, new_key_entry
from devstack.factories import submission_data
from devstack.servers import REFERRALS
from devstack.settings import ROOT
from devstack.web import use_sign_in_link
from tests.conftest import POSTGRES_URL_ENV, Live
from tests.processes import Process
from workflows.models.program import ProgramRules
from workflows.models.referral import Stage

REFERRER = "julie.topology@conseil-martin.example"
WEB_KEY = SigningKey.new("web-1", "web")
MANAGER = "referral-desk-manager@nuage-logiciel.example"  # program.yaml's staff


@pytest.fixture
def database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, dropped afterwards."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if url is None:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_URL_ENV} is not set")
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    name = f"topology_{uuid.uuid4().hex[:8]}"
    server = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(url).set(database=name).render_as_string(hide_password=False)
    with server.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    server.dispose()


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as compose's env_file and a Kubernetes ConfigMap hold them."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.startswith("#")}


async def referrals(env: dict[str, str], *args: str) -> str:
    done = await asyncio.create_subprocess_exec(
        REFERRALS, *args, env={**os.environ, "REFERRALS_ACTOR": "desk-anna", **env}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await done.communicate()
    assert done.returncode == 0, (args, err.decode())
    return out.decode()


async def until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_two_of_each_process_from_one_env_file(
    live: Live, database: str, program_file: Path, rules: ProgramRules, tmp_path: Path
) -> None:
    env_file = tmp_path / "referral-desk.env"
    env_file.write_text(
        "\n".join(
            [
                "# One file for every process of the deployment.",
                f"TEMPORAL_ADDRESS={live.address}",
                f"REFERRALS_TASK_QUEUE=topology-{uuid.uuid4().hex[:8]}",
                f"REFERRALS_DATABASE_URL={database}",
                f"{KEYS_ENV}={new_key_entry()}",
                "REFERRALS_SECRET_KEY=topology-secret-" + "t" * 32,
                "REFERRALS_CODEC_TOKEN=operator-token",
                # The web desk signs its staff's actions; the workers trust its key; the
                # toolbox's CLI, below, signs as the identity it is given.
                f"REFERRALS_ACTOR_SIGNING_KEY={WEB_KEY.text()}",
                f"REFERRALS_ACTOR_KEYS={WEB_KEY.trusted_entry()}",
                f"REFERRALS_PROGRAM={program_file}",
                f"REFERRALS_SMTP_HOST={live.sink.host}",
                f"REFERRALS_SMTP_PORT={live.sink.port}",
                "REFERRALS_PUBLIC_URL=https://referrals.example.com",
                "REFERRALS_RATE_LIMIT=off",
                "REFERRALS_LOG_FORMAT=json",
            ]
        )
        + "\n"
    )
    env = read_env_file(env_file)
    assert "upgraded from empty to" in await referrals(env, "db", "upgrade")
    await referrals(env, "temporal", "setup")
    web_a, web_b = (Process("web", dict(env), tmp_path) for _ in range(2))
    worker_a, worker_b = (Process("worker", dict(env), tmp_path) for _ in range(2))
    codec = Process("codec-server", dict(env), tmp_path)
    everyone = [web_a, web_b, worker_a, worker_b, codec]
    try:
        await asyncio.gather(*(process.start() for process in everyone))
        site = f"https://www.topology-{uuid.uuid4().hex[:8]}.example/"
        data = submission_data(**{"prospect.website": site, "referrer.email": REFERRER})
        async with through_ingress(web_a) as a:
            created = await a.post("/api/referrals", json=data)
        assert created.status_code == 201, created.text
        referral_id = created.json()["referral_id"]

        link = await emailed_status_link(live, referral_id)
        assert link.startswith("https://referrals.example.com/status/")
        async with through_ingress(web_b) as b:
            page = await b.get(link.removeprefix("https://referrals.example.com"))
        assert page.status_code == 200 and referral_id in page.text

        for action in ("contacted", "accept", "approve"):
            await referrals(env, action, referral_id)
        assert await worker_a.stop() == 0  # mid-lifecycle: the other worker carries on
        toolbox = {**env, "REFERRALS_STAFF_IDENTITY": MANAGER, "REFERRALS_ACTOR": ""}
        await referrals(toolbox, "won", referral_id, "--amount", "180000", "--currency", "EUR")
        await referrals(toolbox, "payment", referral_id, "--amount", "180000", "--reference", "I")
        await referrals(toolbox, "payout", referral_id, "--reference", "VIR-1")

        engine = make_engine(database)

        async def paid() -> bool:
            state = await asyncio.to_thread(load_referral, engine, referral_id)
            return state is not None and state.stage is Stage.COMMISSION_PAID

        await until(paid, "the referral never reached commission_paid")
        engine.dispose()

        staff = str(rules.staff.emails[0])
        sign_in = await staff_sign_in_link(live, web_a, staff)
        async with through_ingress(web_a) as a:
            assert (await use_sign_in_link(a, sign_in)).status_code == 303
        async with through_ingress(web_b) as b:
            assert (await use_sign_in_link(b, sign_in)).status_code == 400  # used: everywhere

        history = await live.client.get_workflow_handle(referral_id).fetch_history()
        first = history.events[0].workflow_execution_started_event_attributes.input
        body = MessageToDict(first)
        async with httpx.AsyncClient(base_url=codec.url, timeout=30) as operator:
            refused = await operator.post("/decode", json=body)
            decoded = await operator.post(
                "/decode", json=body, headers={"Authorization": "Bearer operator-token"}
            )
        assert refused.status_code == 401 and decoded.status_code == 200
        [plain] = decoded.json()["payloads"]
        assert json.loads(base64.b64decode(plain["data"]))["referral_id"] == referral_id
    finally:
        codes = await asyncio.gather(*(process.stop() for process in everyone))
    # The workers exit 0 once their activities finished; uvicorn (web, codec server) ends its
    # requests, then leaves by the signal it got, as a stopped process should.
    assert codes[2:4] == [0, 0] and {codes[0], codes[1], codes[4]} <= {0, -signal.SIGTERM}, codes


async def emailed_status_link(live: Live, referral_id: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        for message in live.sink.messages():
            if message["X-Referral-Id"] == referral_id and message["To"] == REFERRER:
                body = message.get_body(("plain",))
                found = re.search(r"https://\S+/status/\S+", body.get_content() if body else "")
                if found:
                    return found.group(0)
        assert time.monotonic() < deadline, "no acknowledgement email"
        await asyncio.sleep(0.2)


class EndsTls(httpx.AsyncBaseTransport):
    """The ingress: the browser speaks https to it (so it sends the web app's https-only
    cookies), and it forwards the request over plain http to the process."""

    def __init__(self) -> None:
        self.forward = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(scheme="http")
        return await self.forward.handle_async_request(request)

    async def aclose(self) -> None:
        await self.forward.aclose()


def through_ingress(web: Process) -> httpx.AsyncClient:
    """A browser at the public URL (https), reaching `web` through the ingress."""
    address = httpx.URL(web.url)
    return httpx.AsyncClient(
        base_url=address.copy_with(scheme="https"), transport=EndsTls(), timeout=30
    )


async def staff_sign_in_link(live: Live, web: Process, staff: str) -> str:
    async with through_ingress(web) as http:
        page = await http.get("/staff/sign-in/not-a-token?lang=en")
        csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        before = len(live.sink.sign_in_links(staff))
        asked = await http.post("/staff/sign-in", data={"email": staff, "lang": "en", "csrf": csrf})
        assert asked.status_code == 200

    async def arrived() -> bool:
        return len(live.sink.sign_in_links(staff)) > before

    await until(arrived, "no sign-in link arrived")
    return live.sink.sign_in_links(staff)[-1]
