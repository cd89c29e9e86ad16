"""The system of record: each referral's facts and its event log, in the database.

The workflow writes it after every change (activity `record_referral`); the
intake writes a referral's first row. Staff views, the status page and the
ledger read it, so they answer without a worker and after Temporal's retention
has deleted a closed workflow.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete, select
from temporalio import activity
from temporalio.client import Client

from activities.db import (
    ReceiptDisclosureRow,
    ReferralEventRow,
    ReferralRow,
    WebhookDeliveryRow,
)
from activities.receipts import follow_up, instant
from activities.webhooks import enqueue_deliveries, pending_deliveries, start_deliveries
from core import receipts
from workflows.models.referral import HistoryEntry, ReferralRecord, ReferralState
from workflows.referral import RECORD_REFERRAL


def write_referral(session: Session, record: ReferralRecord) -> None:
    """Upsert the referral's row (unless it already holds a later revision) and append the
    events it does not have yet, with their webhook deliveries (activities.webhooks).
    Idempotent; the caller commits."""
    state = record.state
    row = session.get(ReferralRow, state.referral_id)
    if row is None:
        session.add(ReferralRow(referral_id=state.referral_id, **_facts(state)))
    elif row.revision <= state.revision:
        row.sqlmodel_update(_facts(state))
        session.add(row)
    stored = set(
        session.exec(
            select(ReferralEventRow.seq).where(ReferralEventRow.referral_id == state.referral_id)
        )
    )
    added = []
    for entry in record.events:
        if entry.seq is not None and entry.seq not in stored:
            stored.add(entry.seq)
            added.append(entry)
            session.add(
                ReferralEventRow(
                    referral_id=state.referral_id,
                    seq=entry.seq,
                    at=entry.at,
                    action=entry.action,
                    actor=entry.actor,
                    note=entry.note,
                    outcome=entry.outcome,
                    request_id=entry.request_id,
                    surface=entry.surface,
                )
            )
    enqueue_deliveries(session, state, added)
    for entry in added:
        _receipt_for(session, state, entry)


# The events that change a registration's standing, and the receipt each one gets.
RECEIPT_KINDS = {
    "accept": receipts.ACCEPTED,
    "extend": receipts.EXTENDED,
    "expire": receipts.EXPIRED,
}


def _receipt_for(session: Session, state: ReferralState, entry: HistoryEntry) -> None:
    kind = RECEIPT_KINDS.get(entry.action)
    if kind is None or entry.outcome == "refused":
        return
    decision: dict[str, Any] = {"status": kind, "protected_until": instant(state.protected_until)}
    if kind == receipts.EXTENDED:
        decision["extensions"] = state.protection_extensions
    follow_up(session, state.referral_id, kind, f"{state.referral_id}/{kind}/{entry.seq}", decision)


def _facts(state: ReferralState) -> dict[str, Any]:
    commission = state.commission
    return {
        "stage": state.stage.value,
        "prospect_company": state.prospect.company,
        "prospect_domain": state.prospect_domain,
        "product": state.opportunity.product,
        "referrer_email": str(state.referrer.email).lower(),
        "submitted_at": state.submitted_at,
        "contact_deadline": state.contact_deadline,
        "contact_sla_breached": state.contact_sla_breached,
        "commission_amount": commission.amount if commission else None,
        "commission_currency": commission.currency if commission else None,
        "commission_status": commission.status.value if commission else None,
        "customer_paid": commission.customer_paid if commission else None,
        "closed_at": state.closed_at
        or (state.history[-1].at if state.is_terminal and state.history else None),
        "revision": state.revision,
        "state": state.model_copy(update={"history": []}).model_dump_json(),
        "updated_at": datetime.now(UTC),
        "erased_at": state.erased.at if state.erased else None,
        "protected_until": state.protected_until,
    }


def save_referral(engine: Engine, record: ReferralRecord) -> None:
    with Session(engine) as session:
        write_referral(session, record)
        session.commit()


def discard_referral(engine: Engine, referral_id: str) -> None:
    """Forget a referral whose workflow could not be started (the submission failed)."""
    with Session(engine) as session:
        session.exec(
            delete(ReferralEventRow).where(col(ReferralEventRow.referral_id) == referral_id)
        )
        session.exec(delete(ReferralRow).where(col(ReferralRow.referral_id) == referral_id))
        session.exec(
            delete(WebhookDeliveryRow).where(col(WebhookDeliveryRow.referral_id) == referral_id)
        )
        session.exec(
            delete(ReceiptDisclosureRow).where(col(ReceiptDisclosureRow.referral_id) == referral_id)
        )
        session.commit()


class RecordActivities:
    def __init__(self, engine: Engine, client: Client) -> None:
        self._engine = engine
        self._client = client

    @activity.defn(name=RECORD_REFERRAL)
    async def record_referral(self, record: ReferralRecord) -> None:
        """Write one change of a referral to the system of record, then start the delivery
        of its webhook messages (none unless program.yaml has webhooks)."""
        pending = await asyncio.to_thread(self._save, record)
        activity.logger.info(
            "recorded at stage %s, revision %d", record.state.stage.value, record.state.revision
        )
        await start_deliveries(self._client, pending, activity.info().task_queue)

    def _save(self, record: ReferralRecord) -> list[WebhookDeliveryRow]:
        """One trip to a thread: the write, then the deliveries it left pending."""
        save_referral(self._engine, record)
        seqs = [entry.seq for entry in record.events]
        return pending_deliveries(self._engine, record.state.referral_id, seqs)


# --- reading ----------------------------------------------------------------------------------
