"""The referral state machine: one table, one pure function.

`apply_action` is used by the update validators, the update and signal
handlers and the tests, so a decision is judged the same way whichever path
it arrives by. It never mutates its input.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

from workflows.models import (
    Action,
    Commission,
    CommissionRules,
    CommissionStatus,
    HistoryEntry,
    Payment,
    ProgramRules,
    ReferralInput,
    ReferralState,
    Refusal,
    StaffAction,
    Stage,
    round_money,
)

# stage -> action -> next stage. `payment` keeps `won` until the customer has paid in full.
TRANSITIONS: dict[Stage, dict[Action, Stage]] = {
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
    Stage.WON: {
        Action.PAYMENT: Stage.WON,
        Action.CANCEL: Stage.CANCELLED,
    },
    Stage.COMMISSION_PAYABLE: {
        Action.PAYOUT: Stage.COMMISSION_PAID,
    },
}

NEEDS_REASON = frozenset({Action.DECLINE, Action.REJECT, Action.LOST, Action.CANCEL})


def initial_state(given: ReferralInput) -> ReferralState:
    """A referral as received: what the workflow starts from and the intake's first record."""
    submission = given.submission
    window = given.contact_window
    product = given.rules.product(submission.opportunity.product)
    return ReferralState(
        referral_id=given.referral_id,
        stage=Stage.SUBMITTED,
        referrer=submission.referrer,
        prospect=submission.prospect,
        prospect_domain=submission.prospect.domain,
        contact=submission.contact,
        opportunity=submission.opportunity,
        product_name=product.name if product else submission.opportunity.product,
        submitted_at=window.received_at,
        contact_reminder_at=window.reminder_at,
        contact_deadline=window.deadline,
        contact_calendar=window,
        consent=given.consent,
        history=[
            HistoryEntry(at=window.received_at, action="submitted", actor=given.submitted_by, seq=0)
        ],
    )


def allowed_actions(stage: Stage) -> list[Action]:
    return list(TRANSITIONS.get(stage, {}))


def compute_commission(basis: Decimal, currency: str, rules: CommissionRules) -> Decimal:
    """basis x rate, capped, rounded half-up to the currency's minor unit."""
    amount = basis * rules.rate
    if rules.cap is not None:
        amount = min(amount, rules.cap)
    return round_money(amount, currency)


def _refuse_values(state: ReferralState, request: StaffAction, rules: ProgramRules) -> str | None:
    """Why the action's own values are unacceptable, or None."""
    action = request.action
    if action in NEEDS_REASON and not (request.reason or "").strip():
        return f"{action.value} needs a reason (--reason)"
    if action is Action.WON:
        currency = (request.currency or "").strip().upper()
        if not re.fullmatch(r"[A-Z]{3}", currency):
            return "won needs an ISO 4217 currency code (--currency), e.g. EUR"
    if action in (Action.WON, Action.PAYMENT):
        currency = (
            (request.currency or "").strip().upper()
            if action is Action.WON
            else (state.commission.currency if state.commission else "EUR")
        )
        amount = request.amount
        if amount is None or not amount.is_finite():
            return f"{action.value} needs a positive amount (--amount) in {currency}"
        try:
            rounded = round_money(amount, currency)
        except InvalidOperation:  # more digits than Decimal holds: it used to fail the task
            return f"{action.value} amount {amount} is larger than any deal"
        if rounded <= 0:
            return f"{action.value} needs a positive amount (--amount) in {currency}"
    if action is Action.WON:
        if rules.commission.cap is not None and currency != rules.commission.currency:
            return (
                f"the program caps commissions in {rules.commission.currency}; "
                f"record the deal in {rules.commission.currency}"
            )
        if request.payment_terms_days is not None and not 0 <= request.payment_terms_days <= 365:
            return "payment terms must be between 0 and 365 days"
    if action in (Action.PAYMENT, Action.PAYOUT) and not (request.reference or "").strip():
        return f"{action.value} needs a reference (--reference)"
    if action is Action.PAYMENT:
        reference = (request.reference or "").strip()
        if any(p.reference == reference for p in state.payments):
            return f"payment reference {reference!r} is already recorded"
    return None


def check_action(state: ReferralState, request: StaffAction, rules: ProgramRules) -> Refusal | None:
    """The one-line reason this action cannot be applied now, or None if it can."""
    allowed = TRANSITIONS.get(state.stage, {})
    if request.action not in allowed:
        if not allowed:
            return Refusal(reason=f"referral {state.referral_id} is closed ({state.stage.value})")
        names = ", ".join(a.value for a in allowed)
        return Refusal(
            reason=f"{request.action.value} is not allowed in stage {state.stage.value} "
            f"(allowed: {names})"
        )
    reason = _refuse_values(state, request, rules)
    return Refusal(reason=reason) if reason else None


def _history_note(request: StaffAction, currency: str | None) -> str | None:
    parts = [p for p in (request.reason, request.note) if p and p.strip()]
    if request.action in (Action.WON, Action.PAYMENT) and request.amount is not None and currency:
        parts.append(f"amount {round_money(request.amount, currency)} {currency}")
    if request.reference:
        parts.append(f"reference {request.reference.strip()}")
    if request.payment_terms_days is not None:
        parts.append(f"payment terms {request.payment_terms_days} days")
    return "; ".join(parts) or None


def apply_action(
    state: ReferralState, request: StaffAction, rules: ProgramRules, at: datetime
) -> ReferralState | Refusal:
    """The state after `request`, or the reason it is refused (state untouched)."""
    refusal = check_action(state, request, rules)
    if refusal is not None:
        return refusal
    new = state.model_copy(deep=True)
    new.stage = TRANSITIONS[state.stage][request.action]
    currency = new.commission.currency if new.commission else None

    if request.action is Action.WON:
        assert request.amount is not None and request.currency is not None
        currency = request.currency.strip().upper()
        basis = round_money(request.amount, currency)
        terms = request.payment_terms_days
        new.payment_terms_days = rules.payment.default_terms_days if terms is None else terms
        new.payment_due_at = at + timedelta(days=new.payment_terms_days)
        new.commission = Commission(
            basis_amount=basis,
            rate=rules.commission.rate,
            amount=compute_commission(basis, currency, rules.commission),
            currency=currency,
        )
    elif request.action is Action.PAYMENT:
        assert new.commission is not None and request.amount is not None
        amount = round_money(request.amount, new.commission.currency)
        new.payments.append(
            Payment(at=at, amount=amount, reference=(request.reference or "").strip())
        )
        new.commission.customer_paid += amount
        if new.commission.customer_paid >= new.commission.basis_amount:
            new.stage = Stage.COMMISSION_PAYABLE
            new.commission.status = CommissionStatus.PAYABLE
    elif request.action is Action.PAYOUT:
        assert new.commission is not None
        new.commission.status = CommissionStatus.PAID
        new.commission.payout_reference = (request.reference or "").strip()
    elif request.action is Action.CANCEL and new.commission is not None:
        new.commission.status = CommissionStatus.VOID

    if new.is_terminal:
        new.closed_at = at
    new.history.append(
        HistoryEntry(
            at=at,
            action=request.action.value,
            actor=request.actor,
            note=_history_note(request, currency),
            seq=state.next_seq(),
            request_id=request.request_id,
        )
    )
    return new
