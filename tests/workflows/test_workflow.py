"""ReferralWorkflow on the real time-skipping test server, with recording activity stand-ins
(tests/desk.py). Each test gets its own task queue, worker and workflow ids."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from devstack.settings import signed
from starter.contact_window import contact_window
from tests.desk import (
    PROSPECT_DOMAIN,
    REFERRER_EMAIL,
    WON_180K,
    Desk,
    act,
    advance,
    assert_fired_at,
    query_state,
    referral_desk,
    state_until,
    system_entries,
)
from workflows.models.ledger import CommissionStatus
from workflows.models.program import ProgramRules
from workflows.models.referral import ActResult, ProspectRelease, StaffAction, Stage
from workflows.models.values import Action

# --- 1. happy path ------------------------------------------------------------------------


async def test_act_answers_where_the_referral_stands(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    """Slim payloads: the update's answer is the id, stage and revision, whatever the size of
    the referral; a whole referral (the answer of a run started before 0.6) decodes as it."""
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        done = await handle.execute_update(
            "act", StaffAction(action=Action.CONTACTED, actor="alice"), result_type=ActResult
        )
        state = await query_state(handle)
        assert done == ActResult(
            referral_id=state.referral_id, stage=Stage.CONTACTED, revision=state.revision
        )
        assert ActResult.model_validate_json(state.model_dump_json()) == done


async def test_happy_path_to_commission_paid(time_env: WorkflowEnvironment, rules: ProgramRules):
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        rid = (await query_state(handle)).referral_id

        assert (await act(handle, Action.CONTACTED, "alice")).stage is Stage.CONTACTED
        assert (await act(handle, Action.ACCEPT, "alice")).stage is Stage.QUALIFYING
        assert (await act(handle, Action.APPROVE, "bob", note="fits")).stage is Stage.APPROVED
        won = await act(
            handle,
            Action.WON,
            "carol",
            amount=Decimal("180000"),
            currency="EUR",
            payment_terms_days=30,
        )
        assert won.stage is Stage.WON
        assert won.commission is not None
        assert won.commission.status is CommissionStatus.PENDING
        assert won.payment_terms_days == 30
        assert won.payment_due_at == won.history[-1].at + timedelta(days=30)

        partial = await act(
            handle, Action.PAYMENT, "dave", amount=Decimal("100000"), reference="INV-1"
        )
        assert partial.stage is Stage.WON
        assert partial.commission is not None
        assert partial.commission.customer_paid == Decimal("100000")

        paid = await act(handle, Action.PAYMENT, "dave", amount=Decimal("80000"), reference="INV-2")
        assert paid.stage is Stage.COMMISSION_PAYABLE
        assert paid.commission is not None
        assert paid.commission.amount == Decimal("18000.00")
        assert paid.commission.basis_amount == Decimal("180000.00")
        assert paid.commission.customer_paid == Decimal("180000.00")
        assert paid.commission.status is CommissionStatus.PAYABLE

        await act(handle, Action.PAYOUT, "erin", reference="PAYOUT-7")
        result = await handle.result()

    assert result.stage is Stage.COMMISSION_PAID
    assert result.commission is not None
    assert result.commission.status is CommissionStatus.PAID
    assert result.commission.payout_reference == "PAYOUT-7"
    assert [p.reference for p in result.payments] == ["INV-1", "INV-2"]

    # One email to the referrer per stage, plus the staff notices; nothing else, nothing twice.
    stages = [
        "submitted",
        "contacted",
        "qualifying",
        "approved",
        "won",
        "commission_payable",
        "commission_paid",
    ]
    expected_keys = {f"{rid}/referrer/{stage}" for stage in stages} | {
        f"{rid}/staff_new_referral",
        f"{rid}/staff_sales_handoff",
        f"{rid}/staff_deal_won",
        f"{rid}/staff_commission_payable",
    }
    assert sorted(desk.keys()) == sorted(expected_keys)
    referrer_mail = [s.request for s in desk.emails if "/referrer/" in s.request.key]
    assert [r.key.rsplit("/", 1)[1] for r in referrer_mail] == stages  # in stage order
    for request in referrer_mail:
        assert request.to == [REFERRER_EMAIL]
        assert request.template == f"referrer_{request.referral.stage.value}"
        assert request.language == "fr"
    recipients = {s.request.template: s.request.to for s in desk.emails}
    assert recipients["staff_new_referral"] == [str(rules.recipients.desk)]
    assert recipients["staff_sales_handoff"] == [str(rules.recipients.sales)]
    assert recipients["staff_deal_won"] == [str(rules.recipients.finance)]
    assert recipients["staff_commission_payable"] == [str(rules.recipients.finance)]
    payable_mail = desk.sent(f"{rid}/staff_commission_payable")[0].request.referral
    assert payable_mail.commission is not None
    assert payable_mail.commission.amount == Decimal("18000.00")

    # The ledger: pending -> pending (100000 paid) -> payable -> paid, one row per event.
    assert [(r.event, r.status, r.customer_paid) for r in desk.ledger] == [
        ("won", CommissionStatus.PENDING, Decimal("0")),
        ("payment", CommissionStatus.PENDING, Decimal("100000.00")),
        ("payment", CommissionStatus.PAYABLE, Decimal("180000.00")),
        ("payout", CommissionStatus.PAID, Decimal("180000.00")),
    ]
    assert [r.actor for r in desk.ledger] == ["carol", "dave", "dave", "erin"]
    assert all(r.amount == Decimal("18000.00") and r.currency == "EUR" for r in desk.ledger)
    assert all(r.referrer_email == REFERRER_EMAIL for r in desk.ledger)
    assert len({r.event_key for r in desk.ledger}) == 4

    assert desk.releases == [ProspectRelease(domain=PROSPECT_DOMAIN, referral_id=rid)]

    assert [(h.action, h.actor, h.outcome) for h in result.history] == [
        ("submitted", "referrer", "applied"),
        ("contacted", "alice", "applied"),
        ("accept", "alice", "applied"),
        ("approve", "bob", "applied"),
        ("won", "carol", "applied"),
        ("payment", "dave", "applied"),
        ("payment", "dave", "applied"),
        ("payout", "erin", "applied"),
    ]
    assert result.history[3].note == "fits"
    times = [h.at for h in result.history]
    assert times == sorted(times)


# --- 2. negative branches -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("from_stage", "action", "terminal"),
    [
        (Stage.SUBMITTED, Action.DECLINE, Stage.DECLINED),
        (Stage.CONTACTED, Action.DECLINE, Stage.DECLINED),
        (Stage.QUALIFYING, Action.REJECT, Stage.REJECTED),
        (Stage.APPROVED, Action.LOST, Stage.LOST),
        (Stage.WON, Action.CANCEL, Stage.CANCELLED),
    ],
)
async def test_negative_branch_ends_the_referral(
    time_env: WorkflowEnvironment,
    rules: ProgramRules,
    from_stage: Stage,
    action: Action,
    terminal: Stage,
):
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        rid = (await advance(handle, from_stage)).referral_id
        ended = await act(handle, action, "bob", reason="prospect not interested")
        assert ended.stage is terminal
        result = await handle.result()

    assert result.stage is terminal
    assert (result.history[-1].action, result.history[-1].actor) == (action.value, "bob")
    assert result.history[-1].note == "prospect not interested"
    assert desk.releases == [ProspectRelease(domain=PROSPECT_DOMAIN, referral_id=rid)]
    assert len(desk.sent(f"{rid}/referrer/{terminal.value}")) == 1
    if from_stage is Stage.WON:
        assert [(r.event, r.status) for r in desk.ledger] == [
            ("won", CommissionStatus.PENDING),
            ("cancel", CommissionStatus.VOID),
        ]
        assert result.commission is not None
        assert result.commission.status is CommissionStatus.VOID
    else:
        assert desk.ledger == []
        assert result.commission is None


# --- 3. contact reminder and escalation ---------------------------------------------------


async def test_contact_reminder_and_escalation_fire_at_their_instants(
    time_env: WorkflowEnvironment, rules: ProgramRules
):
    async with referral_desk(time_env, rules) as desk:
        handle, window = await desk.start()
        rid = (await query_state(handle)).referral_id
        assert window.received_at < window.reminder_at < window.deadline

        now = await time_env.get_current_time()
        await time_env.sleep(window.deadline - now + timedelta(hours=1))
        state = await state_until(handle, lambda s: s.contact_sla_breached, "the escalation")
        await desk.until(
            lambda: bool(desk.sent(f"{rid}/staff_contact_escalation")), "the escalation email"
        )

        assert state.stage is Stage.SUBMITTED
        assert state.contact_reminder_sent is True
        assert state.contact_sla_breached is True
        assert state.contact_reminder_at == window.reminder_at
        assert state.contact_deadline == window.deadline
        assert_fired_at(
            system_entries(state),
            [("contact_reminder", window.reminder_at), ("contact_sla_breached", window.deadline)],
        )
        assert all(h.actor == "system" for h in state.history[1:])

        (reminder,) = desk.sent(f"{rid}/staff_contact_reminder")
        (escalation,) = desk.sent(f"{rid}/staff_contact_escalation")
        assert reminder.request.to == [str(rules.recipients.desk)]
        assert escalation.request.to == [str(rules.recipients.desk_manager)]
        assert reminder.request.referral.contact_reminder_sent is True
        assert escalation.request.referral.contact_sla_breached is True
        # The emails went out when their timers fired, not when anyone looked.
        assert_fired_at(
            [("reminder email", reminder.at), ("escalation email", escalation.at)],
            [("reminder email", window.reminder_at), ("escalation email", window.deadline)],
        )


async def test_contact_before_reminder_sends_neither(
    time_env: WorkflowEnvironment, rules: ProgramRules
):
    async with referral_desk(time_env, rules) as desk:
        handle, window = await desk.start()
        await act(handle, Action.CONTACTED, "alice")
        now = await time_env.get_current_time()
        await time_env.sleep(window.deadline - now + timedelta(days=3))

        state = await query_state(handle)
        assert state.stage is Stage.CONTACTED
        assert not state.contact_reminder_sent
        assert not state.contact_sla_breached
        assert system_entries(state) == []

        await act(handle, Action.DECLINE, "alice", reason="no fit")
        result = await handle.result()  # drains every queued email first

    templates = [s.request.template for s in desk.emails]
    assert "staff_contact_reminder" not in templates
    assert "staff_contact_escalation" not in templates
    assert system_entries(result) == []


async def test_contact_between_reminder_and_deadline_sends_only_reminder(
    time_env: WorkflowEnvironment, rules: ProgramRules
):
    async with referral_desk(time_env, rules) as desk:
        handle, window = await desk.start()
        now = await time_env.get_current_time()
        await time_env.sleep(window.reminder_at - now + timedelta(hours=1))
        state = await state_until(handle, lambda s: s.contact_reminder_sent, "the reminder")
        assert not state.contact_sla_breached
        assert await time_env.get_current_time() < window.deadline

        await act(handle, Action.CONTACTED, "alice")
        now = await time_env.get_current_time()
        await time_env.sleep(window.deadline - now + timedelta(days=3))

        state = await query_state(handle)
        assert state.stage is Stage.CONTACTED
        assert state.contact_reminder_sent
        assert not state.contact_sla_breached
        assert_fired_at(system_entries(state), [("contact_reminder", window.reminder_at)])

        await act(handle, Action.DECLINE, "alice", reason="no fit")
        result = await handle.result()

    templates = [s.request.template for s in desk.emails]
    assert templates.count("staff_contact_reminder") == 1
    assert "staff_contact_escalation" not in templates
    assert not result.contact_sla_breached


# --- 4. payment reminders -----------------------------------------------------------------


async def test_payment_reminders_until_paid_in_full(
    time_env: WorkflowEnvironment, rules: ProgramRules
):
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        won = await advance(handle, Stage.WON)
        rid = won.referral_id
        assert won.payment_due_at is not None
        due = won.payment_due_at

        now = await time_env.get_current_time()
        await time_env.sleep(due + timedelta(days=35) - now)  # ~65 days after won
        state = await state_until(handle, lambda s: s.payment_reminders_sent == 2, "2 reminders")
        await desk.until(
            lambda: len([k for k in desk.keys() if "staff_payment_overdue" in k]) == 2,
            "two overdue emails",
        )
        overdue = [s for s in desk.emails if s.request.template == "staff_payment_overdue"]
        assert [s.request.key for s in overdue] == [
            f"{rid}/staff_payment_overdue/1",
            f"{rid}/staff_payment_overdue/2",
        ]
        assert all(s.request.to == [str(rules.recipients.finance)] for s in overdue)
        assert [s.request.referral.payment_reminders_sent for s in overdue] == [1, 2]
        interval = timedelta(days=rules.payment.reminder_interval_days)
        assert_fired_at(
            system_entries(state),
            [("payment_reminder", due), ("payment_reminder", due + interval)],
        )

        paid = await act(handle, Action.PAYMENT, "dave", amount=Decimal("180000"), reference="X1")
        assert paid.stage is Stage.COMMISSION_PAYABLE
        await time_env.sleep(timedelta(days=100))
        state = await query_state(handle)
        assert state.payment_reminders_sent == 2
        await act(handle, Action.PAYOUT, "erin", reference="P1")
        result = await handle.result()

    assert result.stage is Stage.COMMISSION_PAID
    assert len([s for s in desk.emails if s.request.template == "staff_payment_overdue"]) == 2


# --- 5. refused updates -------------------------------------------------------------------


async def assert_refused(
    handle: WorkflowHandle[Any, Any], request: StaffAction, *fragments: str
) -> None:
    before = await query_state(handle)
    with pytest.raises(WorkflowUpdateFailedError) as raised:
        await handle.execute_update("act", signed(handle.id, request), result_type=ActResult)
    message = str(raised.value.cause)
    for fragment in fragments:
        assert fragment in message, message
    after = await query_state(handle)
    assert after.model_dump() == before.model_dump()


async def test_refused_updates_change_nothing(time_env: WorkflowEnvironment, rules: ProgramRules):
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()

        await assert_refused(
            handle, StaffAction(action=Action.APPROVE, actor="bob"), "not allowed", "submitted"
        )
        await assert_refused(handle, StaffAction(action=Action.DECLINE, actor="bob"), "reason")
        await assert_refused(
            handle, StaffAction(action=Action.DECLINE, actor="bob", reason="   "), "reason"
        )
        await assert_refused(
            handle,
            StaffAction(action=Action.PAYOUT, actor="bob", reference="P"),
            "not allowed",
        )

        await advance(handle, Stage.APPROVED)
        for amount in (Decimal("0"), Decimal("-5")):
            await assert_refused(
                handle,
                StaffAction(action=Action.WON, actor="carol", amount=amount, currency="EUR"),
                "positive amount",
            )
        await act(handle, Action.WON, "carol", **WON_180K)

        first = await act(handle, Action.PAYMENT, "dave", amount=Decimal("1000"), reference="INV-1")
        assert first.commission is not None
        assert first.commission.customer_paid == Decimal("1000.00")
        await assert_refused(
            handle,
            StaffAction(
                action=Action.PAYMENT, actor="dave", amount=Decimal("1000"), reference="INV-1"
            ),
            "INV-1",
            "already recorded",
        )
        state = await query_state(handle)
        assert state.commission is not None
        assert state.commission.customer_paid == Decimal("1000.00")
        assert [p.reference for p in state.payments] == ["INV-1"]
        assert all(h.outcome == "applied" for h in state.history)
        await desk.until(lambda: len(desk.ledger) == 2, "two ledger rows")
        assert [r.event for r in desk.ledger] == ["won", "payment"]


# --- 6. signals ---------------------------------------------------------------------------


async def test_refused_signal_is_recorded_and_valid_signal_applies(
    time_env: WorkflowEnvironment, rules: ProgramRules
):
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        await handle.signal("action", StaffAction(action=Action.APPROVE, actor="billing"))
        state = await state_until(handle, lambda s: len(s.history) == 2, "the refused signal")
        refused = state.history[-1]
        assert (refused.action, refused.actor, refused.outcome) == ("approve", "billing", "refused")
        assert refused.note is not None and "not allowed" in refused.note
        assert state.stage is Stage.SUBMITTED
        assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING

        await handle.signal("action", StaffAction(action=Action.CONTACTED, actor="ops"))
        state = await state_until(handle, lambda s: s.stage is Stage.CONTACTED, "contacted")
        assert (state.history[-1].action, state.history[-1].actor) == ("contacted", "ops")
        assert state.history[-1].outcome == "applied"
        rid = state.referral_id
        await desk.until(lambda: bool(desk.sent(f"{rid}/referrer/contacted")), "contacted mail")
        assert not desk.sent(f"{rid}/referrer/approved")


# --- 7. signal-with-start -----------------------------------------------------------------


async def test_early_signal_is_applied_before_anything_else(
    time_env: WorkflowEnvironment, rules: ProgramRules
):
    async with referral_desk(time_env, rules) as desk:
        handle, window = await desk.start(
            start_signal=StaffAction(action=Action.CONTACTED, actor="ops")
        )
        first = await query_state(handle)
        assert first.stage is Stage.CONTACTED
        assert [(h.action, h.actor) for h in first.history] == [
            ("submitted", "referrer"),
            ("contacted", "ops"),
        ]

        now = await time_env.get_current_time()
        await time_env.sleep(window.deadline - now + timedelta(days=3))
        state = await query_state(handle)
        assert not state.contact_reminder_sent and not state.contact_sla_breached

        await act(handle, Action.DECLINE, "ops", reason="duplicate")
        result = await handle.result()

    rid = result.referral_id
    assert system_entries(result) == []
    assert [s.request.key for s in desk.emails if "/referrer/" in s.request.key] == [
        f"{rid}/referrer/submitted",
        f"{rid}/referrer/contacted",
        f"{rid}/referrer/declined",
    ]
    templates = [s.request.template for s in desk.emails]
    assert "staff_contact_reminder" not in templates
    assert "staff_contact_escalation" not in templates


# --- 8. activity failures are retried -----------------------------------------------------


async def test_failed_email_is_retried_not_dropped(
    time_env: WorkflowEnvironment, rules: ProgramRules
):
    async with referral_desk(time_env, rules, failing_email_attempts=2) as desk:
        handle, _ = await desk.start()
        rid = (await query_state(handle)).referral_id
        # The run goes on while the first email is still failing.
        assert (await act(handle, Action.CONTACTED, "alice")).stage is Stage.CONTACTED
        await act(handle, Action.DECLINE, "alice", reason="no fit")
        result = await handle.result()

    assert result.stage is Stage.DECLINED
    keys = [
        f"{rid}/referrer/submitted",
        f"{rid}/staff_new_referral",
        f"{rid}/referrer/contacted",
        f"{rid}/referrer/declined",
    ]
    assert desk.keys() == keys  # each delivered once, in order
    assert [s.attempt for s in desk.emails] == [3, 3, 3, 3]
    first_key = keys[0]
    attempts = [(a, at) for key, a, at in desk.email_attempts if key == first_key]
    assert [a for a, _ in attempts] == [1, 2, 3]
    # Backoff from the retry policy: 2 s, then 4 s (workflow time).
    assert attempts[1][1] - attempts[0][1] >= timedelta(seconds=2)
    assert attempts[2][1] - attempts[1][1] >= timedelta(seconds=4)
    assert desk.releases == [ProspectRelease(domain=PROSPECT_DOMAIN, referral_id=rid)]


# --- a staff action and a timer in the same workflow task ----------------------------------


async def test_contact_recorded_before_deadline_is_not_escalated_when_the_worker_lags(
    time_env: WorkflowEnvironment, rules: ProgramRules
):
    """Worker down over the deadline; contact signalled before it. The workflow task that
    finally runs holds both the signal and the fired deadline timer: the signal must win."""
    # Real (unskipped) seconds: the test server cannot skip time while a workflow task waits
    # for a worker, so the deadline is made a few seconds away instead of business days.
    desk = Desk(time_env, rules)
    received_at = await time_env.get_current_time()
    window = contact_window(received_at, rules.calendar, rules.contact).model_copy(
        update={"reminder_at": received_at, "deadline": received_at + timedelta(seconds=8)}
    )
    try:
        async with desk.worker(max_cached_workflows=0):  # no sticky queue: worker B gets it all
            handle, _ = await desk.start(window=window)
            await state_until(handle, lambda s: s.contact_reminder_sent, "the due reminder")
            await desk.until(lambda: len(desk.emails) == 3, "intake emails and the reminder")
        # Worker down. Contact is recorded (a signal is durable at once) before the deadline...
        await handle.signal("action", StaffAction(action=Action.CONTACTED, actor="ops"))
        if await time_env.get_current_time() >= window.deadline:
            raise RuntimeError("setup too slow: contact was not recorded before the deadline")
        # ...and the worker comes back only after the deadline timer has fired.
        while await time_env.get_current_time() < window.deadline + timedelta(seconds=0.5):
            await asyncio.sleep(0.1)
        async with desk.worker(max_cached_workflows=0):
            state = await state_until(
                handle, lambda s: s.stage is Stage.CONTACTED, "the contacted signal"
            )
            # The scenario really happened: signal and timer reached the worker in one task.
            task, arrived = 0, {}
            async for event in handle.fetch_history_events():
                kind = event.WhichOneof("attributes")
                if kind == "workflow_task_started_event_attributes":
                    task += 1
                elif kind in (
                    "workflow_execution_signaled_event_attributes",
                    "timer_fired_event_attributes",
                ):
                    arrived[kind.split("_event")[0]] = task
            assert arrived["workflow_execution_signaled"] == arrived["timer_fired"], arrived
            await act(handle, Action.DECLINE, "ops", reason="no fit")
            result = await handle.result()
    finally:
        await desk.close_open_workflows()

    assert state.history[-1].action == "contacted"
    assert not result.contact_sla_breached
    assert [(h.action, h.actor) for h in result.history] == [
        ("submitted", "referrer"),
        ("contact_reminder", "system"),
        ("contacted", "ops"),
        ("decline", "ops"),
    ]
    assert "staff_contact_escalation" not in [s.request.template for s in desk.emails]


async def test_won_amount_that_rounds_to_zero_is_refused(
    time_env: WorkflowEnvironment, rules: ProgramRules
):
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        await advance(handle, Stage.APPROVED)
        try:
            won = await act(handle, Action.WON, "carol", amount=Decimal("0.004"), currency="EUR")
        except WorkflowUpdateFailedError as refused:
            assert "positive amount" in str(refused.cause)
        else:
            assert won.commission is not None
            raise AssertionError(f"won accepted with basis {won.commission.basis_amount} EUR")
        assert (await query_state(handle)).stage is Stage.APPROVED
