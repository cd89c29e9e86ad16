"""Refunds and the clawback window on the time-skipping server: a refund before payout lowers
what is paid, one after payout claws back by a negative line, until the window closes."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError
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
)
from workflows.models.ledger import LineKind
from workflows.models.program import ProgramRules
from workflows.models.referral import ProspectRelease, Stage
from workflows.models.values import Action


def lines(desk: Desk) -> list[tuple[LineKind, Decimal, str | None]]:
    return [(line.kind, line.amount, line.reference) for r in desk.ledger for line in r.lines]


async def test_refund_before_payout_lowers_what_is_paid(
    time_env: WorkflowEnvironment, shipped_rules: ProgramRules
):
    rules = shipped_rules
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        rid = (await advance(handle, Stage.COMMISSION_PAYABLE)).referral_id

        refunded = await act(
            handle,
            Action.REFUND,
            "dave",
            amount=Decimal("45000"),
            reference="AV-1",
            reason="two modules returned",
        )
        assert refunded.stage is Stage.COMMISSION_PAYABLE and refunded.commission is not None
        assert refunded.commission.clawed_back == Decimal("4500.00")
        assert refunded.commission.net == Decimal("13500.00")
        assert refunded.history[-1].note == (
            "two modules returned; amount 45000.00 EUR; reference AV-1"
        )

        paid = await act(handle, Action.PAYOUT, "erin", reference="VIR-1")
        assert paid.commission is not None and paid.commission.paid_amount == Decimal("13500.00")
        assert paid.clawback_until == paid.history[-1].at + timedelta(days=rules.clawback.days)
        await sleep_until(time_env, paid.clawback_until + timedelta(hours=1))
        result = await final_state(time_env, handle)

    assert result.stage is Stage.COMMISSION_PAID and result.clawback_closed
    assert lines(desk) == [
        (LineKind.ACCRUAL, Decimal("18000.00"), None),
        (LineKind.PAYABLE, Decimal("18000.00"), None),
        (LineKind.CLAWBACK, Decimal("-4500.00"), "AV-1"),
        (LineKind.PAID, Decimal("13500.00"), "VIR-1"),
    ]
    clawback = desk.ledger[2].lines[0]
    assert clawback.reason == "two modules returned"
    (to_referrer,) = desk.sent(f"{rid}/referrer/refund/1")
    (to_finance,) = desk.sent(f"{rid}/staff_refund/1")
    assert to_referrer.request.template == "referrer_refund"
    assert to_finance.request.to == [str(rules.recipients.finance)]
    assert to_finance.request.referral.refunds[-1].clawback == Decimal("4500.00")


async def test_refund_after_payout_claws_back_until_the_window_closes(
    time_env: WorkflowEnvironment, shipped_rules: ProgramRules
):
    rules = shipped_rules
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        rid = (await advance(handle, Stage.COMMISSION_PAYABLE)).referral_id
        paid = await act(handle, Action.PAYOUT, "erin", reference="VIR-1")
        assert paid.stage is Stage.COMMISSION_PAID and paid.closed_at is None
        assert paid.clawback_until is not None

        await sleep_until(time_env, paid.clawback_until - timedelta(days=1))
        assert (await query_state(handle)).closed_at is None
        assert desk.releases == [], "the prospect stays claimed while refunds can claw back"
        clawed = await act(
            handle,
            Action.REFUND,
            "dave",
            amount=Decimal("90000"),
            reference="AV-7",
            reason="contract halved",
        )
        assert clawed.stage is Stage.COMMISSION_PAID and clawed.commission is not None
        assert clawed.commission.paid_amount == Decimal("18000.00")
        assert clawed.commission.net == Decimal("9000.00")
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await act(
                handle,
                Action.REFUND,
                "dave",
                amount=Decimal("90000.01"),
                reference="AV-8",
                reason="x",
            )
        assert "exceeds what the customer paid and was not refunded (90000.00 EUR)" in str(
            refused.value.cause
        )

        await sleep_until(time_env, paid.clawback_until + timedelta(hours=1))
        result = await final_state(time_env, handle)
        with pytest.raises(RPCError):  # completed: nothing more can be recorded
            await act(handle, Action.REFUND, "dave", amount=Decimal("1"), reference="AV-9")

    closing = result.history[-1]
    assert (closing.action, closing.actor) == ("clawback_window_closed", "system")
    assert_fired_at(
        [(closing.action, closing.at)], [("clawback_window_closed", paid.clawback_until)]
    )
    assert result.closed_at == closing.at
    assert desk.releases == [ProspectRelease(domain=PROSPECT_DOMAIN, referral_id=rid)]
    assert lines(desk) == [
        (LineKind.ACCRUAL, Decimal("18000.00"), None),
        (LineKind.PAYABLE, Decimal("18000.00"), None),
        (LineKind.PAID, Decimal("18000.00"), "VIR-1"),
        (LineKind.CLAWBACK, Decimal("-9000.00"), "AV-7"),
    ]
    # Each event's lines travel with its ledger record, under the event's own key.
    assert [r.event_key for r in desk.ledger][-1] == f"{rid}/refund/AV-7"
    assert desk.sent(f"{rid}/referrer/refund/1") and desk.sent(f"{rid}/staff_refund/1")
