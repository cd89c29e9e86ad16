"""Referrals walked from submission to `commission_paid`, and the bare lifecycle of the same
shape, each timed on the dev server the bench runs (see bench/__main__.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy.engine import Engine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory

from bench.bare import BareLifecycle, BarePlan
from core.settings import Settings
from devstack.factories import submission_data
from devstack.settings import SETTINGS, signed
from starter.intake import parse_submission, submit_referral
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralState, StaffAction
from workflows.models.values import Action
from workflows.referral import ReferralWorkflow

STEPS = [
    StaffAction(action=Action.CONTACTED, actor="bench"),
    StaffAction(action=Action.ACCEPT, actor="bench"),
    StaffAction(action=Action.APPROVE, actor="bench"),
    StaffAction(action=Action.WON, actor="bench", amount=Decimal("120000"), currency="EUR"),
    StaffAction(action=Action.PAYMENT, actor="bench", amount=Decimal("120000"), reference="INV"),
    StaffAction(action=Action.PAYOUT, actor="bench", reference="VIR"),
]
BARE_QUEUE = "bench-bare"


@dataclass
class Run:
    """What one batch of lifecycles took: wall time and each call's latency."""

    lifecycles: int
    seconds: float = 0.0
    submit_ms: list[float] = field(default_factory=list)
    update_ms: list[float] = field(default_factory=list)
    last_id: str = ""

    @property
    def per_second(self) -> float:
        return self.lifecycles / self.seconds


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50, p95 and p99, in milliseconds to 0.1."""
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))], 1)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99)}


async def submit_one(
    client: Client, engine: Engine, rules: ProgramRules, settings: Settings = SETTINGS
) -> str:
    """A referral for a prospect of its own, submitted as the intake does."""
    data = submission_data(**{"prospect.website": f"b-{uuid.uuid4().hex[:10]}.example"})
    return await submit_referral(client, engine, rules, parse_submission(data), settings)


async def walk_referrals(
    client: Client, engine: Engine, rules: ProgramRules, count: int, queue: str | None = None
) -> Run:
    """`count` referrals at once, each submitted (on `queue`, default the settings') then
    moved by updates to its end."""
    run = Run(count)
    settings = dataclasses.replace(SETTINGS, task_queue=queue or SETTINGS.task_queue)

    async def one() -> None:
        started = time.perf_counter()
        referral_id = await submit_one(client, engine, rules, settings)
        run.submit_ms.append((time.perf_counter() - started) * 1000)
        handle = client.get_workflow_handle(referral_id, result_type=ReferralState)
        for step in STEPS:
            started = time.perf_counter()
            # Signed as the desk signs each action: part of what an update costs.
            _ = await handle.execute_update(ReferralWorkflow.act, signed(referral_id, step))
            run.update_ms.append((time.perf_counter() - started) * 1000)
        await handle.result()
        run.last_id = referral_id

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    run.seconds = time.perf_counter() - started
    return run


def shape_of(history: WorkflowHistory) -> BarePlan:
    """The writes and emails a referral ran after its start and after each update it
    accepted, in order (an activity is counted where it was scheduled)."""
    plan = BarePlan(writes=[0], emails=[0])
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            plan.writes.append(0)
            plan.emails.append(0)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            (plan.emails if name == "send_email" else plan.writes)[-1] += 1
    return plan


async def walk_bare(client: Client, plan: BarePlan, count: int) -> Run:
    """`count` bare lifecycles at once on their own queue (BARE_QUEUE), which a bare worker
    polls (bench/worker_process.py --bare)."""
    run = Run(count)

    async def one() -> None:
        handle = await client.start_workflow(
            BareLifecycle.run, plan, id=f"bare-{uuid.uuid4().hex}", task_queue=BARE_QUEUE
        )
        for step in range(1, plan.updates + 1):
            started = time.perf_counter()
            await handle.execute_update(BareLifecycle.act, step)
            run.update_ms.append((time.perf_counter() - started) * 1000)
        await handle.result()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    run.seconds = time.perf_counter() - started
    return run
