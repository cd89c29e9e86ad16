"""The worker process: SIGTERM lets the activity in flight finish before it exits."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import uuid

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlmodel import Session as DbSession
from sqlmodel import select

from activities.db import SentEmail
from starter.intake import submit_referral
from tests.conftest import ROOT, Live, free_port
from tests.factories import submission
from workflows.models import ProgramRules


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


async def test_sigterm_drains_the_activity_in_flight(
    live: Live, rules: ProgramRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    smtp = SlowServer()
    port = free_port()
    controller = Controller(smtp, hostname="127.0.0.1", port=port)
    controller.start()
    queue = f"drain-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REFERRALS_TASK_QUEUE", queue)
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
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert worker.stdout is not None
        while b"worker polling" not in await asyncio.wait_for(worker.stdout.readline(), 30):
            pass
        site = f"https://drain-{uuid.uuid4().hex[:8]}.example/"
        referral_id = await submit_referral(
            live.client, live.engine, rules, submission(**{"prospect.website": site})
        )
        assert await asyncio.to_thread(smtp.arriving.wait, 30)
        worker.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(worker.stdout.read(), 60)).decode()
        assert await worker.wait() == 0, output
    finally:
        if worker.returncode is None:
            worker.kill()
        controller.stop()
    assert "finishing in-flight activities" in output and "worker stopped" in output
    assert len(smtp.accepted) == 1  # the message in flight was delivered, nothing after it
    with DbSession(live.engine) as session:
        sent = session.exec(
            select(SentEmail).where(SentEmail.key == f"{referral_id}/referrer/submitted")
        ).all()
    assert len(sent) == 1  # and recorded as sent: a restarted worker will not send it again
    await live.client.get_workflow_handle(referral_id).terminate(reason="test over")
