"""Two worker processes (`python -m worker`, configured by their environment as in production)
on one task queue share the referrals, and a referral survives either one being SIGKILLed:
the other carries it on, from the workflow's history, to its end.

The kills land between staff actions, once no activity or workflow task is in flight, so the
referrals are mid-lifecycle and cached in the killed worker (their next workflow task waits
out the sticky queue's schedule-to-start timeout, 10 s, and is then run by the survivor);
a kill with activities in flight (retried after their start-to-close timeouts) is the fault
suite's scenario (faults/scenarios.py, worker_sigkill).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from devstack.factories import submission
from devstack.servers import MailSink
from devstack.settings import settings_with, signed
from faults.driver import lifecycle
from faults.stack import Children, Worker
from starter.intake import submit_referral
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralState, Stage

REFERRALS = 8
HOST = socket.gethostname()


class WorkerProcess(Worker):
    """faults.stack.Worker, whose Temporal identity (the SDK's default, pid@host) is known."""

    @property
    def identity(self) -> str:
        assert self._process is not None, "not running"
        return f"{self._process.pid}@{HOST}"


@pytest.fixture
def children() -> Iterator[Children]:
    spawned = Children()
    yield spawned
    spawned.kill_all()


async def _quiet(client: Client, ids: list[str]) -> None:
    """Until no referral has an activity or workflow task pending (bounds generous for a
    loaded machine: a killed worker's tasks wait out its sticky queue's timeout)."""
    deadline = time.monotonic() + 60
    while True:
        described = await asyncio.gather(*(client.get_workflow_handle(i).describe() for i in ids))
        if not any(
            d.raw_description.pending_activities
            or d.raw_description.HasField("pending_workflow_task")
            for d in described
        ):
            return
        assert time.monotonic() < deadline, "the referrals never settled"
        await asyncio.sleep(0.2)


async def _act(client: Client, ids: list[str], steps: range) -> None:
    """The lifecycle's `steps` for every referral, referrals concurrently."""

    async def one(referral_id: str) -> None:
        handle = client.get_workflow_handle(referral_id)
        for step in steps:
            await handle.execute_update("act", signed(referral_id, lifecycle(referral_id)[step]))

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in ids)), 90)


async def _started_by(client: Client, ids: list[str]) -> list[tuple[str, datetime, str]]:
    """(kind, when, worker identity) of every activity and workflow task the referrals ran. A
    workflow task the server hands back in its answer to the previous one's completion is
    recorded without an identity: it ran on the worker that ran the previous one."""
    kinds = {
        EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED: "activity",
        EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED: "workflow task",
    }
    started = []
    for referral_id in ids:
        history = await client.get_workflow_handle(referral_id).fetch_history()
        previous = ""
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                identity = event.activity_task_started_event_attributes.identity
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                identity = event.workflow_task_started_event_attributes.identity or previous
                previous = identity
            else:
                continue
            at = event.event_time.ToDatetime(tzinfo=UTC)
            started.append((kinds[event.event_type], at, identity))
    return started


async def test_two_workers_share_a_queue_and_survive_either_being_killed(
    dev_env: WorkflowEnvironment,
    engine: Engine,
    mail_sink: MailSink,
    rules: ProgramRules,
    program_file: Path,
    children: Children,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = dev_env.client
    queue = f"two-workers-{uuid.uuid4().hex[:8]}"
    env = {
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": client.namespace,
        "REFERRALS_TASK_QUEUE": queue,
        "REFERRALS_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "REFERRALS_PROGRAM": str(program_file),  # payout closes the referral at once
        "REFERRALS_SMTP_HOST": mail_sink.host,
        "REFERRALS_SMTP_PORT": str(mail_sink.port),
    }
    first, second = (tmp_path / "a", tmp_path / "b")
    first.mkdir()
    second.mkdir()
    a = WorkerProcess(children, first, env)
    b = WorkerProcess(children, second, env)
    await asyncio.gather(a.start(), b.start())
    a1, b1 = a.identity, b.identity

    # Both workers up: submitted and contacted, then everything settles.
    ids = await asyncio.gather(
        *(
            submit_referral(
                client,
                engine,
                rules,
                submission(**{"prospect.website": f"https://two-{uuid.uuid4().hex[:8]}.example/"}),
                settings_with(task_queue=queue),
            )
            for _ in range(REFERRALS)
        )
    )
    referrals = list(ids)
    await _act(client, referrals, range(0, 1))
    await _quiet(client, referrals)

    # A is killed mid-lifecycle: B alone takes them through accept and approve.
    await a.kill()
    a_killed = datetime.now(UTC)
    await _act(client, referrals, range(1, 3))
    await _quiet(client, referrals)

    # A comes back, B is killed: A takes them through won, payment, payout, to the end.
    await a.start()
    a2 = a.identity
    await b.kill()
    b_killed = datetime.now(UTC)
    await _act(client, referrals, range(3, 6))
    finals = await asyncio.wait_for(
        asyncio.gather(
            *(client.get_workflow_handle(i, result_type=ReferralState).result() for i in referrals)
        ),
        60,
    )
    assert [f.stage for f in finals] == [Stage.COMMISSION_PAID] * REFERRALS
    await a.stop()

    started = await _started_by(client, referrals)
    assert {who for _, _, who in started} <= {a1, b1, a2}
    before = Counter(who for kind, at, who in started if kind == "activity" and at < a_killed)
    assert before[a1] > 0 and before[b1] > 0, f"both workers share the activities: {before}"
    between = {who for _, at, who in started if a_killed < at < b_killed}
    after = {who for _, at, who in started if at > b_killed}
    assert between == {b1}, "while A is down, B alone runs the referrals"
    assert after == {a2}, "while B is down, the restarted A alone runs them"
    assert a1 != a2

    # Each email once: the kills lost none and repeated none.
    keys = Counter(
        str(m["X-Idempotency-Key"])
        for m in mail_sink.messages()
        if str(m["X-Referral-Id"]) in set(referrals)
    )
    assert keys and max(keys.values()) == 1, keys
    assert sum(1 for key in keys if key.endswith("/referrer/submitted")) == REFERRALS
