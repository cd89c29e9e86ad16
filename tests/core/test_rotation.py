"""Key and secret rotation as a rolling deploy does it, across real processes: a web app and a
worker restarted one at a time, each step leaving the two at different steps of the two-phase
rotation (add the new payload key and secret everywhere; then make them current). At every
step a referral submitted through the web app is decoded and handled by the worker, the links
either signs open on the web app, a status link from before the rotation still opens, and
every referrer keeps one ReferrerKey."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import httpx
from temporalio.api.enums.v1 import EventType

from activities.db import make_engine
from activities.queries import load_referral
from activities.schema import upgrade
from core.encryption import CURRENT_ENV, KEYS_ENV, new_key_entry
from core.settings import REFERRER_SECRET_ENV
from devstack.factories import submission_data
from devstack.servers import REFERRALS
from tests.conftest import Live
from tests.processes import Process
from workflows.models.referral import Stage

REFERRER = "claire.rotation@conseil-martin.example"
# The signing secrets before and after the rotation.
ONE, TWO = "secret-one-" + "1" * 32, "secret-two-" + "2" * 32


async def test_a_rolling_rotation_never_fails_a_decode_or_a_link(
    live: Live, program_file: Path, tmp_path: Path
) -> None:
    old_key, new_key = new_key_entry(), new_key_entry()
    old_id, new_id = (entry.partition(":")[0] for entry in (old_key, new_key))
    before = {KEYS_ENV: old_key, "REFERRALS_SECRET_KEY": ONE}
    added = {
        KEYS_ENV: f"{old_key},{new_key}",
        CURRENT_ENV: old_id,
        "REFERRALS_SECRET_KEY": f"{ONE},{TWO}",
        REFERRER_SECRET_ENV: ONE,
    }
    current = {
        **added,
        CURRENT_ENV: new_id,
        "REFERRALS_SECRET_KEY": f"{TWO},{ONE}",
    }
    # A deployment of its own: its database holds a receipt key sealed with its payload keys.
    database_url = f"sqlite:///{tmp_path / 'referrals.db'}"
    engine = make_engine(database_url)
    upgrade(engine)
    shared = {
        "TEMPORAL_ADDRESS": live.address,
        "REFERRALS_DATABASE_URL": database_url,
        "REFERRALS_PROGRAM": str(program_file),
        "REFERRALS_SMTP_HOST": live.sink.host,
        "REFERRALS_SMTP_PORT": str(live.sink.port),
        "REFERRALS_TASK_QUEUE": f"rotation-{uuid.uuid4().hex[:8]}",
        "REFERRALS_RATE_LIMIT": "off",
    }
    web = Process("web", {**shared, **before}, tmp_path)
    worker = Process("worker", {**shared, **before}, tmp_path)
    web.env["REFERRALS_PUBLIC_URL"] = web.url
    worker.env["REFERRALS_PUBLIC_URL"] = web.url
    referrals: list[str] = []
    first_status_link = ""

    async def submit_and_follow() -> None:
        """A referral through the web app; the worker handles it (its acknowledgement is
        sent); its status link and the emailed one open; so does the first referral's."""
        nonlocal first_status_link
        site = f"https://www.rotation-{uuid.uuid4().hex[:8]}.example/"
        data = submission_data(**{"prospect.website": site, "referrer.email": REFERRER})
        async with httpx.AsyncClient(base_url=web.url, timeout=30) as http:
            created = await http.post("/api/referrals", json=data)
            assert created.status_code == 201, created.text
            referral_id, status_url = created.json()["referral_id"], created.json()["status_url"]
            referrals.append(referral_id)
            first_status_link = first_status_link or status_url
            emailed = await acknowledgement_link(live, referral_id)
            for link in (status_url, emailed, first_status_link):
                opened = await http.get(link.removeprefix(web.url))
                assert opened.status_code == 200, (link, opened.status_code)

    try:
        await asyncio.gather(web.start(), worker.start())
        await submit_and_follow()
        await web.restart(**added)  # step 1, web first: the worker knows neither yet
        await submit_and_follow()
        await worker.restart(**added)
        await submit_and_follow()
        await web.restart(**current)  # step 2: the web app encrypts and signs with the new
        await submit_and_follow()
        await worker.restart(**current)
        await submit_and_follow()
        # A referral started under the old key moves on under the new one.
        done = await asyncio.create_subprocess_exec(
            REFERRALS, "--actor", "desk", "contacted", referrals[0],
            env={**os.environ, **shared, **current}, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await done.communicate()
        assert done.returncode == 0, err.decode()
    finally:
        await asyncio.gather(web.stop(), worker.stop())

    state = load_referral(engine, referrals[0])
    assert state is not None and state.stage is Stage.CONTACTED
    keys = set()
    for referral_id in referrals:
        handle = live.client.get_workflow_handle(referral_id)
        failed = [
            event
            async for event in handle.fetch_history_events()
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
        ]
        assert failed == [], (referral_id, failed)
        keys.add(str((await handle.describe()).search_attributes["ReferrerKey"]))
        await handle.terminate(reason="test over")
    assert len(keys) == 1  # one referrer, one ReferrerKey, whatever the step


async def acknowledgement_link(live: Live, referral_id: str, seconds: float = 60) -> str:
    """The status link in the referrer's acknowledgement email, once the worker sent it."""
    deadline = time.monotonic() + seconds
    while True:
        for message in live.sink.messages():
            if message["X-Referral-Id"] == referral_id and message["To"] == REFERRER:
                body = message.get_body(("plain",))
                text = body.get_content() if body is not None else ""
                return next(word for word in text.split() if "/status/" in word)
        assert time.monotonic() < deadline, f"no acknowledgement for {referral_id}"
        await asyncio.sleep(0.2)
