"""A referral desk for workflow tests: a worker on its own task queue, on the time-skipping test
server, with recording stand-ins registered under the production activity names.

Like Temporal's samples-python tests: the workflow runs for real (sandbox included); the
activities are plain functions that record what they were asked to do, when (workflow time)
and on which attempt, and fail when a test tells them to.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowHistory
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from devstack.settings import signed
from starter.contact_window import contact_window
from starter.intake import parse_submission
from worker import workflow_runner
from workflows.models.ledger import CommissionRecord
from workflows.models.program import ProgramRules
from workflows.models.referral import (
    ActResult,
    ContactWindow,
    EmailRequest,
    ProspectRelease,
    ReferralInput,
    ReferralRecord,
    ReferralState,
    StaffAction,
    Stage,
)
from workflows.models.values import Action
from workflows.referral import ReferralWorkflow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = json.loads((ROOT / "examples" / "referral.json").read_text())
REFERRER_EMAIL = EXAMPLE["referrer"]["email"]
PROSPECT_DOMAIN = "fromagerie-bellevue.example"

# Real seconds to wait for something the worker does asynchronously (an activity after an update).
SETTLE = 10.0
# A Temporal timer starts when the workflow task that set it completes, while the workflow
# computed its duration from that task's start (workflow.now()): it fires at its instant plus
# the few milliseconds the task took, never before. Days-scale timers, so a small slack.
TIMER_SLACK = timedelta(seconds=1)


@dataclass
class Sent:
    """One delivered email: the request, the attempt that delivered it, and its workflow time."""

    request: EmailRequest
    attempt: int
    at: datetime


@dataclass
class Desk:
    """A worker on its own task queue plus recording stand-ins for the referral's activities.

    `failing_email_attempts` makes every email fail that many attempts (transiently);
    `email_failure` decides, per request and attempt, an error to raise instead of sending;
    `failing_writes` makes that many database writes (record_referral) fail first."""

    env: WorkflowEnvironment
    rules: ProgramRules
    task_queue: str = field(default_factory=lambda: f"referrals-test-{uuid.uuid4()}")
    failing_email_attempts: int = 0
    email_failure: Callable[[EmailRequest, int], BaseException | None] | None = None
    failing_writes: int = 0
    write_attempts: int = 0
    emails: list[Sent] = field(default_factory=list)
    email_attempts: list[tuple[str, int, datetime]] = field(default_factory=list)
    ledger: list[CommissionRecord] = field(default_factory=list)
    records: list[ReferralRecord] = field(default_factory=list)
    releases: list[ProspectRelease] = field(default_factory=list)
    handles: list[WorkflowHandle[Any, Any]] = field(default_factory=list)

    # --- activity stand-ins ---------------------------------------------------------------

    def activities(self) -> Sequence[Callable[..., Any]]:
        @activity.defn(name="send_email")
        async def send_email(req: EmailRequest) -> str:
            info = activity.info()
            clock = await self.env.get_current_time()
            self.email_attempts.append((req.key, info.attempt, clock))
            if info.attempt <= self.failing_email_attempts:
                raise RuntimeError(f"SMTP unavailable (attempt {info.attempt})")
            failure = self.email_failure(req, info.attempt) if self.email_failure else None
            if failure is not None:
                raise failure
            self.emails.append(Sent(req, info.attempt, info.current_attempt_scheduled_time))
            return f"<{req.key}@test>"

        @activity.defn(name="record_commission")
        async def record_commission(record: CommissionRecord) -> bool:
            self.ledger.append(record)
            return True

        @activity.defn(name="release_prospect")
        async def release_prospect(release: ProspectRelease) -> None:
            self.releases.append(release)

        @activity.defn(name="record_referral")
        async def record_referral(record: ReferralRecord) -> None:
            self.write_attempts += 1
            if self.write_attempts <= self.failing_writes:
                raise RuntimeError(f"database unavailable (write {self.write_attempts})")
            self.records.append(record)

        return [send_email, record_commission, release_prospect, record_referral]

    def worker(self, workflow: type = ReferralWorkflow, **options: Any) -> Worker:
        """`workflow`: the referral workflow's class (an older release's, in a test of one)."""
        return Worker(
            self.env.client,
            task_queue=self.task_queue,
            workflows=[workflow],
            activities=self.activities(),
            workflow_runner=workflow_runner(),
            **options,
        )

    # --- driving the workflow -------------------------------------------------------------

    async def start(
        self,
        start_signal: StaffAction | None = None,
        window: ContactWindow | None = None,
        indexed: bool = False,
    ) -> tuple[WorkflowHandle[Any, ReferralState], ContactWindow]:
        """`indexed`: the workflow sets its search attributes (not on the time-skipping
        server, which has no custom ones)."""
        referral_id = f"R-{uuid.uuid4().hex[:10].upper()}"
        if window is None:
            received_at = await self.env.get_current_time()
            window = contact_window(received_at, self.rules.calendar, self.rules.contact)
        given = ReferralInput(
            referral_id=referral_id,
            submission=parse_submission(EXAMPLE),
            rules=self.rules,
            contact_window=window,
            index_search_attributes=indexed,
        )
        extra: dict[str, Any] = {}
        if start_signal is not None:
            extra = {"start_signal": "action", "start_signal_args": [start_signal]}
        handle = await self.env.client.start_workflow(
            ReferralWorkflow.run,
            given,
            id=f"referral-{referral_id}-{uuid.uuid4()}",
            task_queue=self.task_queue,
            **extra,
        )
        self.handles.append(handle)
        return handle, window

    # --- what was recorded ----------------------------------------------------------------

    def keys(self) -> list[str]:
        return [sent.request.key for sent in self.emails]

    def sent(self, key: str) -> list[Sent]:
        return [s for s in self.emails if s.request.key == key]

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait (real time) for the worker to get something done."""
        deadline = asyncio.get_running_loop().time() + SETTLE
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; emails: {self.keys()}")
            await asyncio.sleep(0.02)

    async def close_open_workflows(self) -> None:
        for handle in self.handles:
            try:
                await handle.terminate(reason="test over")
            except RPCError:
                pass  # already completed


