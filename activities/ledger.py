"""Commission ledger and prospect claims: idempotent database writes."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import Session, delete, select
from temporalio import activity

from activities.db import CommissionEvent, CommissionRow, ProspectClaim
from workflows.models import CommissionRecord, ProspectRelease


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
        session.commit()
        return True


def release_claim(engine: Engine, domain: str, referral_id: str) -> None:
    """A closed referral frees its prospect for a new referral (only its own claim)."""
    with Session(engine) as session:
        session.exec(
            delete(ProspectClaim).where(
                ProspectClaim.domain == domain,  # type: ignore[arg-type]
                ProspectClaim.referral_id == referral_id,  # type: ignore[arg-type]
            )
        )
        session.commit()


class LedgerActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="record_commission")
    def record_commission(self, record: CommissionRecord) -> bool:
        """Bring the ledger row to `record`; False if this event was already recorded."""
        return save_commission(self._engine, record)

    @activity.defn(name="release_prospect")
    def release_prospect(self, release: ProspectRelease) -> None:
        release_claim(self._engine, release.domain, release.referral_id)
