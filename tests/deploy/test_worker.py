"""The worker process: SIGTERM lets the activity in flight finish before it exits, its probes
say when it is ready (and that it is not while it drains), and its activities log at INFO."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import uuid

import httpx
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlmodel import Session as DbSession
from sqlmodel import select

from activities.db import SentEmail
from devstack.factories import submission
from devstack.ports import free_port
from devstack.settings import ROOT, settings_with
from starter.intake import submit_referral
from tests.conftest import Live
from workflows.models.program import ProgramRules


class SlowServer:
    """Takes its time over DATA, like a loaded mail relay; says when a message is arriving."""

    def __init__(self) -> None:
        self.arriving = threading.Event()
        self.accepted: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.arriving.set()
        await asyncio.sleep(3)
        self.accepted.append(envelope.original_content or b"")
        return "250 accepted"


async def probe(port: int, path: str) -> tuple[int, dict[str, str]]:
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(f"http://127.0.0.1:{port}{path}")
    return answer.status_code, answer.json()


async def test_sigterm_drains_the_activity_in_flight(live: Live, rules: ProgramRules) -> None:
    smtp = SlowServer()
    port = free_port()
    controller = Controller(smtp, hostname="127.0.0.1", port=port)
    controller.start()
    queue = f"drain-{uuid.uuid4().hex[:8]}"
    health = free_port()
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        cwd=ROOT,
        env={
            **os.environ,
            "TEMPORAL_ADDRESS": live.address,
            "REFERRALS_TASK_QUEUE": queue,
            "REFERRALS_DATABASE_URL": live.database_url,
            "REFERRALS_PROGRAM": str(ROOT / "program.yaml"),
            "REFERRALS_SMTP_HOST": "127.0.0.1",
            "REFERRALS_SMTP_PORT": str(port),
            "REFERRALS_HEALTH_PORT": str(health),
            "REFERRALS_HEALTH_HOST": "127.0.0.1",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        stdout = worker.stdout
        assert stdout is not None
        seen: list[bytes] = []

        async def until(said: bytes) -> None:
            """Read the worker's output up to the line holding `said`, keeping every line."""
            while True:
                line = await asyncio.wait_for(stdout.readline(), 30)
                assert line, b"".join(seen).decode()
                seen.append(line)
                if said in line:
                    return

        await until(b"worker polling")
        assert await probe(health, "/livez") == (200, {"status": "ok"})
        ready = {
            "status": "ok",
            "polling": "ok",
            "temporal": "ok",
            "database": "ok",
            "receipts": "ok",
        }
        assert await probe(health, "/readyz") == (200, ready)
        site = f"https://drain-{uuid.uuid4().hex[:8]}.example/"
        referral_id = await submit_referral(
            live.client,
            live.engine,
            rules,
            submission(**{"prospect.website": site}),
            settings_with(task_queue=queue),
        )
        assert await asyncio.to_thread(smtp.arriving.wait, 30)
        worker.send_signal(signal.SIGTERM)
        await until(b"finishing in-flight")
        # Draining (the relay takes 3 s over the message): alive, no longer ready.
        status, said = await probe(health, "/readyz")
        assert (status, said["polling"]) == (503, "not polling")
        assert (await probe(health, "/livez"))[0] == 200
        rest = await asyncio.wait_for(stdout.read(), 60)
        output = b"".join([*seen, rest]).decode()
        assert await worker.wait() == 0, output
    finally:
        if worker.returncode is None:
            worker.kill()
        controller.stop()
    assert "worker stopped" in output
    # The activities' own log lines, at INFO (no address in them).
    assert f"INFO temporalio.activity: email {referral_id}/referrer/submitted sent" in output
    assert "INFO temporalio.activity: recorded at stage submitted" in output
    assert len(smtp.accepted) == 1  # the message in flight was delivered, nothing after it
    with DbSession(live.engine) as session:
        sent = session.exec(
            select(SentEmail).where(SentEmail.key == f"{referral_id}/referrer/submitted")
        ).all()
    assert len(sent) == 1  # and recorded as sent: a restarted worker will not send it again
    await live.client.get_workflow_handle(referral_id).terminate(reason="test over")