@asynccontextmanager
async def referral_desk(
    env: WorkflowEnvironment,
    rules: ProgramRules,
    worker_options: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[Desk]:
    """A desk (`options`) and its worker (`worker_options`: a patch activation…)."""
    desk = Desk(env, rules, **options)
    async with desk.worker(**(worker_options or {})):
        try:
            yield desk
        finally:
            # A left-over run would keep timers on the server after its worker is gone, and a
            # workflow task nobody polls stops the server's clock.
            await desk.close_open_workflows()


async def act(
    handle: WorkflowHandle[Any, Any], action: Action, actor: str, **values: Any
) -> ReferralState:
    return await act_on(handle, StaffAction(action=action, actor=actor, **values))


async def act_by_id(
    client: Client, referral_id: str, action: Action, **values: Any
) -> ReferralState:
    """`act` on a referral known by its id, as alice (the integration tests' desk)."""
    handle = client.get_workflow_handle(referral_id)
    return await act_on(handle, StaffAction(action=action, actor="alice", **values))


async def act_on(handle: WorkflowHandle[Any, Any], request: StaffAction) -> ReferralState:
    """The `act` update, signed, then the whole referral (the update answers with where it
    stands only); a timer or a failed email may have changed it again since."""
    done = await handle.execute_update("act", signed(handle.id, request), result_type=ActResult)
    state = await query_state(handle)
    assert state.referral_id == done.referral_id and state.revision >= done.revision
    return state


async def query_state(handle: WorkflowHandle[Any, Any]) -> ReferralState:
    return await handle.query("state", result_type=ReferralState)


async def state_until(
    handle: WorkflowHandle[Any, Any], predicate: Callable[[ReferralState], bool], what: str
) -> ReferralState:
    deadline = asyncio.get_running_loop().time() + SETTLE
    while True:
        state = await query_state(handle)
        if predicate(state):
            return state
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; stage {state.stage}")
        await asyncio.sleep(0.02)


WON_180K: dict[str, Any] = {"amount": Decimal("180000"), "currency": "EUR"}


async def advance(handle: WorkflowHandle[Any, Any], to: Stage) -> ReferralState:
    """Drive a fresh referral to `to` along the happy path, through updates."""
    path: list[tuple[Stage, Action, dict[str, Any]]] = [
        (Stage.CONTACTED, Action.CONTACTED, {}),
        (Stage.QUALIFYING, Action.ACCEPT, {}),
        (Stage.APPROVED, Action.APPROVE, {}),
        (Stage.WON, Action.WON, {**WON_180K, "payment_terms_days": 30}),
        (
            Stage.COMMISSION_PAYABLE,
            Action.PAYMENT,
            {"amount": Decimal("180000"), "reference": "INV-1"},
        ),
    ]
    state = await query_state(handle)
    for stage, action, values in path:
        if state.stage is to:
            break
        state = await act(handle, action, "alice", **values)
        assert state.stage is stage
    assert state.stage is to
    return state


def system_entries(state: ReferralState) -> list[tuple[str, datetime]]:
    """What the timers did: the history entries the workflow wrote itself."""
    return [(h.action, h.at) for h in state.history if h.outcome == "system"]


def assert_fired_at(entries: list[tuple[str, datetime]], expected: list[tuple[str, datetime]]):
    assert [action for action, _ in entries] == [action for action, _ in expected]
    for (action, at), (_, due) in zip(entries, expected, strict=True):
        assert due <= at < due + TIMER_SLACK, f"{action} at {at}, due {due}"


async def sleep_until(env: WorkflowEnvironment, instant: datetime) -> None:
    await env.sleep(instant - await env.get_current_time())


async def final_state(
    env: WorkflowEnvironment, handle: WorkflowHandle[Any, ReferralState]
) -> ReferralState:
    """The result of a referral that closed during the last sleep. Read without the SDK's
    automatic time skipping: waiting on a result lets the test server move its clock to the
    next timer anywhere on it, years ahead at times, and a later sleep may then stall."""
    with env.auto_time_skipping_disabled():
        return await handle.result()


async def run_histories(client: Client, handle: WorkflowHandle[Any, Any]) -> list[WorkflowHistory]:
    """The history of each run of a started workflow, first to latest: a run that continued
    as new names the next."""
    histories = []
    run_id = handle.result_run_id
    while True:
        run = client.get_workflow_handle(handle.id, run_id=run_id)
        histories.append(await run.fetch_history())
        last = histories[-1].events[-1]
        if last.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            return histories
        run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
