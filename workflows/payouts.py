"""Payout runs: what a run holds and the one table of what may happen to it (docs/payouts.md).

A run pays, in one currency, every commission that became payable before its cutoff less the
holding period: one item per payee, listing its referrals, netting what the payee owes from
an earlier clawback. Pure: used by the run's workflow, its update validators and the tests.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel

from workflows.models.referral import StaffAction
from workflows.models.values import Action, round_money


class RunStatus(StrEnum):
    DRAFT = "draft"
    APPROVED = "approved"
    EXPORTED = "exported"
    SENT = "sent"
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"


# A referral in a live run is in no other run.
LIVE = frozenset({RunStatus.DRAFT, RunStatus.APPROVED, RunStatus.EXPORTED, RunStatus.SENT})


class HoldReason(StrEnum):
    """Why an item is not paid in this run; shown to staff and to the payee."""

    NO_PROFILE = "no_profile"
    NO_MANDATE = "no_mandate"
    INVALID_BANK_DETAILS = "invalid_bank_details"
    BANK_REJECTED = "bank_rejected"
    SHARED_IBAN = "shared_iban"
    IBAN_COOLDOWN = "iban_cooldown"
    NEGATIVE_BALANCE = "negative_balance"
    BELOW_MINIMUM = "below_minimum"


# Holds staff may lift for one run (`include` with a reason): judgement calls. The others
# make a payment impossible or unlawful; the payee's details must change first.
LIFTABLE = frozenset({HoldReason.SHARED_IBAN, HoldReason.IBAN_COOLDOWN, HoldReason.BELOW_MINIMUM})


class RunAction(StrEnum):
    APPROVE = "approve"
    EXCLUDE = "exclude"
    INCLUDE = "include"
    EXPORT = "export"
    MARK_SENT = "mark-sent"
    FAIL = "fail"
    CONFIRM = "confirm"
    CANCEL = "cancel"


# The status each action needs; cancel also from approved (below).
NEEDS: dict[RunAction, frozenset[RunStatus]] = {
    RunAction.APPROVE: frozenset({RunStatus.DRAFT}),
    RunAction.EXCLUDE: frozenset({RunStatus.DRAFT}),
    RunAction.INCLUDE: frozenset({RunStatus.DRAFT}),
    RunAction.EXPORT: frozenset({RunStatus.APPROVED}),
    RunAction.MARK_SENT: frozenset({RunStatus.EXPORTED}),
    RunAction.FAIL: frozenset({RunStatus.EXPORTED, RunStatus.SENT}),
    RunAction.CONFIRM: frozenset({RunStatus.SENT}),
    RunAction.CANCEL: frozenset({RunStatus.DRAFT, RunStatus.APPROVED}),
}


class ItemReferral(BaseModel):
    """One payable commission an item pays."""

    referral_id: str
    amount: Decimal
    payable_at: datetime


class Recovery(BaseModel):
    """What an item deducts of one referral's clawback owed after its payout."""

    referral_id: str
    amount: Decimal


class PayoutItem(BaseModel):
    payee_email: str
    currency: str
    referrals: list[ItemReferral]
    gross: Decimal
    recoveries: list[Recovery] = []
    holds: list[HoldReason] = []
    # The payee's VAT rate when they charge French VAT (collected with the item).
    vat_rate: Decimal | None = None
    # Set by staff while the run is a draft: left out (`excluded`) or included despite its
    # holds (`included_by`), each with who and why.
    excluded: str | None = None
    included_by: str | None = None
    statement_number: str | None = None  # given at export
    # The bank rejected the payment (code: reason), and the credit note that cancelled it.
    failed: str | None = None
    credit_note_number: str | None = None

    @property
    def recovered(self) -> Decimal:
        return sum((r.amount for r in self.recoveries), Decimal(0))

    @property
    def base(self) -> Decimal:
        """What the statement invoices before VAT: commissions less clawbacks recovered."""
        return self.gross - self.recovered

    @property
    def vat(self) -> Decimal:
        if self.vat_rate is None or self.base <= 0:
            return Decimal(0)
        return round_money(self.base * self.vat_rate, self.currency)

    @property
    def net(self) -> Decimal:
        """What is transferred: the bank file's amount and the statement's total."""
        return self.base + self.vat

    @property
    def paid(self) -> bool:
        """Paid in this run: not excluded, and either held by nothing or lifted by staff."""
        return self.excluded is None and (not self.holds or self.included_by is not None)

    @property
    def settled(self) -> bool:
        """Confirmed with the run: paid, and the bank did not send it back."""
        return self.paid and self.failed is None


