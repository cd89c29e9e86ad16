"""Commission ledger and prospect claims: idempotent database writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Select, case, func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete, select
from temporalio import activity

from activities.db import CommissionEvent, CommissionLineRow, CommissionRow, ProspectClaim
from activities.receipts import release
from workflows.models.ledger import CommissionRecord, LineKind
from workflows.models.referral import ProspectRelease
from workflows.referral import RECORD_COMMISSION, RELEASE_PROSPECT


def save_commission(engine: Engine, record: CommissionRecord) -> bool:
    """Bring the ledger row to `record`; False if this event was already recorded."""
    with Session(engine) as session:
        seen = session.exec(
            select(CommissionEvent).where(CommissionEvent.event_key == record.event_key)
        ).first()
        if seen is not None:
            return False
        row = session.get(CommissionRow, record.referral_id) or CommissionRow(
            referral_id=record.referral_id,
            referrer_email=record.referrer_email,
            referrer_name=record.referrer_name,
            basis_amount=record.basis_amount,
            rate=record.rate,
            amount=record.amount,
            currency=record.currency,
            customer_paid=record.customer_paid,
            status=record.status.value,
            updated_at=record.at,
        )
        row.customer_paid = record.customer_paid
        row.status = record.status.value
        row.updated_at = record.at
        session.add(row)
        session.add(
            CommissionEvent(
                event_key=record.event_key,
                referral_id=record.referral_id,
                event=record.event,
                status=record.status.value,
                customer_paid=record.customer_paid,
                at=record.at,
                actor=record.actor,
                note=record.note,
            )
        )
        for line in record.lines:  # in the same transaction: written once with the event
            session.add(
                CommissionLineRow(
                    line_key=f"{record.event_key}/{line.kind.value}",
                    referral_id=record.referral_id,
                    referrer_email=record.referrer_email.lower(),
                    kind=line.kind.value,
                    amount=line.amount,
                    currency=line.currency,
                    reference=line.reference,
                    reason=line.reason,
                    at=line.at,
                    actor=record.actor,
                )
            )
        session.commit()
        return True


@dataclass(frozen=True)
class Balance:
    """One referrer's standing in one currency (or on one referral), from the ledger's lines.

    earned: commissions won, less those voided; clawed_back: taken back by refunds;
    paid: paid out, less what a payout recovered of an earlier clawback; payable: the
    customer has paid in full and the commission awaits payout
    (the payable lines, less the clawbacks that lowered them, of referrals not paid out yet).
    balance = earned - clawed_back - paid: positive, still owed to the referrer; negative,
    owed to us (a clawback after payout), to net on the next payout."""

    referrer_email: str
    currency: str
    earned: Decimal
    clawed_back: Decimal
    paid: Decimal
    payable: Decimal

    @property
    def balance(self) -> Decimal:
        return self.earned - self.clawed_back - self.paid

    @property
    def owed_to_us(self) -> Decimal:
        return max(Decimal(0), -self.balance)


_LINE: Any = CommissionLineRow.__table__.c  # type: ignore[attr-defined]


def ledger_sums(*group: Any) -> Select[Any]:
    """The sums of `Balance`, per `group` (the grouping columns come first in each row)."""

    def total(*kinds: LineKind, unpaid_only: bool = False) -> ColumnElement[Decimal]:
        picked = _LINE.kind.in_([k.value for k in kinds])
        if unpaid_only:
            paid_out = sa_select(_LINE.referral_id).where(_LINE.kind == LineKind.PAID.value)
            picked = picked & _LINE.referral_id.not_in(paid_out)
        return func.coalesce(func.sum(case((picked, _LINE.amount), else_=0)), 0)

    return (
        sa_select(
            *group,
            total(LineKind.ACCRUAL, LineKind.VOID),
            total(LineKind.CLAWBACK),
            total(LineKind.PAID, LineKind.RECOVERED),
            total(LineKind.PAYABLE, LineKind.CLAWBACK, unpaid_only=True),
        )
        .group_by(*group)
        .order_by(*group)
    )


def _balance(email: str, currency: str, sums: Sequence[Any]) -> Balance:
    earned, clawed, paid, payable = (Decimal(value) for value in sums)
    return Balance(email, currency, earned, -clawed, paid, payable)


def balances(
    engine: Engine, referrer_email: str | None = None, exclude_referral: str | None = None
) -> list[Balance]:
    """Per referrer and currency, summed by the database."""
    query = ledger_sums(_LINE.referrer_email, _LINE.currency)
    if referrer_email is not None:
        query = query.where(_LINE.referrer_email == referrer_email.lower())
    if exclude_referral is not None:
        query = query.where(_LINE.referral_id != exclude_referral)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [_balance(email, currency, sums) for email, currency, *sums in rows]


def referral_balances(engine: Engine, referrer_email: str) -> dict[str, Balance]:
    """The same sums per referral of one referrer (a referral has one currency): each row of
    a statement, whose totals `balances` gives."""
    email = referrer_email.lower()
    query = ledger_sums(_LINE.referral_id, _LINE.currency).where(_LINE.referrer_email == email)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return {referral: _balance(email, currency, sums) for referral, currency, *sums in rows}


def ledger_lines(engine: Engine) -> list[CommissionLineRow]:
    with Session(engine) as session:
        query = select(CommissionLineRow).order_by(
            col(CommissionLineRow.at), col(CommissionLineRow.id)
        )
        return list(session.exec(query).all())


def release_claim(engine: Engine, domain: str, referral_id: str) -> None:
    """A closed referral frees its prospect for a new referral (only its own claim), with
    the `released` receipt that says so, in one transaction."""
    with Session(engine) as session:
        freed = session.exec(
            delete(ProspectClaim).where(
                ProspectClaim.domain == domain,  # type: ignore[arg-type]
                ProspectClaim.referral_id == referral_id,  # type: ignore[arg-type]
            )
        )
        if freed.rowcount:
            release(session, referral_id)
        session.commit()


class LedgerActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name=RECORD_COMMISSION)
    def record_commission(self, record: CommissionRecord) -> bool:
        """Bring the ledger row to `record`; False if this event was already recorded."""
        return save_commission(self._engine, record)

    @activity.defn(name=RELEASE_PROSPECT)
    def release_prospect(self, release: ProspectRelease) -> None:
        release_claim(self._engine, release.domain, release.referral_id)
