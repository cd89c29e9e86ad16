"""What keeps a referral whole over months: Temporal cancellation, failing effects, repeated
deliveries, a bloating integration, and referrals started before a workflow change.

On the time-skipping test server with the stand-ins of tests/desk.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal

from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from tests.desk import (
    PROSPECT_DOMAIN,
    REFERRER_EMAIL,
    SETTLE,
    Desk,
    act,
    advance,
    query_state,
    referral_desk,
    state_until,
)
from workflows.models.ledger import CommissionStatus
from workflows.models.program import ProgramRules
from workflows.models.referral import (
    ActResult,
    EmailRequest,
    ProspectRelease,
    ReferralState,
    StaffAction,
    Stage,
)
from workflows.models.values import Action
from workflows.policies import MAX_REFUSALS_KEPT, PERMANENT_EMAIL_FAILURE


def refused_by_smtp(request: EmailRequest, attempt: int) -> BaseException | None:
    """The referrer's mailbox does not exist: every email to it is refused for good."""
    if REFERRER_EMAIL in request.to:
        return ApplicationError(
            f"recipient refused: {REFERRER_EMAIL}: 550 5.1.1 mailbox unknown",
            type=PERMANENT_EMAIL_FAILURE,
            non_retryable=True,
        )
    return None


async def details_until(desk: Desk, predicate: Callable[[str], bool], what: str) -> str:
    """The referral's current details (what the Temporal UI shows), once `predicate` holds."""
    handle = desk.handles[0]
    deadline = asyncio.get_running_loop().time() + SETTLE
    while True:
        metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        if predicate(metadata.current_details):
            return str(metadata.current_details)
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {metadata.current_details!r}")
        await asyncio.sleep(0.05)


# --- Temporal cancellation runs the business cancel -------------------------------------------


