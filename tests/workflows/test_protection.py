"""The protection window on the time-skipping server: from `accept`, the prospect is the
referral's for `protection.days`; a warning before the end, expiry at the end, extensions."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from tests.desk import (
    PROSPECT_DOMAIN,
    Desk,
    act,
    advance,
    assert_fired_at,
    final_state,
    query_state,
    referral_desk,
    sleep_until,
    system_entries,
)
from workflows.models.program import ProgramRules
from workflows.models.referral import ProspectRelease, Stage
from workflows.models.values import Action


def protection_mail(desk: Desk, rid: str) -> list[tuple[str, datetime]]:
    return [
        (s.request.key.removeprefix(f"{rid}/"), s.at)
        for s in desk.emails
        if "protection" in s.request.template or s.request.template == "referrer_expired"
    ]


async def test_warning_then_expiry_at_their_instants(
    time_env: WorkflowEnvironment, shipped_rules: ProgramRules
):
    rules = shipped_rules
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        accepted = await advance(handle, Stage.QUALIFYING)
        rid = accepted.referral_id
        ends = accepted.history[-1].at + timedelta(days=rules.protection.days)
        warns = ends - timedelta(days=rules.protection.warning_days)
        assert accepted.protected_until == ends

        await sleep_until(time_env, ends + timedelta(hours=1))
        result = await final_state(time_env, handle)

    assert result.stage is Stage.EXPIRED and result.closed_at is not None
    assert_fired_at(system_entries(result), [("protection_warning", warns), ("expire", ends)])
    assert result.history[-1].note == f"protection ended {ends:%Y-%m-%d}; the prospect is released"

    assert_fired_at(
        protection_mail(desk, rid),
        [
            ("referrer/protection_warning/0", warns),
            ("staff_protection_warning/0", warns),
            ("referrer/expired", ends),
        ],
    )
    to = {s.request.template: s.request.to for s in desk.emails}
    assert to["staff_protection_warning"] == [str(rules.recipients.sales)]
    assert desk.releases == [ProspectRelease(domain=PROSPECT_DOMAIN, referral_id=rid)]
    assert desk.ledger == []


async def test_an_extension_moves_warning_and_expiry(
    time_env: WorkflowEnvironment, shipped_rules: ProgramRules
):
    rules = shipped_rules
    assert rules.protection.max_extensions == 2
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        accepted = await advance(handle, Stage.QUALIFYING)
        rid = accepted.referral_id
        first_end = accepted.protected_until
        assert first_end is not None
        warning = timedelta(days=rules.protection.warning_days)

        extended = await act(handle, Action.EXTEND, "alice", days=30, reason="board in June")
        assert extended.stage is Stage.QUALIFYING
        assert extended.protected_until == first_end + timedelta(days=30)
        assert extended.history[-1].note == "board in June; extended by 30 days"

        # Past the first end: no warning was due yet, and nothing expired.
        await sleep_until(time_env, first_end + timedelta(hours=1))
        state = await query_state(handle)
        assert state.stage is Stage.QUALIFYING and not state.protection_warning_sent

        await act(handle, Action.APPROVE, "bob")
        second_end = first_end + timedelta(days=30)
        await sleep_until(time_env, second_end - warning + timedelta(hours=1))
        assert (await query_state(handle)).protection_warning_sent

        # Extended again after the warning: a new warning before the new end.
        again = await act(handle, Action.EXTEND, "alice", days=10, reason="legal review")
        third_end = second_end + timedelta(days=10)
        assert again.protected_until == third_end and not again.protection_warning_sent
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await act(handle, Action.EXTEND, "alice", days=5, reason="one more")
        assert "already extended 2 times" in str(refused.value.cause)

        await sleep_until(time_env, third_end + timedelta(hours=1))
        result = await final_state(time_env, handle)

    assert result.stage is Stage.EXPIRED and result.protection_extensions == 2
    expected = [
        ("protection_warning", second_end - warning),
        ("protection_warning", third_end - warning),
        ("expire", third_end),
    ]
    assert_fired_at(system_entries(result), expected)
    assert [key for key, _ in protection_mail(desk, rid)] == [
        "referrer/protection_extended/1",
        "referrer/protection_warning/1",
        "staff_protection_warning/1",
        "referrer/protection_extended/2",
        "referrer/protection_warning/2",
        "staff_protection_warning/2",
        "referrer/expired",
    ]
    extension_mail = desk.sent(f"{rid}/referrer/protection_extended/1")[0].request
    assert extension_mail.template == "referrer_protection_extended"
    assert extension_mail.referral.protected_until == first_end + timedelta(days=30)


@pytest.mark.parametrize("closing", [Action.WON, Action.LOST])
async def test_won_or_lost_before_the_end_stops_the_clock(
    closing: Action, time_env: WorkflowEnvironment, shipped_rules: ProgramRules
):
    rules = shipped_rules
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        approved = await advance(handle, Stage.APPROVED)
        rid = approved.referral_id
        assert approved.protected_until is not None
        values: dict[str, Any] = (
            {"amount": "180000", "currency": "EUR"} if closing is Action.WON else {"reason": "no"}
        )
        await act(handle, closing, "carol", **values)
        if closing is Action.LOST:  # closed: the workflow has ended, its timers with it
            state = await final_state(time_env, handle)
        else:  # payment reminders keep it busy past the end of the protection
            await sleep_until(time_env, approved.protected_until + timedelta(days=30))
            state = await query_state(handle)
            assert state.stage is Stage.WON
            await act(handle, Action.CANCEL, "carol", reason="test over")

    assert state.stage is not Stage.EXPIRED
    assert not state.protection_warning_sent
    assert not [h for h in state.history if h.action in ("protection_warning", "expire")]
    assert protection_mail(desk, rid) == []
