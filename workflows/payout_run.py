"""One payout run, `payout-run-<id>`: collected, then moved by staff updates until it is
confirmed or cancelled (docs/payouts.md). No I/O here; the activities do it, and the
database keeps each run's current facts for the CLI, the desk and the portal."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from core import actor_assertions
    from core.actor_assertions import AssertionRefused
    from workflows.payouts import (
        PayoutItem,
        RunAction,
        RunEvent,
        RunInput,
        RunRequest,
        RunState,
        RunStatus,
        apply,
        refusal,
    )

COLLECT = "collect_payout_items"
RECORD = "record_payout_run"
# The database answers within this; a failure is retried until it does.
DB_TIMEOUT = timedelta(seconds=60)
DB_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=5))
# What moves money, or approves that it does: only with a signed actor.
SIGNED_ONLY = frozenset({RunAction.APPROVE})


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
        self._state = apply(self._state, request, workflow.now(), surface)
        await self._record()
        return self._state

    @act.validator
    def _validate(self, request: RunRequest) -> None:
        if not self._collected:
            raise ValueError(f"run {self._state.run_id} is still being prepared: try again")
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
                    raise AssertionRefused("the workers trust no signing key")
                keys.verify(workflow.info().workflow_id, request)
            except AssertionRefused as error:
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