class Approval(BaseModel):
    actor: str
    at: datetime
    surface: str | None = None


class RunRequest(BaseModel):
    """An update to a run, as the CLI and the staff desk send it."""

    action: RunAction
    actor: str
    request_id: str
    payee_email: str | None = None  # exclude, include, fail
    reason: str | None = None  # exclude, include, fail, cancel
    code: str | None = None  # fail: the bank's rejection code (ISO 20022, e.g. AC04)
    execution_date: date | None = None  # export: when the bank is to pay (default: today)
    # confirm: the `payout` of each referral paid, each signed for its referral by the
    # surface that signs this request (`payout_requests` says which).
    payouts: list[StaffAction] = []
    # The surface's signature of the actor (core/actor_assertions.py): money needs one.
    assertion: str | None = None


class RunEvent(BaseModel):
    at: datetime
    action: str
    actor: str
    note: str | None = None
    request_id: str | None = None
    surface: str | None = None


class RunInput(BaseModel):
    run_id: str
    currency: str
    cutoff: date
    approvals_required: int
    prepared_by: str


class RunState(BaseModel):
    run_id: str
    currency: str
    cutoff: date
    status: RunStatus = RunStatus.DRAFT
    approvals_required: int
    items: list[PayoutItem] = []
    approvals: list[Approval] = []
    history: list[RunEvent] = []
    revision: int = 0
    execution_date: date | None = None
    # The bank files' document ids once exported: the SEPA file, the CSV, or both.
    bank_file: str | None = None

    @property
    def total(self) -> Decimal:
        return sum((item.net for item in self.items if item.paid), Decimal(0))

    @property
    def settled_total(self) -> Decimal:
        return sum((item.net for item in self.items if item.settled), Decimal(0))

    def item(self, payee_email: str) -> PayoutItem | None:
        email = payee_email.strip().lower()
        return next((i for i in self.items if i.payee_email == email), None)

    def seen(self, request_id: str) -> bool:
        return any(event.request_id == request_id for event in self.history)


def payout_request_id(run_id: str, referral_id: str) -> str:
    """A referral's payout in a run: the same id however often `confirm` is sent."""
    return f"payout-run-{run_id}/{referral_id}"


def payout_requests(state: RunState, actor: str) -> list[StaffAction]:
    """The `payout` of each referral a confirmed run pays, its statement as reference."""
    return [
        StaffAction(
            action=Action.PAYOUT,
            actor=actor,
            reference=item.statement_number,
            request_id=payout_request_id(state.run_id, referral.referral_id),
        )
        for item in state.items
        if item.settled
        for referral in item.referrals
    ]


def payout_referral(request: StaffAction) -> str:
    """The referral a run's payout request pays (its request id ends with it)."""
    return (request.request_id or "").rpartition("/")[2]


def refusal(state: RunState, request: RunRequest) -> str | None:
    """Why `request` may not apply to the run as it stands (one line), or None."""
    action = request.action
    if state.status not in NEEDS[action]:
        allowed = " or ".join(sorted(s.value for s in NEEDS[action]))
        return f"{action} is for a run that is {allowed}; run {state.run_id} is {state.status}"
    reason = (request.reason or "").strip()
    needs_reason = (RunAction.EXCLUDE, RunAction.INCLUDE, RunAction.CANCEL, RunAction.FAIL)
    if action in needs_reason and not reason:
        return f"{action} needs a reason"
    if action is RunAction.APPROVE:
        actor = request.actor.strip().lower()
        if any(a.actor.strip().lower() == actor for a in state.approvals):
            return (
                f"{request.actor} has already approved run {state.run_id}: another member of "
                "staff must"
            )
        if not any(item.paid for item in state.items):
            return f"run {state.run_id} pays nobody: cancel it instead"
    if action in (RunAction.EXCLUDE, RunAction.INCLUDE, RunAction.FAIL):
        item = state.item(request.payee_email or "")
        if item is None:
            return f"run {state.run_id} has no item for {request.payee_email}"
        if action is RunAction.EXCLUDE and item.excluded is not None:
            return f"{item.payee_email} is already excluded from run {state.run_id}"
        if action is RunAction.INCLUDE:
            if item.paid:
                return f"{item.payee_email} is already paid in run {state.run_id}"
            fixed = [h.value for h in item.holds if h not in LIFTABLE]
            if fixed:
                return (
                    f"{item.payee_email} is held ({', '.join(fixed)}): the payee's details must "
                    "change first"
                )
        if action is RunAction.FAIL:
            if not item.paid:
                return f"{item.payee_email} is not paid in run {state.run_id}"
            if item.failed is not None:
                return f"{item.payee_email}'s payment has already failed ({item.failed})"
            if not (request.code or "").strip():
                return "fail needs the bank's rejection code"
    if action is RunAction.CONFIRM:
        expected = {r.request_id: r.reference for r in payout_requests(state, request.actor)}
        given = {p.request_id: p.reference for p in request.payouts}
        if given != expected or any(p.action is not Action.PAYOUT for p in request.payouts):
            return (
                f"confirm must carry the payout of each referral run {state.run_id} pays "
                f"({len(expected)}), each with its statement's number"
            )
        if any(p.actor != request.actor or payout_referral(p) == "" for p in request.payouts):
            return "confirm's payouts must be the confirming actor's"
    return None


