"""Database tables (SQLModel) and the engine, shared by activities, the CLI and the web app.

Alembic owns the schema (`activities/migrations`): a change here comes with a migration.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    LargeBinary,
    Numeric,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.engine import Engine
from sqlmodel import Field, SQLModel, create_engine


def _now() -> datetime:
    return datetime.now(UTC)


def _money_column(nullable: bool = False) -> Column[Decimal]:
    return Column(Numeric(20, 4), nullable=nullable)


class CommissionRow(SQLModel, table=True):
    """Finance's ledger: one row per won referral."""

    __tablename__ = "commission"

    referral_id: str = Field(primary_key=True)
    referrer_email: str = Field(index=True)
    referrer_name: str
    basis_amount: Decimal = Field(sa_column=_money_column())
    rate: Decimal = Field(sa_column=Column(Numeric(10, 6), nullable=False))
    amount: Decimal = Field(sa_column=_money_column())
    currency: str
    customer_paid: Decimal = Field(sa_column=_money_column())
    status: str = Field(index=True)
    updated_at: datetime


class CommissionEvent(SQLModel, table=True):
    """Every change to a ledger row, with who and why: the audit trail finance keeps."""

    __tablename__ = "commission_event"

    id: int | None = Field(default=None, primary_key=True)
    event_key: str = Field(unique=True)
    referral_id: str = Field(index=True)
    event: str
    status: str
    customer_paid: Decimal = Field(sa_column=_money_column())
    at: datetime
    actor: str
    note: str | None = None
    recorded_at: datetime = Field(default_factory=_now)


class ReferralRow(SQLModel, table=True):
    """The system of record: each referral's current facts, kept after Temporal forgets it.
    `state` is the whole ReferralState as JSON, its history left out (see ReferralEventRow)."""

    __tablename__ = "referral"
    __table_args__ = (
        # `referrals list`: newest first, a page at a time (ties by id).
        Index("ix_referral_submitted_at", "submitted_at", "referral_id"),
        # The latest change, which tells the dashboard its cached figures are stale.
        Index("ix_referral_updated_at", "updated_at"),
    )

    referral_id: str = Field(primary_key=True)
    stage: str = Field(index=True)
    prospect_company: str
    prospect_domain: str = Field(index=True)
    product: str = Field(index=True)
    referrer_email: str = Field(index=True)
    submitted_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    contact_deadline: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    contact_sla_breached: bool
    commission_amount: Decimal | None = Field(default=None, sa_column=_money_column(True))
    commission_currency: str | None = None
    commission_status: str | None = None
    customer_paid: Decimal | None = Field(default=None, sa_column=_money_column(True))
    closed_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    revision: int
    state: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # Set once its personal data has been replaced by a pseudonym (who and why: in `state`).
    erased_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True, index=True)
    )
    protected_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True, index=True)
    )


