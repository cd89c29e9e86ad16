"""One payout run, `payout-run-<id>`: collected, then moved by staff updates until it is
confirmed or cancelled (docs/payouts.md). No I/O here; the activities do it, and the
database keeps each run's current facts for the CLI, the desk and the portal."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from core import actor_assertions
    from core.actor_assertions import Refused
    from workflows.models.referral import StaffAction
    from workflows.payouts import (
        PayoutItem,
        RunAction,
        RunEvent,
        RunInput,
        RunRequest,
        RunState,
        RunStatus,
        apply,
        confirmed,
        exported,
        failed,
        refusal,
    )

COLLECT = "collect_payout_items"
RECORD = "record_payout_run"
EXPORT = "export_payout_run"
FAIL = "fail_payout_item"
CONFIRM = "confirm_payout_run"
NOTIFY = "notify_payees"
# The database answers within this; a failure is retried until it does.
DB_TIMEOUT = timedelta(seconds=60)
DB_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=5))
# What moves money, or approves that it does: only with a signed actor.
SIGNED_ONLY = frozenset({RunAction.APPROVE, RunAction.EXPORT, RunAction.CONFIRM})
# Emails are retried this long (an SMTP outage), then given up, as a referral's are.
EMAIL_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=10))
EMAIL_TIMEOUT = timedelta(hours=72)


class ExportRequest(BaseModel):
    state: RunState
    execution_date: str  # ISO date


class ExportResult(BaseModel):
    numbers: dict[str, str]  # payee email -> statement number
    bank_file: str


class FailRequest(BaseModel):
    state: RunState
    payee_email: str
    code: str
    reason: str


class ConfirmRequest(BaseModel):
    state: RunState
    payouts: list[StaffAction]


class Notice(BaseModel):
    """Tell each payee of the run what concerns them: remittance (`confirmed`) or a payment
    the bank returned (`failed`, for `payee_email`)."""

    state: RunState
    kind: str
    payee_email: str | None = None


def run_workflow_id(run_id: str) -> str:
    return f"payout-run-{run_id}"


@workflow.defn
class PayoutRunWorkflow:
    @workflow.init
    def __init__(self, run: RunInput) -> None:
        self._state = RunState(
            run_id=run.run_id,
            currency=run.currency,
            cutoff=run.cutoff,
            approvals_required=run.approvals_required,
        )
        self._collected = False
        self._busy: RunAction | None = None  # an action with effects under way

    @workflow.run
    async def run(self, run: RunInput) -> RunState:
        self._state.items = await workflow.execute_activity(
            COLLECT,
            self._state,
            result_type=list[PayoutItem],
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        self._state.history.append(
            RunEvent(
                at=workflow.now(),
                action="prepare",
                actor=run.prepared_by,
                note=f"cutoff {run.cutoff.isoformat()}, {len(self._state.items)} payees",
            )
        )
        self._state.revision += 1
        self._collected = True
        await self._record()
        await workflow.wait_condition(
            lambda: self._state.status in (RunStatus.CONFIRMED, RunStatus.CANCELLED)
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._state

    @workflow.query
    def state(self) -> RunState:
        return self._state

    @workflow.update
    async def act(self, request: RunRequest) -> RunState:
        if self._state.seen(request.request_id):
            return self._state  # the same request again: applied once
        surface = actor_assertions.signed_surface(request)
        action = request.action
        if action not in (RunAction.EXPORT, RunAction.FAIL, RunAction.CONFIRM):
            self._state = apply(self._state, request, workflow.now(), surface)
            await self._record()
            return self._state
        self._busy = action
        try:
            if action is RunAction.EXPORT:
                day = request.execution_date or workflow.now().date()
                result = await self._effect(
                    EXPORT,
                    ExportRequest(state=self._state, execution_date=day.isoformat()),
                    ExportResult,
                )
                self._state = exported(
                    self._state,
                    request,
                    workflow.now(),
                    surface,
                    result.numbers,
                    result.bank_file,
                    day,
                )
            elif action is RunAction.FAIL:
                email = (request.payee_email or "").strip().lower()
                credit_note = await self._effect(
                    FAIL,
                    FailRequest(
                        state=self._state,
                        payee_email=email,
                        code=(request.code or "").strip(),
                        reason=(request.reason or "").strip(),
                    ),
                    str,
                )
                self._state = failed(self._state, request, workflow.now(), surface, credit_note)
                await self._record()
                await self._notify("failed", email)
                return self._state
            else:
                problems = await self._effect(
                    CONFIRM, ConfirmRequest(state=self._state, payouts=request.payouts), list[str]
                )
                self._state = confirmed(self._state, request, workflow.now(), surface, problems)
                await self._record()
                await self._notify("confirmed")
                return self._state
            await self._record()
            return self._state
        finally:
            self._busy = None

    async def _effect(self, name: str, argument: BaseModel, result: type) -> Any:
        """An activity whose refusal (non-retryable) is the update's one-line refusal."""
        try:
            return await workflow.execute_activity(
                name,
                argument,
                result_type=result,
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
            )
        except ActivityError as error:
            cause = error.cause
            message = cause.message if isinstance(cause, ApplicationError) else str(error)
            raise ApplicationError(message, non_retryable=True) from None

    async def _notify(self, kind: str, payee_email: str | None = None) -> None:
        """Emails are sent once each (by key) and never hold the run back: a failure to send
        is logged and shows in the email log, the run goes on."""
        try:
            await workflow.execute_activity(
                NOTIFY,
                Notice(state=self._state, kind=kind, payee_email=payee_email),
                start_to_close_timeout=timedelta(minutes=5),
                schedule_to_close_timeout=EMAIL_TIMEOUT,
                retry_policy=EMAIL_RETRY,
            )
        except ActivityError as error:
            workflow.logger.warning("run %s: payees not told (%s)", self._state.run_id, error)

    @act.validator
    def _validate(self, request: RunRequest) -> None:
        if not self._collected:
            raise ValueError(f"run {self._state.run_id} is still being prepared: try again")
        if self._busy is not None:
            raise ValueError(f"run {self._state.run_id} is busy ({self._busy}): try again")
        if self._state.seen(request.request_id):
            return
        self._check_actor(request)
        refused = refusal(self._state, request)
        if refused is not None:
            raise ValueError(refused)

    def _check_actor(self, request: RunRequest) -> None:
        """As a referral's money actions: the worker's trusted keys decide once (validators do
        not run on replay)."""
        if request.assertion:
            try:
                keys = actor_assertions.trusted()
                if keys is None:
                    raise Refused("the workers trust no signing key")
                keys.verify(workflow.info().workflow_id, request)
            except Refused as error:
                workflow.logger.warning(
                    "%s refused (request %s): %s", request.action, request.request_id, error
                )
                raise ValueError(f"{request.action} refused: {error}") from None
        elif request.action in SIGNED_ONLY:
            raise ValueError(
                f"{request.action} moves money: it needs an actor signed by the surface that "
                "authenticated them (the staff web desk, or a toolbox's CLI with "
                "REFERRALS_STAFF_IDENTITY)"
            )

    async def _record(self) -> None:
        await workflow.execute_activity(
            RECORD,
            self._state,
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
