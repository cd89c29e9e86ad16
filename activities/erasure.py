"""Erasure: a closed referral's personal data is deleted from Temporal and replaced by a
pseudonym in the database, on request (`referrals erase`) or when the retention period
has passed (the daily Schedule `referrals-retention`).

What accounting needs stays: stages, dates, amounts, payment and payout references, the
prospect company and product, and who did what among staff. What identifies a person
goes: the referrer's and the contact's names, addresses, phones and company, free-text
notes and refund reasons (they may name people), the referrer's address in the actor of a
web submission, the sent-email log and the ledger, what webhook endpoints answered (an
endpoint may echo a message back), the referral's webhook delivery workflows, and in the
dev stack its emails' files. Webhook endpoints subscribed to `referral.erased` are told,
so they can erase their copies. On SQLite the write-ahead log is emptied, so no copy of
the old rows stays in it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.db import (
    CommissionEvent,
    CommissionLineRow,
    CommissionRow,
    ReferralEventRow,
    ReferralRow,
    SentEmail,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    as_utc,
)
from activities.payees import erase_payee
from activities.queries import load_referral
from activities.receipts import forget_disclosures
from activities.records import write_referral
from activities.webhooks import pending_deliveries, start_deliveries, workflow_id
from core.errors import Refused
from workflows.models.referral import (
    Contact,
    Erasure,
    HistoryEntry,
    ReferralRecord,
    ReferralState,
    Referrer,
    RetentionReport,
)
from workflows.retention import ERASE_EXPIRED

ERASED = "erased"

RPC_TIMEOUT = timedelta(seconds=10)  # every call to Temporal here has a deadline


def pseudonym(referral_id: str) -> str:
    """What stands for the referrer from now on; it identifies the referral, not a person."""
    return f"erased-{referral_id.lower()}"


def erased_state(state: ReferralState, erasure: Erasure) -> ReferralState:
    name = pseudonym(state.referral_id)
    erased = state.model_copy(deep=True)
    erased.referrer = Referrer(
        name=name,
        email=f"{name}@erased.example",
        company=ERASED,
        language=state.referrer.language,
    )
    erased.contact = Contact(name=ERASED, email=f"{name}-contact@erased.example")
    erased.opportunity = state.opportunity.model_copy(update={"notes": None})
    erased.refunds = [refund.model_copy(update={"reason": ERASED}) for refund in state.refunds]
    erased.history = []
    erased.erased = erasure
    erased.revision = state.revision + 1
    return erased


async def delete_executions(client: Client, workflow_id: str) -> int:
    """Delete every run of a workflow (an upgraded referral has two): its payloads,
    encrypted or not, go with them."""
    runs = {
        wf.run_id
        async for wf in client.list_workflows(
            f"WorkflowId = '{workflow_id}'", rpc_timeout=RPC_TIMEOUT
        )
    }
    try:  # the latest run, which visibility may not list yet
        latest = await client.get_workflow_handle(workflow_id).describe(rpc_timeout=RPC_TIMEOUT)
        runs.add(latest.run_id)
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
    deleted = 0
    for run_id in sorted(runs):
        request = DeleteWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
        )
        try:
            await client.workflow_service.delete_workflow_execution(request, timeout=RPC_TIMEOUT)
            deleted += 1
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
    return deleted


def _delivery_workflows(engine: Engine, referral_id: str) -> list[str]:
    """Every workflow that delivered one of the referral's webhook messages: the first, and
    each redelivery."""
    with Session(engine) as session:
        rows = session.exec(
            select(WebhookDeliveryRow).where(WebhookDeliveryRow.referral_id == referral_id)
        ).all()
    return [
        workflow_id(row.model_copy(update={"redeliveries": number}))
        for row in rows
        for number in range(row.redeliveries + 1)
    ]


def _pseudonymize(engine: Engine, state: ReferralState, erasure: Erasure) -> HistoryEntry:
    """Every row of the referral, in one transaction; returns the erasure's event."""
    erased = erased_state(state, erasure)
    addresses = {str(state.referrer.email), str(state.contact.email)}
    with Session(engine) as session:
        events = session.exec(
            select(ReferralEventRow).where(ReferralEventRow.referral_id == state.referral_id)
        ).all()
        for event in events:
            event.note = None
            if event.actor.startswith("web:"):
                event.actor = "referrer"
            session.add(event)
        mark = HistoryEntry(
            at=erasure.at,
            action="erase",
            actor=erasure.by,
            note=erasure.reason,
            outcome="system",
            seq=state.next_seq(),
        )
        write_referral(session, ReferralRecord(state=erased, events=[mark]))
        sent = session.exec(
            select(SentEmail).where(col(SentEmail.key).startswith(f"{state.referral_id}/"))
        ).all()
        for email in sent:
            email.recipients = ", ".join(
                erased.referrer.email if to.strip() in addresses else to.strip()
                for to in email.recipients.split(",")
            )
            session.add(email)
        ledger = session.get(CommissionRow, state.referral_id)
        if ledger is not None:
            ledger.referrer_email = str(erased.referrer.email)
            ledger.referrer_name = erased.referrer.name
            session.add(ledger)
        for entry in session.exec(
            select(CommissionEvent).where(CommissionEvent.referral_id == state.referral_id)
        ).all():
            entry.note = None
            session.add(entry)
        for line in session.exec(
            select(CommissionLineRow).where(CommissionLineRow.referral_id == state.referral_id)
        ).all():
            line.referrer_email = str(erased.referrer.email)
            line.reason = None
            session.add(line)
        referrer = str(state.referrer.email).lower()
        others = select(ReferralRow.referral_id).where(
            ReferralRow.referrer_email == referrer,
            ReferralRow.referral_id != state.referral_id,
            col(ReferralRow.erased_at).is_(None),
        )
        if session.exec(others).first() is None:  # their last referral: the payee goes too
            erase_payee(session, referrer)
        deliveries = select(WebhookDeliveryRow.id).where(
            WebhookDeliveryRow.referral_id == state.referral_id
        )
        for attempt in session.exec(
            select(WebhookAttemptRow).where(col(WebhookAttemptRow.delivery_id).in_(deliveries))
        ).all():
            if attempt.error:  # the status stays; what the endpoint answered goes
                attempt.error = attempt.error.partition(":")[0]
                session.add(attempt)
        for delivery in session.exec(
            select(WebhookDeliveryRow).where(WebhookDeliveryRow.referral_id == state.referral_id)
        ).all():
            if delivery.last_outcome:
                delivery.last_outcome = delivery.last_outcome.partition(":")[0]
                session.add(delivery)
        # Its receipts stay, chained and signed; what opens their commitments goes.
        forget_disclosures(session, state.referral_id)
        session.commit()
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return mark


