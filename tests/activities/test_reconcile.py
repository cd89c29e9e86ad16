"""The nightly reconciliation heartbeats where it is, and a retry resumes there; the CLI's
runs straight through. On a dev server of this module's own: reconcile reads every referral
workflow the server lists, and the shared server holds other tests' referrals."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)

import activities.reconcile
from activities.db import ProspectClaim
from activities.queries import load_referral
from activities.reconcile import ReconcileActivities, reconcile
from activities.records import save_referral
from devstack.factories import referral_input
from devstack.servers import dev_server
from worker import workflow_runner
from workflows.models.program import ProgramRules
from workflows.models.referral import ReconcileReport, ReferralRecord, Stage
from workflows.reconcile import ReconcileWorkflow
from workflows.transitions import initial_state

PAST_GRACE = timedelta(minutes=10)


@pytest_asyncio.fixture(scope="module")
async def temporal() -> AsyncIterator[Client]:
    """This module's own dev server (see above)."""
    async with dev_server(search_attributes=False) as env:
        yield env.client


class Watch(Interceptor):
    """What the reconcile activity did in the worker: the heartbeats it sent, the heartbeat
    details each attempt started with, and how each attempt that failed ended."""

    def __init__(self) -> None:
        self.heartbeats: list[dict[str, Any]] = []
        self.started_with: list[list[Any]] = []
        self.failures: list[BaseException] = []
        self.ended = asyncio.Event()

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _WatchedActivity(next, self)


class _WatchedActivity(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, watch: Watch) -> None:
        super().__init__(next)
        self._watch = watch

    def init(self, outbound: ActivityOutboundInterceptor) -> None:
        super().init(_WatchedHeartbeats(outbound, self._watch))

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        self._watch.started_with.append(list(activity.info().heartbeat_details))
        try:
            return await super().execute_activity(input)
        except BaseException as error:
            self._watch.failures.append(error)
            raise
        finally:
            self._watch.ended.set()


class _WatchedHeartbeats(ActivityOutboundInterceptor):
    def __init__(self, next: ActivityOutboundInterceptor, watch: Watch) -> None:
        super().__init__(next)
        self._watch = watch

    def heartbeat(self, *details: Any) -> None:
        self._watch.heartbeats.extend(details)
        super().heartbeat(*details)


def nightly_worker(client: Client, engine: Engine, watch: Watch, **options: Any) -> Worker:
    queue = f"reconcile-{uuid.uuid4().hex[:6]}"
    return Worker(
        client,
        task_queue=queue,
        workflows=[ReconcileWorkflow],
        activities=[ReconcileActivities(client, engine, queue).reconcile],
        interceptors=[watch],
        workflow_runner=workflow_runner(),
        **options,
    )


def open_referral(engine: Engine, rules: ProgramRules, referral_id: str, age: timedelta) -> None:
    """An open referral whose workflow never started: older than reconcile's grace, it is
    cancelled; younger, left alone (its workflow may be starting)."""
    state = initial_state(referral_input(rules, referral_id))
    state.submitted_at = datetime.now(UTC) - age
    save_referral(
        engine, ReferralRecord(state=state.model_copy(update={"history": []}), events=state.history)
    )


def open_referrals(
    engine: Engine, rules: ProgramRules, count: int, young: Collection[int] = ()
) -> list[str]:
    """`count` open referrals, ids in order; those at the positions in `young` submitted
    now, the others long enough ago to be cancelled."""
    ids = new_ids(count)
    for position, referral_id in enumerate(ids):
        open_referral(engine, rules, referral_id, timedelta(0) if position in young else PAST_GRACE)
    return ids


def new_ids(count: int) -> list[str]:
    prefix = f"R-{uuid.uuid4().hex[:6].upper()}"
    return [f"{prefix}{n:02d}" for n in range(count)]


def count_closes(monkeypatch: pytest.MonkeyPatch, fail_on: int) -> Counter[str]:
    """Calls of the repair that closes a referral, by referral id; call `fail_on` (counted
    from 1) raises instead."""
    real = activities.reconcile._close_lost
    calls: Counter[str] = Counter()

    def counted(engine: Engine, referral_id: str, what: str, now: datetime) -> str:
        calls[referral_id] += 1
        if calls.total() == fail_on:
            raise RuntimeError("injected failure")
        return real(engine, referral_id, what, now)

    monkeypatch.setattr(activities.reconcile, "_close_lost", counted)
    return calls


def count_describes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    real = activities.reconcile._status
    described: Counter[str] = Counter()

    async def counted(client: Client, referral_id: str) -> WorkflowExecutionStatus | None:
        described[referral_id] += 1
        return await real(client, referral_id)

    monkeypatch.setattr(activities.reconcile, "_status", counted)
    return described


