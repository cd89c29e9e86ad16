"""The referral state machine: one table, one pure function.

`apply_action` is used by the update validators, the update and signal
handlers and the tests, so a decision is judged the same way whichever path
it arrives by. It never mutates its input.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

from workflows.models.ledger import (
    Commission,
    CommissionLine,
    CommissionStatus,
    LineKind,
    Payment,
    Refund,
)
from workflows.models.program import CommissionRules, ProgramRules
from workflows.models.referral import (
    HistoryEntry,
    ReferralInput,
    ReferralState,
    Refusal,
    StaffAction,
    Stage,
)
from workflows.models.values import Action, round_money

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
        Action.EXTEND: Stage.QUALIFYING,
    },
    Stage.APPROVED: {
        Action.WON: Stage.WON,
        Action.LOST: Stage.LOST,
        Action.CANCEL: Stage.CANCELLED,
        Action.EXTEND: Stage.APPROVED,
    },
    Stage.WON: {
        Action.PAYMENT: Stage.WON,
        Action.CANCEL: Stage.CANCELLED,
    },
    Stage.COMMISSION_PAYABLE: {
        Action.PAYOUT: Stage.COMMISSION_PAID,
        Action.REFUND: Stage.COMMISSION_PAYABLE,
    },
    # Only while the clawback window after payout is open (see `allowed_actions`).
    Stage.COMMISSION_PAID: {
        Action.REFUND: Stage.COMMISSION_PAID,
    },
}

NEEDS_REASON = frozenset(
    {Action.DECLINE, Action.REJECT, Action.LOST, Action.CANCEL, Action.EXTEND, Action.REFUND}
)
MAX_EXTENSION_DAYS = 365


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
        prospect_domain=given.prospect_domain or submission.prospect.domain,
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


def allowed_actions(state: ReferralState) -> list[Action]:
    """What may happen next; nothing once the referral is closed."""
    return [] if state.is_terminal else list(TRANSITIONS.get(state.stage, {}))


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
        return f"{action.value} needs a reason"
    if action is Action.WON:
        currency = (request.currency or "").strip().upper()
        if not re.fullmatch(r"[A-Z]{3}", currency):
            return "won needs an ISO 4217 currency code, e.g. EUR"
    if action in (Action.WON, Action.PAYMENT, Action.REFUND):
        currency = (
            (request.currency or "").strip().upper()
            if action is Action.WON
            else (state.commission.currency if state.commission else "EUR")
        )
        amount = request.amount
        if amount is None or not amount.is_finite():
            return f"{action.value} needs a positive amount in {currency}"
        try:
            rounded = round_money(amount, currency)
        except InvalidOperation:  # more digits than Decimal holds: it used to fail the task
            return f"{action.value} amount {amount} is larger than any deal"
        if rounded <= 0:
            return f"{action.value} needs a positive amount in {currency}"
    if action is Action.WON:
        terms = rules.commission_for(state.opportunity.product)
        if terms.cap is not None and currency != terms.currency:
            return (
                f"the program caps commissions in {terms.currency}; "
                f"record the deal in {terms.currency}"
            )
        if request.payment_terms_days is not None and not 0 <= request.payment_terms_days <= 365:
            return "payment terms must be between 0 and 365 days"
    if (
        action in (Action.PAYMENT, Action.PAYOUT, Action.REFUND)
        and not (request.reference or "").strip()
    ):
        return f"{action.value} needs a reference"
    if action is Action.PAYMENT:
        reference = (request.reference or "").strip()
        if any(p.reference == reference for p in state.payments):
            return f"payment reference {reference!r} is already recorded"
    if action is Action.REFUND:
        return _refuse_refund(state, request)
    if action is Action.EXTEND:
        return _refuse_extension(state, request, rules)
    return None


def _refuse_refund(state: ReferralState, request: StaffAction) -> str | None:
    commission = state.commission
    assert commission is not None and request.amount is not None
    reference = (request.reference or "").strip()
    if any(r.reference == reference for r in state.refunds):
        return f"refund reference {reference!r} is already recorded"
    refundable = commission.customer_paid - commission.customer_refunded
    if round_money(request.amount, commission.currency) > refundable:
        return (
            f"a refund of {round_money(request.amount, commission.currency)} exceeds what the "
            f"customer paid and was not refunded ({refundable} {commission.currency})"
        )
    return None


def _refuse_extension(
    state: ReferralState, request: StaffAction, rules: ProgramRules
) -> str | None:
    if request.days is None or not 1 <= request.days <= MAX_EXTENSION_DAYS:
        return f"extend needs a number of days between 1 and {MAX_EXTENSION_DAYS}"
    if state.protected_until is None:
        return f"referral {state.referral_id} has no protection to extend"
    if state.protection_extensions >= rules.protection.max_extensions:
        return (
            f"the protection was already extended {state.protection_extensions} times, "
            "the most the program allows"
        )
    return None


def check_action(state: ReferralState, request: StaffAction, rules: ProgramRules) -> Refusal | None:
    """The one-line reason this action cannot be applied now, or None if it can."""
    allowed = allowed_actions(state)
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
    with_amount = (Action.WON, Action.PAYMENT, Action.REFUND)
    if request.action in with_amount and request.amount is not None and currency:
        parts.append(f"amount {round_money(request.amount, currency)} {currency}")
    if request.action is Action.EXTEND and request.days is not None:
        parts.append(f"extended by {request.days} days")
    if request.reference:
        parts.append(f"reference {request.reference.strip()}")
    if request.payment_terms_days is not None:
        parts.append(f"payment terms {request.payment_terms_days} days")
    return "; ".join(parts) or None


def refund(state: ReferralState, request: StaffAction, at: datetime) -> Refund:
    """The refund, and the commission it takes back: the commission's share of the basis
    that was refunded, rounded half-up, never more than what is left of the commission."""
    commission = state.commission
    assert commission is not None and request.amount is not None
    amount = round_money(request.amount, commission.currency)
    share = commission.amount * amount / commission.basis_amount
    clawback = min(round_money(share, commission.currency), commission.net)
    return Refund(
        at=at,
        amount=amount,
        reference=(request.reference or "").strip(),
        reason=(request.reason or "").strip(),
        clawback=clawback,
    )


def expire(state: ReferralState, at: datetime) -> ReferralState:
    """The protection ended before the deal was won or lost."""
    new = state.model_copy(deep=True)
    new.stage = Stage.EXPIRED
    new.closed_at = at
    ends = f"{state.protected_until:%Y-%m-%d}" if state.protected_until else "now"
    new.history.append(
        HistoryEntry(
            at=at,
            action="expire",
            actor="system",
            note=f"protection ended {ends}; the prospect is released",
            outcome="system",
            seq=state.next_seq(),
        )
    )
    return new


def commission_lines(
    before: ReferralState, after: ReferralState, request: StaffAction
) -> list[CommissionLine]:
    """The ledger lines an applied action adds; entitlement lines sum to the net commission."""
    commission = after.commission
    if commission is None:
        return []
    at = after.history[-1].at

    def line(kind: LineKind, amount: Decimal, reference: str | None = None) -> CommissionLine:
        reason = request.reason if kind in (LineKind.CLAWBACK, LineKind.VOID) else None
        return CommissionLine(
            kind=kind,
            amount=amount,
            currency=commission.currency,
            at=at,
            reference=reference,
            reason=(reason or "").strip() or None,
        )

    action = request.action
    reference = (request.reference or "").strip() or None
    lines = []
    if action is Action.WON:
        lines.append(line(LineKind.ACCRUAL, commission.amount))
    if before.stage is not Stage.COMMISSION_PAYABLE and after.stage is Stage.COMMISSION_PAYABLE:
        lines.append(line(LineKind.PAYABLE, commission.net))
    if action is Action.PAYOUT:
        lines.append(line(LineKind.PAID, commission.paid_amount or commission.net, reference))
    if action is Action.REFUND and after.refunds[-1].clawback:
        lines.append(line(LineKind.CLAWBACK, -after.refunds[-1].clawback, reference))
    if action is Action.CANCEL and commission.net:
        lines.append(line(LineKind.VOID, -commission.net))
    return lines


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
        days = request.payment_terms_days
        new.payment_terms_days = rules.payment.default_terms_days if days is None else days
        new.payment_due_at = at + timedelta(days=new.payment_terms_days)
        terms = rules.commission_for(state.opportunity.product)
        new.commission = Commission(
            basis_amount=basis,
            rate=terms.rate,
            amount=compute_commission(basis, currency, terms),
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
        new.commission.paid_amount = new.commission.net
    elif request.action is Action.CANCEL and new.commission is not None:
        new.commission.status = CommissionStatus.VOID
    elif request.action is Action.ACCEPT:
        new.protected_until = at + timedelta(days=rules.protection.days)
    elif request.action is Action.EXTEND:
        assert new.protected_until is not None and request.days is not None
        new.protected_until += timedelta(days=request.days)
        new.protection_extensions += 1
        new.protection_warning_sent = False
    elif request.action is Action.REFUND:
        assert new.commission is not None and request.amount is not None
        new.refunds.append(refund(new, request, at))
        new.commission.customer_refunded += new.refunds[-1].amount
        new.commission.clawed_back += new.refunds[-1].clawback

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
