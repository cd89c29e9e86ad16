"""A referral flooded with signals its stage refuses (an integration stuck in a loop): the
refusals reach the system of record in batches, each exactly once, and the history stays
bounded, the run continuing as new at a quiet point while the referral goes on as before.

On the time-skipping test server (which, like Temporal's servers by default, suggests
continuing as new at 4 096 events) with the stand-ins of tests/desk.py; our own limit, for a
namespace that suggests it later, on a dev server configured so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest_asyncio
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from devstack.servers import dev_server
from tests.desk import (
    PROSPECT_DOMAIN,
    WON_180K,
    act,
    act_on,
    assert_fired_at,
    query_state,
    referral_desk,
    run_histories,
    sleep_until,
    state_until,
    system_entries,
)
from workflows.models.program import ProgramRules
from workflows.models.referral import StaffAction, Stage
from workflows.models.values import Action
from workflows.policies import DOMAIN_KEY, MAX_REFUSALS_KEPT, PRODUCT_KEY, SLA_KEY, STAGE_KEY
from workflows.referral import (
    CONTINUE_AS_NEW_EVENTS,
    CONTINUE_AS_NEW_SIGNALS,
    REFUSALS_PER_WRITE,
    REFUSALS_WRITE_DELAY,
)

FLOOD = 5_000
BATCH = 100  # signals sent at once
# Real seconds for a flooded run to continue as new once the flood stops: an attempt that
# raced a signal fails, and the next replays the whole run first (seconds, at 5 000 events).
SWITCH = 60.0


def refused(number: int) -> StaffAction:
    """`payout` before the commission is payable: refused in every stage the floods meet."""
    return StaffAction(action=Action.PAYOUT, actor=f"bot-{number}")


async def flood(handle: WorkflowHandle[Any, Any], first: int, count: int) -> None:
    """Refused signals `first` to `first + count - 1`, BATCH at a time."""
    for start in range(first, first + count, BATCH):
        numbers = range(start, min(start + BATCH, first + count))
        await asyncio.gather(*(handle.signal("action", refused(n)) for n in numbers))


async def until_continued_as_new(handle: WorkflowHandle[Any, Any]) -> None:
    """Until the referral's first run has continued as new."""
    deadline = asyncio.get_running_loop().time() + SWITCH
    while (await handle.describe()).run_id == handle.result_run_id:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the referral never continued as new")
        await asyncio.sleep(0.2)