async def test_temporal_cancellation_runs_the_business_cancel(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        won = await advance(handle, Stage.WON)
        await handle.cancel()
        result = await handle.result()
        description = await handle.describe()
        rid = won.referral_id
        await desk.until(lambda: bool(desk.sent(f"{rid}/staff_referral_cancelled")), "desk told")

    assert description.status is WorkflowExecutionStatus.COMPLETED
    assert result.stage is Stage.CANCELLED
    last = result.history[-1]
    assert (last.action, last.actor) == ("cancel", "temporal")
    assert last.note is not None and "cancellation requested in Temporal" in last.note
    assert result.commission is not None and result.commission.status is CommissionStatus.VOID
    assert desk.ledger[-1].status is CommissionStatus.VOID
    assert desk.ledger[-1].event_key == f"{rid}/cancel"
    assert desk.releases == [ProspectRelease(domain=PROSPECT_DOMAIN, referral_id=rid)]
    assert desk.sent(f"{rid}/referrer/cancelled")[0].request.to == [REFERRER_EMAIL]
    assert desk.sent(f"{rid}/staff_referral_cancelled")[0].request.to == [
        str(rules.recipients.desk)
    ]
    assert desk.sent(f"{rid}/staff_referral_cancelled/finance")[0].request.to == [
        str(rules.recipients.finance)
    ]
    assert desk.records[-1].state.stage is Stage.CANCELLED


async def test_temporal_cancellation_cannot_void_a_payable_commission(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        await advance(handle, Stage.WON)
        await act(handle, Action.PAYMENT, "dave", amount=Decimal("180000"), reference="INV-1")
        await handle.cancel()
        state = await state_until(
            handle, lambda s: s.history[-1].action == "temporal_cancel_refused", "the refusal"
        )
        assert state.stage is Stage.COMMISSION_PAYABLE
        assert state.history[-1].note == (
            "cancellation requested in Temporal, not applied: cancel is not allowed in stage "
            "commission_payable (allowed: payout, refund)"
        )
        assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING
        await act(handle, Action.PAYOUT, "erin", reference="VIR-1")
        result = await handle.result()
    assert result.stage is Stage.COMMISSION_PAID


# --- email failures -----------------------------------------------------------------------------


async def test_a_refused_address_is_recorded_reported_and_later_mail_still_goes(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    async with referral_desk(time_env, rules, email_failure=refused_by_smtp) as desk:
        handle, _ = await desk.start()
        rid = (await query_state(handle)).referral_id
        await act(handle, Action.CONTACTED, "alice")
        await act(handle, Action.DECLINE, "alice", reason="no fit")
        result = await handle.result()

    failures = [h for h in result.history if h.action == "email_failed"]
    assert [f.note for f in failures] == [
        f"email to {REFERRER_EMAIL} failed (referrer_{stage}): recipient refused: "
        f"{REFERRER_EMAIL}: 550 5.1.1 mailbox unknown"
        for stage in ("submitted", "contacted", "declined")
    ]
    assert all(f.actor == "system" for f in failures)
    notices = [s.request for s in desk.emails if s.request.template == "staff_email_failed"]
    assert [n.key for n in notices] == [
        f"{rid}/referrer/{stage}/failure-notice" for stage in ("submitted", "contacted", "declined")
    ]
    assert all(n.to == [str(rules.recipients.desk)] for n in notices)
    assert notices[0].extra["to"] == REFERRER_EMAIL
    assert "550" in notices[0].extra["reason"]
    # A permanent refusal is not retried, and the staff mail went out as usual.
    attempts = [a for key, a, _ in desk.email_attempts if key == f"{rid}/referrer/submitted"]
    assert attempts == [1]
    assert desk.sent(f"{rid}/staff_new_referral")


async def test_a_transient_failure_counts_as_permanent_after_the_retry_limit(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    quick = rules.model_copy(
        update={"email": rules.email.model_copy(update={"retry_for_hours": 1})}
    )

    def mailbox_full(request: EmailRequest, attempt: int) -> BaseException | None:
        return RuntimeError("452 4.2.2 mailbox full") if REFERRER_EMAIL in request.to else None

    async with referral_desk(time_env, quick, email_failure=mailbox_full) as desk:
        handle, _ = await desk.start()
        await time_env.sleep(timedelta(hours=1, minutes=15))
        state = await state_until(
            handle,
            lambda s: any(h.action == "email_failed" for h in s.history),
            "the failure after an hour of retries",
        )
    [failure] = [h for h in state.history if h.action == "email_failed"]
    assert failure.note is not None
    assert "still failing after retrying for 1 h (last error: 452 4.2.2 mailbox full)" in (
        failure.note
    )
    attempts = [a for key, a, _ in desk.email_attempts if key.endswith("/referrer/submitted")]
    assert len(attempts) > 3


async def test_when_the_desks_own_address_fails_nothing_loops(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    desk_address = str(rules.recipients.desk)

    def desk_refused(request: EmailRequest, attempt: int) -> BaseException | None:
        if desk_address in request.to:
            return ApplicationError("550 no such user", type=PERMANENT_EMAIL_FAILURE)
        return None

    async with referral_desk(time_env, rules, email_failure=desk_refused) as desk:
        handle, _ = await desk.start()
        await act(handle, Action.DECLINE, "alice", reason="no fit")
        result = await handle.result()
    [failure] = [h for h in result.history if h.action == "email_failed"]
    assert failure.note is not None and "staff_new_referral" in failure.note
    assert not [s for s in desk.emails if s.request.template == "staff_email_failed"]


# --- database writes ----------------------------------------------------------------------------


async def test_database_writes_retry_until_done_and_the_details_say_so(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    async with referral_desk(time_env, rules, failing_writes=10**6) as desk:
        handle, _ = await desk.start()
        text = await details_until(desk, lambda d: "failing" in d, "the trouble shown")
        assert "Database writes failing:** record_referral failing since" in text
        assert "database unavailable" in text
        assert desk.records == []

        desk.failing_writes = 0  # the database is back
        await desk.until(lambda: bool(desk.records), "the write once the database is back")
        await desk.until(lambda: len(desk.ledger) == 0 and len(desk.records) >= 1, "records")
        state = await act(handle, Action.CONTACTED, "alice")
        # The update answered after its change was written: staff read their own writes.
        assert desk.records[-1].state.revision >= state.revision
        assert desk.records[-1].state.stage is Stage.CONTACTED
        await details_until(desk, lambda d: "failing" not in d, "the trouble cleared")


async def test_every_change_reaches_the_system_of_record_in_order(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        await advance(handle, Stage.WON)
        await act(handle, Action.PAYMENT, "dave", amount=Decimal("180000"), reference="INV-1")
        await act(handle, Action.PAYOUT, "erin", reference="VIR-1")
        result = await handle.result()

    revisions = [r.state.revision for r in desk.records]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert desk.records[-1].state.stage is Stage.COMMISSION_PAID
    assert desk.records[-1].state.history == []  # the history travels as events
    written = [e for r in desk.records for e in r.events]
    assert [e.seq for e in written] == list(range(len(result.history)))
    assert [(e.action, e.actor) for e in written] == [(h.action, h.actor) for h in result.history]
    rid = result.referral_id
    assert [r.event_key for r in desk.ledger] == [
        f"{rid}/won",
        f"{rid}/payment/INV-1",
        f"{rid}/payout",
    ]


# --- repeated deliveries --------------------------------------------------------------------------


async def test_a_repeated_request_is_applied_once(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        contacted = StaffAction(action=Action.CONTACTED, actor="alice", request_id="req-1")
        first = await handle.execute_update("act", contacted, id="req-1", result_type=ActResult)
        again = await handle.execute_update("act", contacted, id="req-1", result_type=ActResult)
        assert first.stage is again.stage is Stage.CONTACTED
        # The same request by another path (a signal, a new update id) changes nothing either.
        await handle.signal("action", contacted)
        later = await handle.execute_update(
            "act", contacted, id=f"retry-{uuid.uuid4()}", result_type=ActResult
        )
        assert later.stage is Stage.CONTACTED
        accept = StaffAction(action=Action.ACCEPT, actor="crm", request_id="sig-1")
        await handle.signal("action", accept)
        await handle.signal("action", accept)
        refused = StaffAction(action=Action.CONTACTED, actor="crm", request_id="sig-2")
        await handle.signal("action", refused)
        await handle.signal("action", refused)
        state = await state_until(
            handle, lambda s: s.history[-1].request_id == "sig-2", "the signals"
        )
        await act(handle, Action.APPROVE, "bob")  # every signal before it has been handled
        state = await query_state(handle)

    steps = [(h.action, h.outcome, h.request_id) for h in state.history[1:]]
    assert steps[:3] == [
        ("contacted", "applied", "req-1"),
        ("accept", "applied", "sig-1"),
        ("contacted", "refused", "sig-2"),
    ]
    assert len(steps) == 4 and steps[3][0] == "approve"
    assert steps[3][2]  # an update without a request id is identified by its update id


async def test_refused_signals_beyond_the_cap_are_dropped_oldest_first(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        for n in range(MAX_REFUSALS_KEPT + 5):
            await handle.signal("action", StaffAction(action=Action.PAYOUT, actor=f"bot-{n}"))
        await handle.signal("action", StaffAction(action=Action.CONTACTED, actor="ops"))
        state = await state_until(handle, lambda s: s.stage is Stage.CONTACTED, "contacted")
        await desk.until(
            lambda: desk.records[-1].state.stage is Stage.CONTACTED, "every change written"
        )
    refused = [h for h in state.history if h.outcome == "refused"]
    assert len(refused) == MAX_REFUSALS_KEPT
    assert refused[0].actor == "bot-5" and refused[-1].actor == f"bot-{MAX_REFUSALS_KEPT + 4}"
    assert state.history[0].action == "submitted" and state.history[-1].action == "contacted"
    # The dropped entries were written to the event log before they were dropped.
    logged = {e.seq for r in desk.records for e in r.events}
    assert logged == set(range(MAX_REFUSALS_KEPT + 7))


# --- referrals started before the system of record ---------------------------------------------


async def test_a_referral_started_before_the_system_of_record_upgrades_on_request(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    """A worker whose patches stay off runs the workflow as release 0.1.0 did. A current
    worker then replays it as it ran, and carries it over to a new run on `upgrade`."""
    desk = Desk(time_env, rules)
    try:
        # No sticky cache: the test server would keep the referral's next task for this worker.
        async with desk.worker(patch_activation_callback=lambda _: False, max_cached_workflows=0):
            legacy, _ = await desk.start()
            await advance(legacy, Stage.APPROVED)
            assert desk.records == []  # 0.1.0 had no system of record
        async with desk.worker():
            state = await act(legacy, Action.WON, "carol", amount=Decimal("1000"), currency="EUR")
            assert state.stage is Stage.WON and desk.records == []
            rid = state.referral_id
            await desk.until(lambda: bool(desk.ledger), "the ledger write")
            assert desk.ledger[-1].event_key == f"{rid}/{len(state.history)}"  # as it was

            await legacy.signal("upgrade")
            await desk.until(lambda: bool(desk.records), "the upgraded run's first write")
            first_run = time_env.client.get_workflow_handle(legacy.id, run_id=legacy.result_run_id)
            assert (await first_run.describe()).status is WorkflowExecutionStatus.CONTINUED_AS_NEW
            [first] = desk.records
            assert first.state.stage is Stage.WON
            assert [e.seq for e in first.events] == list(range(len(state.history)))

            current = time_env.client.get_workflow_handle(legacy.id, result_type=ReferralState)
            await act(current, Action.PAYMENT, "dave", amount=Decimal("1000"), reference="INV-1")
            await act(current, Action.PAYOUT, "erin", reference="VIR-1")
            result = await current.result()
    finally:
        await desk.close_open_workflows()
    assert result.stage is Stage.COMMISSION_PAID
    assert [h.action for h in result.history][-3:] == ["won", "payment", "payout"]
    assert desk.ledger[-1].event_key == f"{rid}/payout"
    assert desk.records[-1].state.stage is Stage.COMMISSION_PAID
    # No email went twice across the two runs.
    assert len(desk.keys()) == len(set(desk.keys()))