def _recorded(
    new: RunState, request: RunRequest, at: datetime, surface: str | None, note: str | None
) -> RunState:
    new.history.append(
        RunEvent(
            at=at,
            action=request.action.value,
            actor=request.actor,
            note=note,
            request_id=request.request_id,
            surface=surface,
        )
    )
    new.revision += 1
    return new


def apply(state: RunState, request: RunRequest, at: datetime, surface: str | None) -> RunState:
    """The run after `request` (refusal() said None), for the actions without effects:
    approve, exclude, include, mark-sent, cancel."""
    new = state.model_copy(deep=True)
    reason = (request.reason or "").strip() or None
    note = reason
    if request.action is RunAction.APPROVE:
        new.approvals.append(Approval(actor=request.actor, at=at, surface=surface))
        if len(new.approvals) >= new.approvals_required:
            new.status = RunStatus.APPROVED
        note = f"approval {len(new.approvals)} of {new.approvals_required}"
    elif request.action is RunAction.CANCEL:
        new.status = RunStatus.CANCELLED
    elif request.action is RunAction.MARK_SENT:
        new.status = RunStatus.SENT
    elif request.action in (RunAction.EXCLUDE, RunAction.INCLUDE):
        item = new.item(request.payee_email or "")
        assert item is not None
        note = f"{item.payee_email}: {reason}"
        if request.action is RunAction.EXCLUDE:
            item.excluded, item.included_by = f"{request.actor}: {reason}", None
        else:
            item.excluded, item.included_by = None, f"{request.actor}: {reason}"
        new.approvals = []  # what was approved changed: approve it again
    else:
        raise ValueError(f"{request.action} has effects: see exported, failed, confirmed")
    return _recorded(new, request, at, surface, note)


def exported(
    state: RunState,
    request: RunRequest,
    at: datetime,
    surface: str | None,
    numbers: dict[str, str],
    bank_file: str,
    execution_date: date,
) -> RunState:
    """The run once its bank file and statements are written: each paid item's number."""
    new = state.model_copy(deep=True)
    for item in new.items:
        if item.paid:
            item.statement_number = numbers[item.payee_email]
    new.status, new.bank_file, new.execution_date = RunStatus.EXPORTED, bank_file, execution_date
    note = f"{len(numbers)} statements, {bank_file}, to pay on {execution_date.isoformat()}"
    return _recorded(new, request, at, surface, note)


def failed(
    state: RunState, request: RunRequest, at: datetime, surface: str | None, credit_note: str
) -> RunState:
    """One item's payment came back: cancelled by `credit_note`, its referrals still due."""
    new = state.model_copy(deep=True)
    item = new.item(request.payee_email or "")
    assert item is not None
    item.failed = f"{(request.code or '').strip()}: {(request.reason or '').strip()}"
    item.credit_note_number = credit_note
    note = f"{item.payee_email}: {item.failed}; credit note {credit_note}"
    return _recorded(new, request, at, surface, note)


def confirmed(
    state: RunState, request: RunRequest, at: datetime, surface: str | None, problems: list[str]
) -> RunState:
    """The run once every settled referral is paid: `problems` are what a referral refused
    (already paid outside the run, say), for staff to look at."""
    new = state.model_copy(deep=True)
    new.status = RunStatus.CONFIRMED
    paid = sum(len(item.referrals) for item in new.items if item.settled)
    note = f"{paid} referrals paid, {new.settled_total} {new.currency}"
    if problems:
        note += "; " + "; ".join(problems)
    return _recorded(new, request, at, surface, note)
