"""Referrals submitted and driven through their lifecycle the way staff would drive them.

Staff actions go through the CLI's own code path (`starter.staff_client.send_action`, the staff
desk's too) with a request id chosen here, and a timeout is retried with the same request
id: the documented safe retry. So what the suite proves is what a staff member retrying a
command would get.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from core.settings import Settings
from starter.actions import Refused
from starter.intake import parse_submission, submit_referral
from starter.staff_client import send_action
from workflows.models.program import ProgramRules
from workflows.models.referral import ActResult, ReferralState, StaffAction, Stage
from workflows.models.values import MONEY_ACTIONS, Action
from workflows.referral import ReferralWorkflow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "referral.json"
ACTOR = "fault-suite"
DEAL_AMOUNT = Decimal("120000")
CURRENCY = "EUR"
FINAL_STAGE = Stage.COMMISSION_PAID
# One attempt of a staff action; a timeout is retried with the same request id.
ATTEMPT_SECONDS = 15.0
# How long one staff action may take through every fault and retry before the suite gives up.
ACTION_DEADLINE_SECONDS = 240.0
# Temporal errors that mean "not now", never "no".
TRANSIENT_RPC = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.UNKNOWN,
        RPCStatusCode.INTERNAL,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
    }
)
TRANSIENT_REFUSALS = ("no worker answered", "was accepted but not yet recorded")


class DriveError(RuntimeError):
    """A referral could not be driven (refused, or stuck past every deadline)."""


def lifecycle(referral_id: str) -> list[StaffAction]:
    """contacted → accept → approve → won → payment in full → payout."""
    return [
        StaffAction(action=Action.CONTACTED, actor=ACTOR),
        StaffAction(action=Action.ACCEPT, actor=ACTOR),
        StaffAction(action=Action.APPROVE, actor=ACTOR),
        StaffAction(action=Action.WON, actor=ACTOR, amount=DEAL_AMOUNT, currency=CURRENCY),
        StaffAction(
            action=Action.PAYMENT, actor=ACTOR, amount=DEAL_AMOUNT, reference=f"INV-{referral_id}"
        ),
        StaffAction(action=Action.PAYOUT, actor=ACTOR, reference=f"PAYOUT-{referral_id}"),
    ]


@dataclass
class Referral:
    referral_id: str
    referrer_email: str
    index: int
    request_ids: list[str] = field(default_factory=list)
    deliveries: int = 0  # every update or signal sent, retries and duplicates included
    retries: int = 0  # deliveries repeated because the previous one timed out or failed
    final: ReferralState | None = None
    closed_at: datetime | None = None
    error: str | None = None


@dataclass(frozen=True)
class UpdateTiming:
    """One staff update: when it was sent, and how long until it was answered, every retry
    with its request id included (what the staff member waited)."""

    sent_at: datetime
    seconds: float


@dataclass
class DriveStats:
    applied: int = 0
    duplicates_sent: int = 0
    moot: int = 0  # duplicates that found the referral already completed
    retries: int = 0


def _transient(error: BaseException) -> bool:
    if isinstance(error, Refused):
        return any(text in str(error) for text in TRANSIENT_REFUSALS)
    if isinstance(error, RPCError):
        return error.status in TRANSIENT_RPC
    return isinstance(error, WorkflowUpdateRPCTimeoutOrCancelledError | RPCTimeoutOrCancelledError)


def _closed_refusal(error: BaseException, referral_id: str) -> bool:
    """What a delivery to a referral that already completed gets: harmless for a duplicate."""
    if isinstance(error, Refused):
        return str(error).startswith(f"referral {referral_id} is closed")
    if isinstance(error, RPCError):
        return error.status == RPCStatusCode.NOT_FOUND and "completed" in error.message
    return False


class Batch:
    """Referrals driven concurrently; scenarios wait on its progress to inject faults
    mid-flight."""

    def __init__(
        self,
        client: Client,
        engine: Engine,
        rules: ProgramRules,
        settings: Settings,
        tag: str,
        seed: int,
    ) -> None:
        """`settings`: the intake's (the task queue, the secret) and the database the CLI's
        code reads when it explains a refusal."""
        self.client = client
        self.engine = engine
        self.rules = rules
        self.settings = settings
        self.tag = tag
        self.referrals: list[Referral] = []
        self.stats = DriveStats()
        self.updates: list[UpdateTiming] = []
        self.driving_ended_at: datetime | None = None
        self._random = random.Random(seed)
        self._progress = asyncio.Condition()
        self._driving_done = False
        self._steps_total = 0

    # --- submission ------------------------------------------------------------------------

    async def submit(self, count: int, special_referrer: str | None = None) -> None:
        """`count` referrals, each for its own prospect; the first one gets
        `special_referrer` as its referrer's address when given."""
        data = json.loads(EXAMPLE.read_text(encoding="utf-8"))

        async def one(index: int) -> Referral:
            submission = json.loads(json.dumps(data))
            submission["prospect"]["website"] = (
                f"https://www.{self.tag}-{index}-{uuid.uuid4().hex[:8]}.example/"
            )
            if index == 0 and special_referrer is not None:
                submission["referrer"]["email"] = special_referrer
            parsed = parse_submission(submission, self.rules)
            referral_id = await submit_referral(
                self.client,
                self.engine,
                self.rules,
                parsed,
                self.settings,
                submitted_by="fault-suite-intake",
            )
            return Referral(referral_id, str(parsed.referrer.email), index)

        self.referrals = list(await asyncio.gather(*(one(i) for i in range(count))))
        self._steps_total = count * len(lifecycle("x"))

    # --- driving ---------------------------------------------------------------------------

    async def drive(self, duplicates: bool = False) -> None:
        """Every referral through the lifecycle, concurrently, each at its own pace."""
        try:
            await asyncio.gather(*(self._drive_one(r, duplicates) for r in self.referrals))
        finally:
            self.driving_ended_at = datetime.now(UTC)
            async with self._progress:
                self._driving_done = True
                self._progress.notify_all()

    async def _drive_one(self, referral: Referral, duplicates: bool) -> None:
        rid = referral.referral_id
        for step, request in enumerate(lifecycle(rid)):
            request.request_id = f"{self.tag}-{rid}-{step}-{request.action.value}"
            referral.request_ids.append(request.request_id)
            # Staff do not all click at once: a little spread keeps stages mixed mid-flight.
            await asyncio.sleep(self._random.uniform(0.0, 0.4))
            if duplicates:
                await self._deliver_three_times(referral, request, race=referral.index % 2 == 0)
            else:
                await self._update(referral, request)
            async with self._progress:
                self.stats.applied += 1
                self._progress.notify_all()

    async def _deliver_three_times(
        self, referral: Referral, request: StaffAction, race: bool
    ) -> None:
        """The update, a signal with the same request id (racing it, or after it), and the
        update again with the same id: the action must be applied exactly once. A signal
        proves no actor and cannot move money: a money action goes by update each time."""

        async def second() -> None:
            if request.action in MONEY_ACTIONS:
                await self._update(referral, request, duplicate=True)
            else:
                await self._signal(referral, request)

        if race:
            racing = asyncio.create_task(second())
            await self._update(referral, request)
            await racing
        else:
            await self._update(referral, request)
            await second()
        await self._update(referral, request, duplicate=True)
        self.stats.duplicates_sent += 2

    async def _update(
        self, referral: Referral, request: StaffAction, duplicate: bool = False
    ) -> ActResult | None:
        rid = referral.referral_id

        async def attempt() -> ActResult:
            return await send_action(
                self.client,
                rid,
                request,
                ATTEMPT_SECONDS,
                self.settings.database(),
                self.settings.actor_signing_key,
            )

        sent_at, started = datetime.now(UTC), time.monotonic()
        result = await self._retrying(referral, request, attempt, duplicate, "update act")
        self.updates.append(UpdateTiming(sent_at, time.monotonic() - started))
        return result

    async def _signal(self, referral: Referral, request: StaffAction) -> None:
        handle = self.client.get_workflow_handle(referral.referral_id)

        async def attempt() -> None:
            await handle.signal(
                ReferralWorkflow.action, request, rpc_timeout=timedelta(seconds=ATTEMPT_SECONDS)
            )

        await self._retrying(referral, request, attempt, True, "signal action")

    async def _retrying(
        self,
        referral: Referral,
        request: StaffAction,
        attempt: Callable[[], Awaitable[Any]],
        duplicate: bool,
        what: str,
    ) -> Any:
        rid = referral.referral_id
        deadline = time.monotonic() + ACTION_DEADLINE_SECONDS
        pause = 0.2
        while True:
            referral.deliveries += 1
            try:
                return await attempt()
            except Exception as error:
                if duplicate and _closed_refusal(error, rid):
                    self.stats.moot += 1
                    return None  # the referral completed already: the duplicate is moot
                if not _transient(error):
                    message = f"{rid}: {what} {request.action.value} refused: {error}"
                    referral.error = referral.error or message
                    raise DriveError(message) from error
                if time.monotonic() > deadline:
                    message = (
                        f"{rid}: {what} {request.action.value} (request id "
                        f"{request.request_id}) still not through after "
                        f"{ACTION_DEADLINE_SECONDS:.0f}s; last error: {error}"
                    )
                    referral.error = referral.error or message
                    raise DriveError(message) from error
            referral.retries += 1
            self.stats.retries += 1
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    # --- progress --------------------------------------------------------------------------

    @property
    def steps_total(self) -> int:
        return self._steps_total

    def fraction_applied(self) -> float:
        return self.stats.applied / self._steps_total if self._steps_total else 0.0

    async def wait_applied(self, steps: int, seconds: float) -> None:
        """Until `steps` staff actions have been applied in all (a fault lands mid-flight)."""

        def reached() -> bool:
            return self.stats.applied >= steps or self._driving_done

        async with self._progress:
            try:
                await asyncio.wait_for(self._progress.wait_for(reached), seconds)
            except TimeoutError:
                raise DriveError(
                    f"only {self.stats.applied} of {steps} staff actions applied after "
                    f"{seconds:.0f}s"
                ) from None
        if self.stats.applied < steps:
            raise DriveError(
                f"driving ended after {self.stats.applied} staff actions, before the fault "
                f"point at {steps}"
            )

    # --- the end ---------------------------------------------------------------------------

    async def wait_final(self, seconds: float) -> None:
        """Every workflow's result (it completes once its last effect is done); what is still
        open after `seconds` is left without a result, and said so."""

        async def one(referral: Referral) -> None:
            handle = self.client.get_workflow_handle(
                referral.referral_id, result_type=ReferralState
            )
            while True:
                try:
                    referral.final = await handle.result()
                    break
                except WorkflowFailureError as error:
                    referral.error = f"{referral.referral_id}: workflow failed: {error.cause}"
                    return
                except (RPCError, RPCTimeoutOrCancelledError) as error:
                    if isinstance(error, RPCError) and error.status not in TRANSIENT_RPC:
                        raise
                    await asyncio.sleep(0.5)
            while True:
                try:
                    description = await handle.describe()
                    referral.closed_at = description.close_time
                    return
                except RPCError as error:
                    if error.status not in TRANSIENT_RPC:
                        raise
                    await asyncio.sleep(0.5)

        tasks = [asyncio.create_task(one(r)) for r in self.referrals]
        done, pending = await asyncio.wait(tasks, timeout=seconds)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()
        stuck = [r for r in self.referrals if r.final is None and r.error is None]
        for referral in stuck:
            referral.error = await self._explain_stuck(referral, seconds)

    async def _explain_stuck(self, referral: Referral, seconds: float) -> str:
        rid = referral.referral_id
        try:
            description = await self.client.get_workflow_handle(rid).describe()
            status = description.status
            name = status.name if status is not None else "unknown"
            details = ""
            if status == WorkflowExecutionStatus.RUNNING:
                state = await self.client.get_workflow_handle(rid).query(
                    ReferralWorkflow.state, rpc_timeout=timedelta(seconds=5)
                )
                details = f", stage {state.stage.value}"
        except Exception as error:  # only to explain a timeout: say what is known
            name, details = "unknown", f" ({error})"
        return f"{rid}: no workflow result after {seconds:.0f}s (workflow {name}{details})"
