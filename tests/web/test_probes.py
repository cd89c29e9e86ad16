"""What an orchestrator and a log collector see of the web app and the codec server: liveness
apart from readiness, and an access log of route templates, never of the tokens in paths.
(The worker's probes and logs: tests/deploy/test_worker.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import httpx
from fastapi import FastAPI

from core.links import status_token
from core.settings import Settings
from core.temporal import payload_codec
from devstack.factories import submission
from devstack.ports import free_port
from devstack.servers import MailSink, referrals_web
from devstack.settings import SECRET, SETTINGS
from devstack.web import use_sign_in_link
from starter.codec_server import create_codec_app
from starter.intake import submit_referral
from starter.web import create_app
from tests.conftest import Live, in_process
from workflows.models.program import ProgramRules


def asgi(app: FastAPI) -> httpx.AsyncClient:
    return in_process(app, base_url="http://web")


async def test_liveness_holds_while_readiness_says_what_is_down(
    live: Live, rules: ProgramRules
) -> None:
    nowhere = Settings.from_env({**os.environ, "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
    down = create_app(nowhere, rules=rules, engine=live.engine, key=SECRET)
    up = create_app(SETTINGS, rules=rules, engine=live.engine, client=live.client, key=SECRET)
    async with asgi(up) as web:
        assert (await web.get("/livez")).json() == {"status": "ok"}
        ready = await web.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ok",
            "database": "ok",
            "temporal": "ok",
            "receipts": "ok",
        }
    async with asgi(down) as web:
        assert (await web.get("/livez")).status_code == 200  # no restart for a Temporal blip
        unready = await web.get("/readyz")
        assert unready.status_code == 503
        assert unready.json()["database"] == "ok"
        assert unready.json()["temporal"].startswith("unavailable: ")


async def test_the_codec_server_is_alive_without_a_token() -> None:
    app = create_codec_app(payload_codec(SETTINGS), origins=("http://ui",), token="s3cret")
    async with asgi(app) as codec:
        assert (await codec.get("/livez")).json() == {"status": "ok"}
        assert (await codec.post("/decode", json={"payloads": []})).status_code == 401


async def test_the_access_log_names_routes_never_tokens(
    live: Live, mail_sink: MailSink, rules: ProgramRules, tmp_path: Path
) -> None:
    """A status link and a sign-in link opened on `referrals web` (JSON logs): each request is
    logged with its route template, and neither token appears anywhere in the log."""
    site = "https://www.logs-example.example/"
    referral_id = await submit_referral(
        live.client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
    )
    status = status_token(referral_id, SECRET)
    staff = str(rules.staff.emails[0])
    async with referrals_web(
        tmp_path,
        "/livez",
        TEMPORAL_ADDRESS=live.address,
        REFERRALS_DATABASE_URL=live.database_url,
        REFERRALS_SECRET_KEY=SECRET,
        REFERRALS_SMTP_HOST=mail_sink.host,
        REFERRALS_SMTP_PORT=str(mail_sink.port),
        REFERRALS_RATE_LIMIT="off",
        REFERRALS_LOG_FORMAT="json",
    ) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as web:
            assert (await web.get(f"/status/{status}")).status_code == 200
            page = await web.get("/staff/sign-in/not-a-token?lang=en")
            csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
            before = len(mail_sink.sign_in_links(staff))
            asked = {"email": staff, "lang": "en", "csrf": csrf}
            assert (await web.post("/staff/sign-in", data=asked)).status_code == 200
            deadline = time.monotonic() + 20
            while len(links := mail_sink.sign_in_links(staff)) == before:
                assert time.monotonic() < deadline, "no sign-in link arrived"
                await asyncio.sleep(0.05)
            sign_in = links[-1]
            assert (await use_sign_in_link(web, sign_in)).status_code == 303
            await asyncio.sleep(0.5)  # the last lines reach the file
        log = (tmp_path / "web.log").read_text()
    token = re.search(r"/sign-in/([^?]+)", sign_in)
    assert token is not None
    assert status not in log and token.group(1) not in log
    access = [
        entry
        for entry in (json.loads(line) for line in log.splitlines() if line.startswith("{"))
        if entry["logger"] == "referrals.web.access"
    ]
    routes = {(entry["method"], entry["route"], entry["status"]) for entry in access}
    assert ("GET", "/status/{token}", 200) in routes
    assert ("GET", "/staff/sign-in/{token}", 200) in routes
    assert ("POST", "/staff/sign-in/{token}", 303) in routes
    assert ("POST", "/staff/sign-in", 200) in routes
