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
    CANCEL = "cancel"


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
    # Set by staff while the run is a draft: left out (`excluded`) or included despite its
    # holds (`included_by`), each with who and why.
    excluded: str | None = None
    included_by: str | None = None

    @property
    def recovered(self) -> Decimal:
        return sum((r.amount for r in self.recoveries), Decimal(0))

    @property
    def net(self) -> Decimal:
        return self.gross - self.recovered

    @property
    def paid(self) -> bool:
        """Paid in this run: not excluded, and either held by nothing or lifted by staff."""
        return self.excluded is None and (not self.holds or self.included_by is not None)


class Approval(BaseModel):
    actor: str
    at: datetime
    surface: str | None = None


class RunRequest(BaseModel):
    """An update to a run, as the CLI and the staff desk send it."""

    action: RunAction
    actor: str
    request_id: str
    payee_email: str | None = None  # exclude, include
    reason: str | None = None  # exclude, include, cancel
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

    @property
    def total(self) -> Decimal:
        return sum((item.net for item in self.items if item.paid), Decimal(0))

    def item(self, payee_email: str) -> PayoutItem | None:
        email = payee_email.strip().lower()
        return next((i for i in self.items if i.payee_email == email), None)

    def seen(self, request_id: str) -> bool:
        return any(event.request_id == request_id for event in self.history)


def refusal(state: RunState, request: RunRequest) -> str | None:
    """Why `request` may not apply to the run as it stands (one line), or None."""
    action = request.action
    if state.status is not RunStatus.DRAFT and not (
        action is RunAction.CANCEL and state.status is RunStatus.APPROVED
    ):
        allowed = "a draft or approved run" if action is RunAction.CANCEL else "a draft run"
        return f"{action} is for {allowed}; run {state.run_id} is {state.status}"
    reason = (request.reason or "").strip()
    if action in (RunAction.EXCLUDE, RunAction.INCLUDE, RunAction.CANCEL) and not reason:
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
    if action in (RunAction.EXCLUDE, RunAction.INCLUDE):
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
    return None


def apply(state: RunState, request: RunRequest, at: datetime, surface: str | None) -> RunState:
    """The run after `request` (refusal() said None)."""
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
    else:
        item = new.item(request.payee_email or "")
        assert item is not None
        note = f"{item.payee_email}: {reason}"
        if request.action is RunAction.EXCLUDE:
            item.excluded, item.included_by = f"{request.actor}: {reason}", None
        else:
            item.excluded, item.included_by = None, f"{request.actor}: {reason}"
        new.approvals = []  # what was approved changed: approve it again
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