def _delete_mail_files(maildir: Path, referral_id: str) -> int:
    """The dev stack keeps every email sent as a file: those about the referral go."""
    deleted = 0
    for folder in ("new", "cur", "tmp"):
        for path in (maildir / folder).glob("*"):
            try:
                with path.open("rb") as file:
                    headers = BytesHeaderParser().parse(file)
            except OSError:
                continue
            if headers.get("X-Referral-Id") == referral_id:
                path.unlink(missing_ok=True)
                deleted += 1
    return deleted


async def erase_referral(
    client: Client,
    engine: Engine,
    referral_id: str,
    *,
    by: str,
    reason: str,
    task_queue: str,
    maildir: Path | None = None,
) -> str:
    """Erase one closed referral; returns the line that says what was done. `task_queue`:
    where the `referral.erased` webhook messages are delivered from; `maildir`: the dev
    stack's email files."""
    if not reason.strip():
        raise Refused("erasing needs a reason")
    state = await asyncio.to_thread(load_referral, engine, referral_id)
    if state is None:
        raise Refused(f"unknown referral {referral_id}")
    if state.erased is not None:
        return f"{referral_id}: already erased on {state.erased.at:%Y-%m-%d} by {state.erased.by}"
    if state.in_clawback_window and state.clawback_until is not None:
        raise Refused(
            f"{referral_id} is open to clawback until {state.clawback_until:%Y-%m-%d}: "
            "it can be erased once that window has ended"
        )
    if not state.is_terminal:
        raise Refused(f"{referral_id} is open ({state.stage.value}): cancel it before erasing it")
    deleted = await delete_executions(client, referral_id)
    for delivery in await asyncio.to_thread(_delivery_workflows, engine, referral_id):
        deleted += await delete_executions(client, delivery)
    erasure = Erasure(at=datetime.now(UTC), by=by, reason=reason.strip())
    mark = await asyncio.to_thread(_pseudonymize, engine, state, erasure)
    told = await asyncio.to_thread(pending_deliveries, engine, referral_id, [mark.seq])
    await start_deliveries(client, told, task_queue)
    runs = "run" if deleted == 1 else "runs"
    line = f"{referral_id}: personal data erased; {deleted} workflow {runs} deleted from Temporal"
    if told:
        line += f"; {len(told)} webhook endpoint(s) told"
    if maildir is not None:
        files = await asyncio.to_thread(_delete_mail_files, maildir, referral_id)
        line += f"; {files} email file(s) deleted"
    return line


def referrals_of(engine: Engine, email: str) -> list[tuple[str, bool]]:
    """(referral id, open?) for every referral of one referrer not erased yet."""
    with Session(engine) as session:
        rows = session.exec(
            select(ReferralRow.referral_id, ReferralRow.closed_at)
            .where(ReferralRow.referrer_email == email.strip().lower())
            .where(col(ReferralRow.erased_at).is_(None))
            .order_by(col(ReferralRow.submitted_at))
        ).all()
    return [(referral_id, closed_at is None) for referral_id, closed_at in rows]


def expired(engine: Engine, days: int, now: datetime) -> list[str]:
    """Closed referrals whose retention period has passed and that still hold personal data."""
    cutoff = now - timedelta(days=days)
    with Session(engine) as session:
        rows = session.exec(
            select(ReferralRow.referral_id, ReferralRow.closed_at)
            .where(col(ReferralRow.closed_at).is_not(None))
            .where(col(ReferralRow.erased_at).is_(None))
        ).all()
    return sorted(rid for rid, closed_at in rows if closed_at and as_utc(closed_at) <= cutoff)


class RetentionActivities:
    def __init__(
        self,
        client: Client,
        engine: Engine,
        personal_data_days: int,
        task_queue: str,
        maildir: Path | None = None,
    ) -> None:
        self._client = client
        self._engine = engine
        self._days = personal_data_days
        self._task_queue = task_queue
        self._maildir = maildir

    @activity.defn(name=ERASE_EXPIRED)
    async def erase_expired(self) -> RetentionReport:
        """Erase every referral closed longer ago than the program's retention period."""
        due = await asyncio.to_thread(expired, self._engine, self._days, datetime.now(UTC))
        report = RetentionReport(retention_days=self._days)
        reason = f"retention: closed more than {self._days} days ago"
        for referral_id in due:
            activity.heartbeat(referral_id)
            line = await erase_referral(
                self._client,
                self._engine,
                referral_id,
                by="system",
                reason=reason,
                task_queue=self._task_queue,
                maildir=self._maildir,
            )
            report.erased.append(line)
            activity.logger.info("retention: %s", line)
        return report
