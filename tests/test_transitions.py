"""The transition table, every stage x every action, and the commission arithmetic."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tests.factories import state_at
from workflows.models import (
    Action,
    CommissionRules,
    CommissionStatus,
    ProgramRules,
    ReferralState,
    Refusal,
    StaffAction,
    Stage,
    round_money,
)
from workflows.transitions import apply_action, compute_commission

NOW = datetime(2026, 12, 10, 15, 0, tzinfo=UTC)

# The contract (DESIGN.md section 3), written out independently of the implementation.
EXPECTED: dict[Stage, dict[Action, Stage]] = {
    Stage.SUBMITTED: {
        Action.CONTACTED: Stage.CONTACTED,
        Action.DECLINE: Stage.DECLINED,
        Action.CANCEL: Stage.CANCELLED,
    },
    Stage.CONTACTED: {
        Action.ACCEPT: Stage.QUALIFYING,
        Action.DECLINE: Stage.DECLINED,
        Action.CANCEL: Stage.CANCELLED,
    },
    Stage.QUALIFYING: {
        Action.APPROVE: Stage.APPROVED,
        Action.REJECT: Stage.REJECTED,
        Action.CANCEL: Stage.CANCELLED,
    },
    Stage.APPROVED: {
        Action.WON: Stage.WON,
        Action.LOST: Stage.LOST,
        Action.CANCEL: Stage.CANCELLED,
    },
    Stage.WON: {Action.PAYMENT: Stage.WON, Action.CANCEL: Stage.CANCELLED},
    Stage.COMMISSION_PAYABLE: {Action.PAYOUT: Stage.COMMISSION_PAID},
}


def valid_request(action: Action) -> StaffAction:
    """A well-formed request for `action`, so only the stage decides."""
    return StaffAction(
        action=action,
        actor="alice",
        note="checked",
        reason="a reason",
        amount=Decimal("1000"),
        currency="EUR",
        reference="REF-1",
    )


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("action", list(Action))
def test_every_stage_and_action(stage: Stage, action: Action, rules: ProgramRules) -> None:
    state = state_at(stage, rules)
    before = state.model_copy(deep=True)
    result = apply_action(state, valid_request(action), rules, NOW)
    assert state == before, "apply_action must not mutate its input"
    expected = EXPECTED.get(stage, {}).get(action)
    if expected is None:
        assert isinstance(result, Refusal)
        assert "\n" not in result.reason and result.reason
        if stage in EXPECTED:
            assert f"{action.value} is not allowed in stage {stage.value}" in result.reason
        else:
            assert "closed" in result.reason
    else:
        assert isinstance(result, ReferralState), result
        assert result.stage is expected
        assert result.history[-1].action == action.value
        assert result.history[-1].actor == "alice"
        assert result.history[-1].at == NOW
        assert len(result.history) == len(state.history) + 1


@pytest.mark.parametrize(
    ("action", "missing"),
    [
        (Action.DECLINE, {"reason": None}),
        (Action.REJECT, {"reason": "  "}),
        (Action.LOST, {"reason": None}),
        (Action.CANCEL, {"reason": ""}),
        (Action.WON, {"amount": None}),
        (Action.WON, {"amount": Decimal("0")}),
        (Action.WON, {"amount": Decimal("-5")}),
        (Action.WON, {"amount": Decimal("0.004")}),  # rounds to 0.00 EUR
        (Action.PAYMENT, {"amount": Decimal("0.001")}),
        (Action.WON, {"currency": "euro"}),
        (Action.WON, {"payment_terms_days": 400}),
        (Action.PAYMENT, {"amount": Decimal("-1")}),
        (Action.PAYMENT, {"reference": None}),
        (Action.PAYOUT, {"reference": " "}),
    ],
)
def test_invalid_values_are_refused(
    action: Action, missing: dict[str, object], rules: ProgramRules
) -> None:
    stage = next(s for s, actions in EXPECTED.items() if action in actions)
    state = state_at(stage, rules)
    request = valid_request(action).model_copy(update=missing)
    result = apply_action(state, request, rules, NOW)
    assert isinstance(result, Refusal), result


def test_won_records_commission_and_payment_due(rules: ProgramRules) -> None:
    request = StaffAction(
        action=Action.WON,
        actor="bob",
        amount=Decimal("123456.785"),
        currency="eur",
        payment_terms_days=45,
    )
    result = apply_action(state_at(Stage.APPROVED, rules), request, rules, NOW)
    assert isinstance(result, ReferralState)
    assert result.commission is not None
    assert result.commission.basis_amount == Decimal("123456.79")
    assert result.commission.amount == Decimal("12345.68")
    assert result.commission.currency == "EUR"
    assert result.commission.status is CommissionStatus.PENDING
    assert result.payment_terms_days == 45
    assert result.payment_due_at == datetime(2027, 1, 24, 15, 0, tzinfo=UTC)


def test_default_payment_terms_from_rules(rules: ProgramRules) -> None:
    request = StaffAction(action=Action.WON, amount=Decimal("1000"), currency="EUR")
    result = apply_action(state_at(Stage.APPROVED, rules), request, rules, NOW)
    assert isinstance(result, ReferralState)
    assert result.payment_terms_days == rules.payment.default_terms_days


def test_payments_accumulate_until_payable(rules: ProgramRules) -> None:
    state: ReferralState | Refusal = state_at(Stage.WON, rules, basis="1000.00")
    for reference, amount in [("INV-1", "400"), ("INV-2", "599.99")]:
        assert isinstance(state, ReferralState)
        state = apply_action(
            state,
            StaffAction(action=Action.PAYMENT, amount=Decimal(amount), reference=reference),
            rules,
            NOW,
        )
    assert isinstance(state, ReferralState)
    assert state.stage is Stage.WON
    assert state.commission is not None and state.commission.customer_paid == Decimal("999.99")
    repeated = apply_action(
        state,
        StaffAction(action=Action.PAYMENT, amount=Decimal("0.01"), reference="INV-2"),
        rules,
        NOW,
    )
    assert isinstance(repeated, Refusal) and "already recorded" in repeated.reason
    final = apply_action(
        state,
        StaffAction(action=Action.PAYMENT, amount=Decimal("0.01"), reference="INV-3"),
        rules,
        NOW,
    )
    assert isinstance(final, ReferralState)
    assert final.stage is Stage.COMMISSION_PAYABLE
    assert final.commission is not None
    assert final.commission.status is CommissionStatus.PAYABLE
    assert [p.reference for p in final.payments] == ["INV-1", "INV-2", "INV-3"]


def test_payout_and_cancel_update_commission_status(rules: ProgramRules) -> None:
    paid = apply_action(
        state_at(Stage.COMMISSION_PAYABLE, rules),
        StaffAction(action=Action.PAYOUT, reference="VIR-2027-001"),
        rules,
        NOW,
    )
    assert isinstance(paid, ReferralState) and paid.commission is not None
    assert paid.commission.status is CommissionStatus.PAID
    assert paid.commission.payout_reference == "VIR-2027-001"
    void = apply_action(
        state_at(Stage.WON, rules), StaffAction(action=Action.CANCEL, reason="fraud"), rules, NOW
    )
    assert isinstance(void, ReferralState) and void.commission is not None
    assert void.commission.status is CommissionStatus.VOID


def test_cap_requires_the_program_currency(rules: ProgramRules) -> None:
    assert rules.commission.cap is not None
    request = StaffAction(action=Action.WON, amount=Decimal("1000"), currency="USD")
    result = apply_action(state_at(Stage.APPROVED, rules), request, rules, NOW)
    assert isinstance(result, Refusal) and "EUR" in result.reason


@pytest.mark.parametrize(
    ("basis", "rate", "cap", "currency", "expected"),
    [
        ("180000", "0.10", None, "EUR", "18000.00"),
        ("1234.45", "0.10", None, "EUR", "123.45"),  # 123.445 rounds half-up
        ("0.05", "0.10", None, "EUR", "0.01"),  # 0.005 rounds half-up
        ("1000000", "0.10", "50000", "EUR", "50000.00"),  # capped
        ("499999.99", "0.10", "50000", "EUR", "50000.00"),
        ("12345", "0.10", None, "JPY", "1235"),  # no minor unit
        ("1000.555", "0.075", None, "EUR", "75.04"),
    ],
)
def test_commission_rounding_and_cap(
    basis: str, rate: str, cap: str | None, currency: str, expected: str
) -> None:
    rules = CommissionRules(
        rate=Decimal(rate), cap=Decimal(cap) if cap else None, currency=currency
    )
    amount = compute_commission(Decimal(basis), currency, rules)
    assert str(amount) == expected


def test_round_money_is_half_up_not_bankers() -> None:
    assert round_money(Decimal("2.675"), "EUR") == Decimal("2.68")
    assert round_money(Decimal("2.665"), "EUR") == Decimal("2.67")
    assert round_money(Decimal("0.125"), "KWD") == Decimal("0.125")