async def test_the_nightly_activity_heartbeats_its_progress(
    temporal: Client, engine: Engine, rules: ProgramRules
) -> None:
    ids = open_referrals(engine, rules, 12)
    with Session(engine) as session:
        for n in range(2):
            session.add(
                ProspectClaim(
                    domain=f"stale-{n}.example",
                    referral_id=f"R-GONE{n}",
                    claimed_at=datetime.now(UTC) - PAST_GRACE,
                )
            )
        session.commit()
    watch = Watch()
    async with nightly_worker(temporal, engine, watch) as worker:
        handle = await temporal.start_workflow(
            ReconcileWorkflow.run, id=f"reconcile-{uuid.uuid4()}", task_queue=worker.task_queue
        )
        report = await handle.result()

    assert [(beat["phase"], beat["after"]) for beat in watch.heartbeats] == [
        ("open", ""),
        ("open", ids[9]),
        ("claims", ""),
        ("upgrade", ""),
        ("closed", ""),
        ("webhooks", ""),
    ]
    assert watch.heartbeats[1] == {"phase": "open", "after": ids[9], "checked": 10, "repairs": 10}
    assert watch.heartbeats[-1] == {"phase": "webhooks", "after": "", "checked": 12, "repairs": 14}
    assert (report.checked, len(report.fixed), report.resumed) == (12, 14, "")
    scheduled = [
        event.activity_task_scheduled_event_attributes
        async for event in handle.fetch_history_events()
        if event.HasField("activity_task_scheduled_event_attributes")
    ]
    assert [s.heartbeat_timeout.ToTimedelta() for s in scheduled] == [timedelta(minutes=2)]


async def test_a_retry_resumes_after_the_last_heartbeat(
    temporal: Client, engine: Engine, rules: ProgramRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Young and old referrals in turn, a heartbeat every two; the third repair (the sixth
    referral) fails. The retry starts after the fourth: the fifth and sixth are checked
    again, the first four never."""
    ids = open_referrals(engine, rules, 8, young={0, 2, 4, 6})
    monkeypatch.setattr(activities.reconcile, "HEARTBEAT_EVERY", 2)
    described = count_describes(monkeypatch)
    closed = count_closes(monkeypatch, fail_on=3)
    watch = Watch()
    async with nightly_worker(temporal, engine, watch) as worker:
        report = await temporal.execute_workflow(
            ReconcileWorkflow.run, id=f"reconcile-{uuid.uuid4()}", task_queue=worker.task_queue
        )

    assert [str(failure) for failure in watch.failures] == ["injected failure"]
    assert watch.started_with == [
        [],
        [{"phase": "open", "after": ids[3], "checked": 4, "repairs": 2}],
    ]
    assert [described[i] for i in ids] == [1, 1, 1, 1, 2, 2, 1, 1]
    assert [closed[i] for i in ids] == [0, 1, 0, 1, 0, 2, 0, 1]
    assert report.checked == 8
    assert [line.split(":")[0] for line in report.fixed] == [ids[5], ids[7]]
    assert ids[3] in report.resumed and "open phase" in report.resumed

    # The state a clean run leaves: the old ones cancelled once, the young ones still open.
    for position, referral_id in enumerate(ids):
        state = load_referral(engine, referral_id)
        assert state is not None
        if position % 2:
            assert state.stage is Stage.CANCELLED
            assert [entry.action for entry in state.history] == ["submitted", "cancel"]
        else:
            assert state.stage is Stage.SUBMITTED and state.closed_at is None
    assert (await reconcile(temporal, engine, "unused")).fixed == []


async def test_cancelling_the_nightly_run_stops_the_activity(
    temporal: Client, engine: Engine, rules: ProgramRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = open_referrals(engine, rules, 10, young=set(range(10)))
    monkeypatch.setattr(activities.reconcile, "HEARTBEAT_EVERY", 1)
    real = activities.reconcile._status
    described: Counter[str] = Counter()
    workflow_id = f"reconcile-{uuid.uuid4()}"

    async def cancel_at_the_third(
        client: Client, referral_id: str
    ) -> WorkflowExecutionStatus | None:
        """A describe that takes a while, as on a busy cluster; the third cancels the run."""
        described[referral_id] += 1
        if referral_id == ids[2]:
            handle = temporal.get_workflow_handle(workflow_id)
            await handle.cancel()
            with pytest.raises(WorkflowFailureError):
                await handle.result()
        await asyncio.sleep(0.1)
        return await real(client, referral_id)

    monkeypatch.setattr(activities.reconcile, "_status", cancel_at_the_third)
    watch = Watch()
    # Heartbeats sent every 50 ms at most, not every minute: the cancellation arrives in time.
    fast = {"max_heartbeat_throttle_interval": timedelta(milliseconds=50)}
    async with nightly_worker(temporal, engine, watch, **fast) as worker:
        handle = await temporal.start_workflow(
            ReconcileWorkflow.run, id=workflow_id, task_queue=worker.task_queue
        )
        await asyncio.wait_for(watch.ended.wait(), 15)

    assert (await handle.describe()).status is WorkflowExecutionStatus.CANCELED
    assert [type(failure) for failure in watch.failures] == [asyncio.CancelledError]
    assert sum(described.values()) < len(ids)


async def test_the_cli_runs_straight_through_in_id_order(
    temporal: Client, engine: Engine, rules: ProgramRules
) -> None:
    """No activity here, as in `referrals reconcile`: nothing to heartbeat or resume."""
    ids = new_ids(5)
    for referral_id in reversed(ids):  # stored newest first: the order is reconcile's own
        open_referral(engine, rules, referral_id, PAST_GRACE)
    report: ReconcileReport = await reconcile(temporal, engine, "unused")

    assert [line.split(":")[0] for line in report.fixed] == ids
    assert (report.checked, report.resumed) == (5, "")
