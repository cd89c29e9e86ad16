"""The transition table, every stage x every action, and the commission arithmetic."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from devstack.factories import state_at
from workflows.models.ledger import CommissionStatus, LineKind
from workflows.models.program import CommissionRules, ProgramRules
from workflows.models.referral import ReferralState, Refusal, StaffAction, Stage
from workflows.models.values import Action, round_money
from workflows.transitions import apply_action, commission_lines, compute_commission, expire

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
        Action.EXTEND: Stage.QUALIFYING,
    },
    Stage.APPROVED: {
        Action.WON: Stage.WON,
        Action.LOST: Stage.LOST,
        Action.CANCEL: Stage.CANCELLED,
        Action.EXTEND: Stage.APPROVED,
    },
    Stage.WON: {Action.PAYMENT: Stage.WON, Action.CANCEL: Stage.CANCELLED},
    Stage.COMMISSION_PAYABLE: {
        Action.PAYOUT: Stage.COMMISSION_PAID,
        Action.REFUND: Stage.COMMISSION_PAYABLE,
    },
    # `commission_paid` takes refunds only while its clawback window is open (tested below).
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
        days=30,
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


def apply(state: ReferralState, rules: ProgramRules, **fields: object) -> ReferralState:
    result = apply_action(state, StaffAction.model_validate(fields), rules, NOW)
    assert isinstance(result, ReferralState), result
    return result


def test_accept_protects_the_prospect_and_extend_moves_the_end(rules: ProgramRules) -> None:
    accepted = apply(state_at(Stage.CONTACTED, rules), rules, action="accept")
    assert accepted.protected_until == NOW + timedelta(days=rules.protection.days)
    extended = apply(accepted, rules, action="extend", days=30, reason="board meets in June")
    assert extended.protected_until == accepted.protected_until + timedelta(days=30)
    assert extended.protection_extensions == 1
    assert extended.history[-1].note == "board meets in June; extended by 30 days"
    approved = apply(extended, rules, action="approve")
    again = apply(approved, rules, action="extend", days=10, reason="legal review")
    assert again.protection_extensions == rules.protection.max_extensions == 2
    refused = apply_action(
        again, StaffAction(action=Action.EXTEND, days=5, reason="more"), rules, NOW
    )
    assert isinstance(refused, Refusal)
    assert (
        refused.reason == "the protection was already extended 2 times, the most the program allows"
    )


@pytest.mark.parametrize("days", [None, 0, -3, 366])
def test_extend_needs_a_sensible_number_of_days(days: int | None, rules: ProgramRules) -> None:
    request = StaffAction(action=Action.EXTEND, days=days, reason="why")
    refused = apply_action(state_at(Stage.QUALIFYING, rules), request, rules, NOW)
    assert isinstance(refused, Refusal) and "between 1 and 365" in refused.reason


def test_expiry_closes_the_referral_as_system(rules: ProgramRules) -> None:
    state = state_at(Stage.APPROVED, rules)
    expired = expire(state, NOW)
    assert expired.stage is Stage.EXPIRED and expired.is_terminal
    assert expired.closed_at == NOW
    entry = expired.history[-1]
    assert (entry.action, entry.actor) == ("expire", "system")
    assert f"protection ended {state.protected_until:%Y-%m-%d}" in (entry.note or "")


def test_a_product_with_its_own_rate_and_cap(rules: ProgramRules) -> None:
    own = rules.commission_for("hcm-talent")
    assert (own.rate, own.cap, own.currency) == (Decimal("0.15"), Decimal("20000.00"), "EUR")
    assert rules.commission_for("cloudsuite-financials") == rules.commission
    state = state_at(Stage.APPROVED, rules)
    state.opportunity.product = "hcm-talent"
    small = apply(state, rules, action="won", amount="100000", currency="EUR")
    assert small.commission is not None
    assert (small.commission.rate, small.commission.amount) == (
        Decimal("0.15"),
        Decimal("15000.00"),
    )
    large = apply(state, rules, action="won", amount="1000000", currency="EUR")
    assert large.commission is not None and large.commission.amount == Decimal("20000.00")


def test_refund_before_payout_lowers_what_is_payable(rules: ProgramRules) -> None:
    payable = state_at(Stage.COMMISSION_PAYABLE, rules, basis="180000.00")
    refunded = apply(
        payable, rules, action="refund", amount="45000", reference="AV-1", reason="credit note"
    )
    commission = refunded.commission
    assert commission is not None and refunded.stage is Stage.COMMISSION_PAYABLE
    assert (commission.clawed_back, commission.net) == (Decimal("4500.00"), Decimal("13500.00"))
    assert refunded.refunds[-1].clawback == Decimal("4500.00")
    lines = commission_lines(
        payable, refunded, StaffAction(action=Action.REFUND, reference="AV-1", reason="credit note")
    )
    assert [(x.kind, x.amount, x.reference, x.reason) for x in lines] == [
        (LineKind.CLAWBACK, Decimal("-4500.00"), "AV-1", "credit note")
    ]
    paid = apply(refunded, rules, action="payout", reference="VIR-1")
    assert paid.commission is not None and paid.commission.paid_amount == Decimal("13500.00")


@pytest.mark.parametrize(
    ("amount", "reference", "reason"),
    [
        (
            "179999.01",
            "AV-2",
            "a refund of 179999.01 exceeds what the customer paid and was not refunded "
            "(179999.00 EUR)",
        ),
        ("10", "AV-1", "refund reference 'AV-1' is already recorded"),
        ("0", "AV-2", "refund needs a positive amount"),
        ("10", " ", "refund needs a reference"),
    ],
)
def test_refunds_that_cannot_be(
    amount: str, reference: str, reason: str, rules: ProgramRules
) -> None:
    state = apply(
        state_at(Stage.COMMISSION_PAYABLE, rules),
        rules,
        action="refund",
        amount="1",
        reference="AV-1",
        reason="r",
    )
    request = StaffAction(
        action=Action.REFUND, amount=Decimal(amount), reference=reference, reason="r"
    )
    refused = apply_action(state, request, rules, NOW)
    assert isinstance(refused, Refusal) and reason in refused.reason


def test_refund_after_payout_only_while_the_window_is_open(rules: ProgramRules) -> None:
    paid = apply(state_at(Stage.COMMISSION_PAYABLE, rules), rules, action="payout", reference="V1")
    assert paid.is_terminal, "without a clawback window, payout closes the referral"
    refund = StaffAction(action=Action.REFUND, amount=Decimal("18000"), reference="AV", reason="r")
    assert isinstance(apply_action(paid, refund, rules, NOW), Refusal)
    paid.clawback_until, paid.closed_at = NOW + timedelta(days=90), None
    assert not paid.is_terminal
    clawed = apply_action(paid, refund, rules, NOW)
    assert isinstance(clawed, ReferralState) and clawed.commission is not None
    assert clawed.commission.clawed_back == Decimal("1800.00")
    assert clawed.commission.paid_amount == Decimal("18000.00"), "a paid line is never edited"
    paid.clawback_closed = True
    assert isinstance(apply_action(paid, refund, rules, NOW), Refusal)


def test_the_lines_of_a_lifecycle(rules: ProgramRules) -> None:
    approved = state_at(Stage.APPROVED, rules)
    steps = [
        dict(action="won", amount="200000", currency="EUR"),
        dict(action="payment", amount="200000", reference="INV-1"),
        dict(action="payout", reference="VIR-1"),
    ]
    state, kinds = approved, []
    for step in steps:
        after = apply(state, rules, **step)
        lines = commission_lines(state, after, StaffAction.model_validate(step))
        kinds += [(x.kind, x.amount, x.reference) for x in lines]
        state = after
    assert kinds == [
        (LineKind.ACCRUAL, Decimal("20000.00"), None),
        (LineKind.PAYABLE, Decimal("20000.00"), None),
        (LineKind.PAID, Decimal("20000.00"), "VIR-1"),
    ]
    won = apply(approved, rules, action="won", amount="200000", currency="EUR")
    cancelled = apply(won, rules, action="cancel", reason="duplicate deal")
    void = commission_lines(
        won, cancelled, StaffAction(action=Action.CANCEL, reason="duplicate deal")
    )
    assert [(x.kind, x.amount, x.reason) for x in void] == [
        (LineKind.VOID, Decimal("-20000.00"), "duplicate deal")
    ]