async def test_refused_signals_are_written_in_batches(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    """A few refusals wait a minute for their write; a hundred are written at once; the rest
    go with the next applied change. Each reaches the event log once, in order."""
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        await desk.until(lambda: len(desk.records) == 1, "the referral's first write")
        for number in range(3):
            await handle.signal("action", refused(number))
        await state_until(handle, lambda s: s.history[-1].actor == "bot-2", "the refusals")
        assert len(desk.records) == 1

        await time_env.sleep(REFUSALS_WRITE_DELAY)
        await desk.until(lambda: len(desk.records) == 2, "the refusals' write")
        assert [e.actor for e in desk.records[1].events] == ["bot-0", "bot-1", "bot-2"]

        await flood(handle, 3, REFUSALS_PER_WRITE + 1)
        await desk.until(lambda: len(desk.records) == 3, "a write of a hundred refusals")
        assert len(desk.records[2].events) == REFUSALS_PER_WRITE

        await act(handle, Action.CONTACTED, "alice")
        assert len(desk.records) == 4
        assert [e.outcome for e in desk.records[3].events] == ["refused", "applied"]

    written = [e for record in desk.records for e in record.events]
    assert [e.seq for e in written] == list(range(len(written)))
    assert sorted(e.actor for e in written if e.outcome == "refused") == sorted(
        f"bot-{n}" for n in range(REFUSALS_PER_WRITE + 4)
    )


async def test_a_flood_of_refused_signals_continues_as_new_and_walks_to_commission_paid(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    """5 000 refused signals, the staff's updates among the first: each run stays far below the
    history limit, the database is written once per hundred refusals or so, every refusal
    reaches the event log once, and the referral then walks to commission_paid on the new run
    with every email sent once across its runs. The updates go before the run may switch:
    updates sent among signals while it switches are the last test's, on a dev server. On the
    time-skipping server such a run sometimes no longer replays once a switch has raced a
    signal (the worker's replay then diverges from what the server recorded, and every task
    times out); the same traffic on the dev server continues as new and replays every time."""
    updates = {
        5: (Action.CONTACTED, {}),
        10: (Action.ACCEPT, {}),
        15: (Action.APPROVE, {}),
        20: (Action.WON, WON_180K),
    }
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        rid = (await query_state(handle)).referral_id
        for batch in range(FLOOD // BATCH):
            await flood(handle, batch * BATCH, BATCH)
            if batch in updates:
                action, values = updates[batch]
                await act(handle, action, "alice", **values)
        await until_continued_as_new(handle)
        payment = {"amount": Decimal("180000"), "reference": "INV-1"}
        assert (await act(handle, Action.PAYMENT, "dave", **payment)).stage is (
            Stage.COMMISSION_PAYABLE
        )
        await act(handle, Action.PAYOUT, "erin", reference="VIR-1")
        result = await handle.result()
        runs = await run_histories(time_env.client, handle)

    lengths = [len(history.events) for history in runs]
    print(f"runs' history lengths {lengths}; writes {len(desk.records)} for {FLOOD} refusals")
    assert len(runs) >= 2, lengths
    assert max(lengths) < CONTINUE_AS_NEW_EVENTS, lengths  # suggested at 4 096 events
    assert len(desk.records) < FLOOD // 50, len(desk.records)

    assert result.stage is Stage.COMMISSION_PAID
    assert [h.action for h in result.history if h.outcome != "refused"] == [
        "submitted", "contacted", "accept", "approve", "won", "payment", "payout",
    ]  # fmt: skip
    assert len([h for h in result.history if h.outcome == "refused"]) == MAX_REFUSALS_KEPT

    written = [e for record in desk.records for e in record.events]
    assert [e.seq for e in written] == list(range(len(written)))  # each once, in order
    assert sorted(e.actor for e in written if e.outcome == "refused") == sorted(
        f"bot-{n}" for n in range(FLOOD)
    )
    assert desk.records[-1].state.stage is Stage.COMMISSION_PAID
    assert [r.event_key for r in desk.ledger] == [
        f"{rid}/won",
        f"{rid}/payment/INV-1",
        f"{rid}/payout",
    ]

    stages = ["submitted", "contacted", "qualifying", "approved", "won", "commission_payable"]
    expected = {f"{rid}/referrer/{stage}" for stage in [*stages, "commission_paid"]} | {
        f"{rid}/staff_new_referral",
        f"{rid}/staff_sales_handoff",
        f"{rid}/staff_deal_won",
        f"{rid}/staff_commission_payable",
    }
    assert sorted(desk.keys()) == sorted(expected)  # each once, across the runs


async def test_timers_carry_over_to_the_new_run(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    """Flooded while it waits for contact: the run continues as new, and the new one fires the
    contact reminder and the escalation at their instants, once each."""
    async with referral_desk(time_env, rules) as desk:
        handle, window = await desk.start()
        rid = (await query_state(handle)).referral_id
        await flood(handle, 0, FLOOD)
        await until_continued_as_new(handle)
        await sleep_until(time_env, window.deadline + timedelta(hours=1))
        state = await state_until(handle, lambda s: s.contact_sla_breached, "the escalation")
        escalation_key = f"{rid}/staff_contact_escalation"
        await desk.until(lambda: bool(desk.sent(escalation_key)), "the escalation email")

    assert_fired_at(
        system_entries(state),
        [("contact_reminder", window.reminder_at), ("contact_sla_breached", window.deadline)],
    )
    (reminder,) = desk.sent(f"{rid}/staff_contact_reminder")
    (escalation,) = desk.sent(escalation_key)
    assert_fired_at(
        [("reminder email", reminder.at), ("escalation email", escalation.at)],
        [("reminder email", window.reminder_at), ("escalation email", window.deadline)],
    )
    assert len(desk.keys()) == len(set(desk.keys()))


@pytest_asyncio.fixture
async def late_env() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server whose namespace suggests continuing as new only far past our own limit."""
    late = [
        "limit.historyCount.suggestContinueAsNew=40000",
        "limit.historySize.suggestContinueAsNew=40000000",
    ]
    async with dev_server(*late) as env:
        yield env


async def test_our_own_limit_and_updates_sent_while_the_run_switches(
    late_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    """Where Temporal suggests nothing, the run continues as new once it has received
    CONTINUE_AS_NEW_SIGNALS signals (half of what the server accepts in a run). The staff's
    updates sent among the signals around that point are each applied once, on one run or the
    other, and the new run sets the referral's search attributes. Signals go 20 at a time:
    with a hundred at once, the server fails workflow tasks that have too many events waiting
    behind them (FORCE_CLOSE_COMMAND) and refuses updates until a task succeeds, with or
    without this release."""
    count = CONTINUE_AS_NEW_SIGNALS + 1_000
    updates = {
        CONTINUE_AS_NEW_SIGNALS - 200: StaffAction(action=Action.CONTACTED, actor="alice"),
        CONTINUE_AS_NEW_SIGNALS - 100: StaffAction(action=Action.ACCEPT, actor="alice"),
        CONTINUE_AS_NEW_SIGNALS: StaffAction(action=Action.APPROVE, actor="bob"),
        CONTINUE_AS_NEW_SIGNALS + 100: StaffAction(action=Action.WON, actor="carol", **WON_180K),
    }
    async with referral_desk(late_env, rules) as desk:
        handle, _ = await desk.start(indexed=True)
        rid = (await query_state(handle)).referral_id
        for start in range(0, count, 20):
            numbers = range(start, start + 20)
            await asyncio.gather(
                *(handle.signal("action", refused(n)) for n in numbers),
                *(act_on(handle, updates[n]) for n in numbers if n in updates),
            )
        await until_continued_as_new(handle)
        await desk.until(lambda: bool(desk.sent(f"{rid}/staff_deal_won")), "the won emails")
        runs = await run_histories(late_env.client, handle)
        described = await handle.describe()
        state = await query_state(handle)

    signalled = [
        sum(event.HasField("workflow_execution_signaled_event_attributes") for event in run.events)
        for run in runs
    ]
    print(f"signals per run {signalled}; events per run {[len(run.events) for run in runs]}")
    assert sum(signalled) == count
    assert signalled[0] >= CONTINUE_AS_NEW_SIGNALS
    assert len(runs[0].events) < CONTINUE_AS_NEW_EVENTS  # not our limit of events
    assert not any(
        event.workflow_task_started_event_attributes.suggest_continue_as_new
        for event in runs[0].events
        if event.HasField("workflow_task_started_event_attributes")
    )
    assert [h.action for h in state.history if h.outcome == "applied"] == [
        "submitted", "contacted", "accept", "approve", "won",
    ]  # fmt: skip
    assert len(desk.keys()) == len(set(desk.keys()))
    attributes = described.typed_search_attributes
    assert attributes.get(STAGE_KEY) == "won"
    assert attributes.get(DOMAIN_KEY) == PROSPECT_DOMAIN
    assert attributes.get(PRODUCT_KEY) == "cloudsuite-financials"
    assert attributes.get(SLA_KEY) is False
