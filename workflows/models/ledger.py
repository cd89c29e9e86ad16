"""The commission ledger: a referral's commission, the payments and refunds behind it, and
the append-only lines each event adds."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import (
    BaseModel,
)

if TYPE_CHECKING:  # the referral holds its commission: imported here only for typing
    from workflows.models.referral import ReferralState


class CommissionStatus(StrEnum):
    PENDING = "pending"
    PAYABLE = "payable"
    PAID = "paid"
    VOID = "void"


class Commission(BaseModel):
    basis_amount: Decimal
    rate: Decimal
    amount: Decimal
    currency: str
    customer_paid: Decimal = Decimal("0")
    status: CommissionStatus = CommissionStatus.PENDING
    payout_reference: str | None = None
    customer_refunded: Decimal = Decimal("0")
    # Commission taken back by refunds, before or after payout.
    clawed_back: Decimal = Decimal("0")
    paid_amount: Decimal | None = None

    @property
    def net(self) -> Decimal:
        """What the referrer is owed in all, refunds deducted."""
        return self.amount - self.clawed_back


class Payment(BaseModel):
    at: datetime
    amount: Decimal
    reference: str


class Refund(BaseModel):
    """A customer refund or credit note, and the commission it takes back."""

    at: datetime
    amount: Decimal
    reference: str
    reason: str
    clawback: Decimal


class LineKind(StrEnum):
    ACCRUAL = "accrual"  # on `won`: the commission is earned, pending the customer's payment
    PAYABLE = "payable"  # the customer has paid in full: this much is to be paid out
    PAID = "paid"  # paid out (with the payout reference)
    CLAWBACK = "clawback"  # negative: a customer refund takes its share back
    VOID = "void"  # negative: the referral was cancelled before payout
    # Negative: a clawback owed after payout, deducted from a later payout (on the referral
    # that owed it, the statement's number as reference). Counted with what was paid.
    RECOVERED = "recovered"


# The kinds that change what the referrer is owed; payable and paid lines move money.
ENTITLEMENT_KINDS = frozenset({LineKind.ACCRUAL, LineKind.CLAWBACK, LineKind.VOID})


class CommissionLine(BaseModel):
    """One append-only line of the commission ledger; a written line is never edited."""

    kind: LineKind
    amount: Decimal
    currency: str
    at: datetime
    reference: str | None = None
    reason: str | None = None


class CommissionRecord(BaseModel):
    """The commission ledger row as it must be after `event_key` (an idempotent upsert)."""

    referral_id: str
    referrer_email: str
    referrer_name: str
    basis_amount: Decimal
    rate: Decimal
    amount: Decimal
    currency: str
    customer_paid: Decimal
    status: CommissionStatus
    event_key: str
    event: str
    at: datetime
    actor: str
    note: str | None = None
    # The ledger lines this event adds (unique per event_key and kind).
    lines: list[CommissionLine] = []

    @classmethod
    def after(
        cls,
        state: ReferralState,
        *,
        event: str,
        event_key: str,
        at: datetime,
        actor: str,
        note: str | None,
    ) -> CommissionRecord:
        """The ledger row of `state`'s commission, once `event` is applied."""
        commission = state.commission
        assert commission is not None
        return cls(
            referral_id=state.referral_id,
            referrer_email=str(state.referrer.email),
            referrer_name=state.referrer.name,
            basis_amount=commission.basis_amount,
            rate=commission.rate,
            amount=commission.amount,
            currency=commission.currency,
            customer_paid=commission.customer_paid,
            status=commission.status,
            event_key=event_key,
            event=event,
            at=at,
            actor=actor,
            note=note,
        )