class ReferralEventRow(SQLModel, table=True):
    """Append-only: one row per history entry of a referral, the audit trail of every decision."""

    __tablename__ = "referral_event"
    __table_args__ = (
        UniqueConstraint("referral_id", "seq", name="uq_referral_event_seq"),
        # The figures read the log by action (contacted, accept, won…): this index holds all
        # they read of it.
        Index("ix_referral_event_action", "action", "referral_id", "outcome", "at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    referral_id: str = Field(index=True)
    seq: int
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    action: str
    actor: str
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    outcome: str
    request_id: str | None = None
    # The surface that signed a staff action's actor, or "unauthenticated" (0010).
    surface: str | None = None


class CommissionLineRow(SQLModel, table=True):
    """The commission ledger, append-only: accrual, payable, paid, clawback (negative), void
    (negative). A line once written is never edited; corrections are new lines."""

    __tablename__ = "commission_line"

    id: int | None = Field(default=None, primary_key=True)
    line_key: str = Field(unique=True)
    referral_id: str = Field(index=True)
    referrer_email: str = Field(index=True)
    kind: str
    amount: Decimal = Field(sa_column=_money_column())
    currency: str
    reference: str | None = None
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    actor: str


class SchemaCompatibilityRow(SQLModel, table=True):
    """The oldest code revision the schema still serves, written by `referrals db upgrade`
    from the migrations' `supports_code_from` (activities/schema.py). One row."""

    __tablename__ = "schema_compatibility"

    id: int = Field(primary_key=True)
    supports_code_from: str = Field(max_length=32)


class SignInLinkRow(SQLModel, table=True):
    """A sign-in link once used: the primary key lets each link in only once, whichever web
    process sees it, and `signed_out_at` ends the session it opened. Holds no address, only
    the link's random nonce."""

    __tablename__ = "sign_in_link"

    nonce: str = Field(primary_key=True)
    audience: str
    used_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    signed_out_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class SentEmail(SQLModel, table=True):
    """Emails known to be sent, by idempotency key: a retried activity does not resend."""

    __tablename__ = "sent_email"

    key: str = Field(primary_key=True)
    message_id: str
    recipients: str
    subject: str
    sent_at: datetime = Field(default_factory=_now)


class ProspectClaim(SQLModel, table=True):
    """The open referral of a prospect domain; the primary key makes duplicates impossible."""

    __tablename__ = "prospect_claim"

    domain: str = Field(primary_key=True)
    referral_id: str
    claimed_at: datetime = Field(default_factory=_now)


class WebhookDeliveryRow(SQLModel, table=True):
    """One referral event for one webhook endpoint: the outbox, written in the transaction
    that records the event. `id` is the message's Standard Webhooks `webhook-id`, the same on
    every attempt and redelivery. `payload` is the message without personal data, which is
    added from the referral's row when sent (so an erasure applies to later sends too)."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        UniqueConstraint("event_key", "endpoint_url", name="uq_webhook_delivery_event_endpoint"),
    )

    id: str = Field(primary_key=True)
    event_key: str
    event_type: str
    referral_id: str = Field(index=True)
    endpoint_url: str
    payload: str = Field(sa_column=Column(Text, nullable=False))
    # pending (being attempted), delivered, failed (retries exhausted or refused for good)
    status: str = Field(index=True)
    attempts: int = 0
    last_outcome: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    redeliveries: int = 0
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class WebhookEndpointRow(SQLModel, table=True):
    """An endpoint's circuit breaker. `failures` in a row open it until `open_until`: no
    delivery tries it meanwhile. Then one delivery at a time (`probe_until`, its lease) tries
    it again: success closes it, failure opens it for twice as long."""

    __tablename__ = "webhook_endpoint"

    url: str = Field(primary_key=True)
    failures: int = 0
    open_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    probe_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class WebhookAttemptRow(SQLModel, table=True):
    """Each attempt to deliver a webhook message and what the endpoint answered."""

    __tablename__ = "webhook_attempt"
    __table_args__ = (UniqueConstraint("delivery_id", "number", name="uq_webhook_attempt_number"),)

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(index=True)
    number: int
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    status_code: int | None = None
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    duration_ms: int


class PayeeRow(SQLModel, table=True):
    """A referrer as a payee (core/payees.py): `profile` is the whole PayeeProfile as JSON;
    the columns beside it are what payout runs look up. Personal data: erased with the
    referrer's referrals."""

    __tablename__ = "payee"

    email: str = Field(primary_key=True)
    iban: str = Field(index=True)
    profile: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class PayeeEventRow(SQLModel, table=True):
    """Every change to a payee profile, with who and what (bank details masked)."""

    __tablename__ = "payee_event"

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(index=True)
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    actor: str
    change: str
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class PayoutRunRow(SQLModel, table=True):
    """A payout run's current facts, written by its workflow after each change; `state` is
    the whole RunState as JSON (workflows/payouts.py)."""

    __tablename__ = "payout_run"

    run_id: str = Field(primary_key=True)
    currency: str
    cutoff: str  # ISO date
    status: str = Field(index=True)
    total: Decimal = Field(sa_column=_money_column())
    revision: int
    state: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class PayoutItemRow(SQLModel, table=True):
    """One payee's item of a run, as the run's state has it: what the portal and the
    dashboard read (held, and why; paid in which run)."""

    __tablename__ = "payout_item"
    __table_args__ = (UniqueConstraint("run_id", "payee_email", name="uq_payout_item_payee"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    payee_email: str = Field(index=True)
    currency: str
    gross: Decimal = Field(sa_column=_money_column())
    recovered: Decimal = Field(sa_column=_money_column())
    net: Decimal = Field(sa_column=_money_column())
    # included, held, excluded (and later: paid, failed)
    status: str
    holds: str  # comma-separated HoldReason values
    referral_ids: str = Field(sa_column=Column(Text, nullable=False))  # JSON list


class PayoutClaimRow(SQLModel, table=True):
    """A payable referral taken by a live run: the primary key keeps it in one run at a time,
    however many are prepared at once. Released when its run is cancelled."""

    __tablename__ = "payout_claim"

    referral_id: str = Field(primary_key=True)
    run_id: str = Field(index=True)


class PayoutDocumentRow(SQLModel, table=True):
    """What a run issued: its bank file, each payee's statement, a credit note. Never
    deleted (invoices are kept ten years); `number` is a statement's or credit note's."""

    __tablename__ = "payout_document"

    id: str = Field(primary_key=True)  # <run id>/<kind>[/<payee email>]
    run_id: str = Field(index=True)
    kind: str  # sepa, csv, statement, credit_note
    number: str | None = Field(default=None, unique=True)
    payee_email: str | None = Field(default=None, index=True)
    filename: str
    media_type: str
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    sha256: str
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class StatementCounterRow(SQLModel, table=True):
    """The last number given in each series (statement, credit note) and year: numbers are
    taken in the transaction that writes their documents, so a number is never skipped."""

    __tablename__ = "statement_counter"

    series: str = Field(primary_key=True)
    year: int = Field(primary_key=True)
    last: int


class ReceiptRow(SQLModel, table=True):
    """One receipt of the append-only log (core/receipts.py), `body` exactly as signed. Never
    updated or deleted: erasure removes the disclosure, not the receipt."""

    __tablename__ = "receipt"

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    kind: str
    referral_id: str | None = Field(default=None, index=True)
    # What appended it (`R-…/registered`, `R-…/accept/4`…): a retried write appends once.
    source: str = Field(unique=True)
    body: str = Field(sa_column=Column(Text, nullable=False))


class ReceiptHeadRow(SQLModel, table=True):
    """The log's last receipt (one row, id 1): an append updates it first, so appends queue
    on its lock and the chain never forks."""

    __tablename__ = "receipt_head"

    id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    seq: int
    entry_hash: str
    at: str | None = None


class ReceiptKeyRow(SQLModel, table=True):
    """A receipt signing key. The public half is kept for ever (old receipts verify); the
    private half is sealed with the payload key ring, and wiped when a rotation retires it."""

    __tablename__ = "receipt_key"

    key_id: str = Field(primary_key=True)
    public_key: str
    sealed_private: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    sealed_with: str | None = None  # the payload key's id
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    retired_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class ReceiptDisclosureRow(SQLModel, table=True):
    """A registered referral's committed values and their salts, to give the referrer their
    copy; erasing the referral deletes the row, after which nobody can link the commitments
    back to a domain or an address."""

    __tablename__ = "receipt_disclosure"

    referral_id: str = Field(primary_key=True)
    disclosures: str = Field(sa_column=Column(Text, nullable=False))  # JSON


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class OneWriterAtATime:
    """SQLite lets one connection write at a time; the others wait in its busy handler, which
    sleeps 1, 2, 5 … 100 ms between tries, whether or not the lock was freed meanwhile. Under
    load a writer can so wait seconds for a lock that is free most of the time. Within one
    engine (one a process), writers queue on this lock instead, handed over as soon as the
    writer before them commits or rolls back; between processes (the worker, the web app,
    the CLI) the busy handler still applies. Reads are not held up."""

    HOLDS = "referrals_holds_write_lock"
    WRITES = ("INSERT", "UPDATE", "DELETE", "REPLAC")

    def __init__(self, timeout: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._timeout = timeout  # as the busy handler's: then "database is locked"

    def install(self, engine: Engine) -> None:
        event.listen(engine, "before_cursor_execute", self._before_execute)
        event.listen(engine, "commit", self._transaction_ended)
        event.listen(engine, "rollback", self._transaction_ended)
        event.listen(engine.pool, "checkin", self._checked_in)

    def _before_execute(self, connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        info = connection.info
        if info.get(self.HOLDS) or statement.lstrip()[:6].upper() not in self.WRITES:
            return
        if not self._lock.acquire(timeout=self._timeout):
            raise sqlite3.OperationalError("database is locked (by this process's writers)")
        info[self.HOLDS] = True

    def _transaction_ended(self, connection: Any) -> None:
        self._release(connection.info)

    def _checked_in(self, _dbapi_connection: Any, record: Any) -> None:
        self._release(record.info)

    def _release(self, info: dict[str, Any]) -> None:
        if info.pop(self.HOLDS, False):
            self._lock.release()


def make_engine(url: str) -> Engine:
    """An engine (the schema is Alembic's: see activities.schema). SQLite files get WAL so the
    CLI can read while the worker writes."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        OneWriterAtATime().install(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


def as_utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
