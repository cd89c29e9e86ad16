"""Signed webhooks: partner tools and CRMs told of referral events (docs/webhooks.md).

An outbox. When the system of record appends a referral event, the same transaction adds
one `webhook_delivery` row per endpoint of program.yaml subscribed to it
(`enqueue_deliveries`). After the commit, `record_referral` starts one
WebhookDeliveryWorkflow per pending row, which runs `deliver_webhook` until the endpoint
takes it (Standard Webhooks signature, backoff for up to three days). A failing endpoint
holds up nothing: the referral workflow never waits on a delivery. With no webhook
configured, nothing is written and nothing started.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError
from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.db import (
    PayeeRow,
    PayoutDocumentRow,
    PayoutRunRow,
    ReferralRow,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
    as_utc,
)
from core.errors import Refused
from core.program import ProgramError, load_program
from core.settings import SettingsError, WebhookRetry, environment_secret
from workflows.models.program import WebhookEndpoint
from workflows.models.referral import HistoryEntry, ReferralState
from workflows.models.values import round_money
from workflows.payouts import PayoutItem, RunState
from workflows.webhook_delivery import WebhookDeliveryInput, WebhookDeliveryWorkflow

log = logging.getLogger(__name__)

# History action -> event type. `payment` is `commission.payable` only when it completes
# the commission basis (see `event_type`); refused actions are never sent.
EVENT_TYPES = {
    "submitted": "referral.submitted",
    "contacted": "referral.contacted",
    "accept": "referral.accepted",
    "decline": "referral.declined",
    "approve": "referral.approved",
    "reject": "referral.rejected",
    "won": "referral.won",
    "lost": "referral.lost",
    "cancel": "referral.cancelled",
    "expire": "referral.expired",
    "extend": "referral.protection_extended",
    "payout": "commission.paid",
    "refund": "commission.clawback",
    # The referral's personal data was erased here: erase your copies (no personal data,
    # not even with include_personal_data: the referral's are pseudonyms now).
    "erase": "referral.erased",
}
PAYABLE = "commission.payable"

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
HTTP_TIMEOUT = httpx.Timeout(10.0)
RPC_TIMEOUT = timedelta(seconds=10)  # every call to Temporal here has a deadline
USER_AGENT = "ReferralDesk-Webhooks/1"
# Kept of an endpoint's answer to a failed attempt, for `referrals webhooks`.
ANSWER_CHARS = 200
# Read of an endpoint's answer at most: the rest is never downloaded (an endpoint that
# answers with gigabytes, or echoes the request back, costs nothing more).
ANSWER_BYTES = 4096

# The circuit breaker (WebhookEndpointRow): this many failed attempts in a row open it for
# BREAKER_OPEN, doubled at each failed probe up to BREAKER_OPEN_LONGEST. A probe holds the
# endpoint for PROBE_LEASE (longer than one attempt) so that one delivery at a time tries it.
BREAKER_FAILURES = 5
BREAKER_OPEN = timedelta(seconds=30)
BREAKER_OPEN_LONGEST = timedelta(hours=1)
PROBE_LEASE = timedelta(seconds=45)
# Statuses that say the endpoint is down, not that it refused this message.
ENDPOINT_DOWN = frozenset({429, 500, 502, 503, 504})


# --- the endpoints --------------------------------------------------------------------------


@dataclass
class _Config:
    program_path: Path = Path("program.yaml")
    retry: WebhookRetry = field(default_factory=WebhookRetry)


# Set once a process, at start (`configure`): every process that records events enqueues
# their deliveries (the web app, the CLI, the worker).
_config = _Config()
_loaded: tuple[tuple[Path, int, int], list[WebhookEndpoint]] | None = None


def configure(program_path: Path, retry: WebhookRetry) -> None:
    """The program file whose endpoints receive the events, and how deliveries retry
    (REFERRALS_PROGRAM and REFERRALS_WEBHOOK_*, from the process's settings)."""
    global _config
    _config = _Config(Path(program_path), retry)


def configured_endpoints() -> list[WebhookEndpoint]:
    """The endpoints of program.yaml as it is now (they are not part of a referral's rules
    snapshot), re-read when the file changes. No file, no endpoints. Should the file turn
    invalid while a process runs, the endpoints last read stay in force and a warning is
    logged once: the system of record must not stop on it (every process that starts checks
    the file)."""
    global _loaded
    path = _config.program_path
    try:
        stat = path.stat()
    except OSError:
        return []
    version = (path.resolve(), stat.st_mtime_ns, stat.st_size)
    if _loaded is not None and _loaded[0] == version:
        return _loaded[1]
    try:
        endpoints = load_program(path).webhooks
    except ProgramError as error:
        same_file = _loaded is not None and _loaded[0][0] == version[0]
        endpoints = _loaded[1] if _loaded is not None and same_file else []
        log.warning("webhooks: %s; keeping the %d endpoint(s) last read", error, len(endpoints))
    _loaded = (version, endpoints)
    return endpoints


def with_secrets(endpoints: list[WebhookEndpoint]) -> list[WebhookEndpoint]:
    """Each endpoint with its secret, read from the environment for those that name their
    `secret_env` (checked like program.yaml's own: SettingsError if one is missing or wrong).
    Only what signs needs them (the worker, which checks them at start): recording an event
    needs an endpoint's url and events alone."""
    resolved = []
    for endpoint in endpoints:
        if endpoint.secret_env is not None:
            try:
                endpoint = WebhookEndpoint.model_validate(
                    {**endpoint.model_dump(), "secret": environment_secret(endpoint.secret_env),
                     "secret_env": None}
                )  # fmt: skip
            except ValidationError as error:
                raise SettingsError(f"{endpoint.secret_env}: {error.errors()[0]['msg']}") from error
        resolved.append(endpoint)
    return resolved


def _endpoint(url: str) -> WebhookEndpoint | None:
    return next((e for e in configured_endpoints() if e.url == url), None)


# --- the outbox -----------------------------------------------------------------------------


def event_type(entry: HistoryEntry, state: ReferralState) -> str | None:
    """The webhook event a history entry is, if any. `state` is the referral after it."""
    if entry.outcome == "refused":
        return None
    if entry.action == "payment":
        return PAYABLE if entry.at == _completing_payment_at(state) else None
    return EVENT_TYPES.get(entry.action)


def _completing_payment_at(state: ReferralState) -> datetime | None:
    """When the customer's payments reached the commission basis (the referral became
    commission_payable), or None."""
    if state.commission is None:
        return None
    paid = Decimal(0)
    for payment in state.payments:
        paid += payment.amount
        if paid >= state.commission.basis_amount:
            return payment.at
    return None


def delivery_id(event_key: str, url: str) -> str:
    """The `webhook-id`: derived from the event and the endpoint, so the same message keeps
    the same id whoever writes it and however often."""
    digest = hashlib.sha256(f"{event_key} {url}".encode()).digest()
    return "msg_" + base64.b32encode(digest[:20]).decode().lower()


def _when(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat() if moment else None


def _money(amount: Decimal, currency: str) -> str:
    return str(round_money(amount, currency))


def message(kind: str, entry: HistoryEntry, state: ReferralState) -> dict[str, Any]:
    """The message without personal data: the referral as recorded with this event."""
    commission = state.commission
    return {
        "type": kind,
        "timestamp": _when(entry.at),
        "data": {
            "referral_id": state.referral_id,
            "event_seq": entry.seq,
            "stage": state.stage.value,
            "product": state.opportunity.product,
            "product_name": state.product_name,
            "prospect_company": state.prospect.company,
            "prospect_domain": state.prospect_domain,
            "prospect_country": state.prospect.country,
            "submitted_at": _when(state.submitted_at),
            "protected_until": _when(state.protected_until),
            "closed_at": _when(state.closed_at),
            "commission": None
            if commission is None
            else {
                "amount": _money(commission.amount, commission.currency),
                "currency": commission.currency,
                "status": commission.status.value,
                "basis_amount": _money(commission.basis_amount, commission.currency),
                "customer_paid": _money(commission.customer_paid, commission.currency),
                "clawed_back": _money(commission.clawed_back, commission.currency),
            },
        },
    }


def personal_data(state: ReferralState) -> dict[str, Any]:
    """Added to `data` for endpoints with `include_personal_data: true` only."""
    referrer, contact = state.referrer, state.contact
    return {
        "referrer": {
            "name": referrer.name,
            "email": str(referrer.email),
            "company": referrer.company,
            "phone": referrer.phone,
            "language": referrer.language,
        },
        "contact": {
            "name": contact.name,
            "email": str(contact.email),
            "title": contact.title,
            "phone": contact.phone,
        },
    }


def enqueue_deliveries(
    session: Session, state: ReferralState, entries: Iterable[HistoryEntry]
) -> None:
    """In the caller's transaction: a pending delivery for each newly recorded event and
    each endpoint subscribed to it."""
    endpoints = configured_endpoints()
    if not endpoints:
        return
    now = datetime.now(UTC)
    for entry in entries:
        kind = event_type(entry, state)
        if kind is None:
            continue
        key = f"{state.referral_id}/{entry.seq}"
        payload = json.dumps(message(kind, entry, state), ensure_ascii=False)
        for endpoint in endpoints:
            if kind in endpoint.events:
                session.add(
                    WebhookDeliveryRow(
                        id=delivery_id(key, endpoint.url),
                        event_key=key,
                        event_type=kind,
                        referral_id=state.referral_id,
                        endpoint_url=endpoint.url,
                        payload=payload,
                        status=PENDING,
                        created_at=now,
                        updated_at=now,
                    )
                )


# What a payout run's deliveries have for a referral id: the run's workflow id.
RUN_PREFIX = "payout-run-"
PAYOUT_CONFIRMED = "payout.confirmed"


def payout_message(state: RunState, item: PayoutItem, at: datetime) -> dict[str, Any]:
    """One payee's payment in a confirmed run, without personal data: the statement, the
    amounts and the referrals it paid."""
    currency = item.currency
    return {
        "type": PAYOUT_CONFIRMED,
        "timestamp": _when(at),
        "data": {
            "run_id": state.run_id,
            "statement_number": item.statement_number,
            "currency": currency,
            "gross": _money(item.gross, currency),
            "recovered": _money(item.recovered, currency),
            "vat": _money(item.vat, currency),
            "net": _money(item.net, currency),
            "execution_date": state.execution_date.isoformat() if state.execution_date else None,
            "referral_ids": [r.referral_id for r in item.referrals],
        },
    }


def enqueue_payout_deliveries(session: Session, state: RunState, at: datetime) -> list[str]:
    """In the caller's transaction: `payout.confirmed` for each payee a confirmed run paid,
    to each endpoint subscribed; the ids of the deliveries (written once: by event key)."""
    endpoints = [e for e in configured_endpoints() if PAYOUT_CONFIRMED in e.events]
    ids = []
    for item in state.items:
        if not item.settled:
            continue
        key = f"{RUN_PREFIX}{state.run_id}/{item.statement_number}"
        payload = json.dumps(payout_message(state, item, at), ensure_ascii=False)
        for endpoint in endpoints:
            found = delivery_id(key, endpoint.url)
            ids.append(found)
            if session.get(WebhookDeliveryRow, found) is not None:
                continue
            session.add(
                WebhookDeliveryRow(
                    id=found,
                    event_key=key,
                    event_type=PAYOUT_CONFIRMED,
                    referral_id=f"{RUN_PREFIX}{state.run_id}",
                    endpoint_url=endpoint.url,
                    payload=payload,
                    status=PENDING,
                    created_at=at,
                    updated_at=at,
                )
            )
    return ids


def payee_data(session: Session, delivery: WebhookDeliveryRow) -> dict[str, Any] | None:
    """A payout message's personal data (the payee), or None once the payee is erased."""
    number = delivery.event_key.rpartition("/")[2]
    statement = session.exec(
        select(PayoutDocumentRow).where(PayoutDocumentRow.number == number)
    ).first()
    payee = (
        session.get(PayeeRow, statement.payee_email)
        if statement and statement.payee_email
        else None
    )
    if payee is None:
        return None
    profile = json.loads(payee.profile)
    return {"payee": {"email": payee.email, "legal_name": profile.get("legal_name")}}


def pending_deliveries(
    engine: Engine, referral_id: str, seqs: Iterable[int | None]
) -> list[WebhookDeliveryRow]:
    """The deliveries of these events still pending (none without webhooks configured)."""
    keys = [f"{referral_id}/{seq}" for seq in seqs if seq is not None]
    if not keys or not configured_endpoints():
        return []
    with Session(engine) as session:
        return list(
            session.exec(
                select(WebhookDeliveryRow).where(
                    WebhookDeliveryRow.referral_id == referral_id,
                    WebhookDeliveryRow.status == PENDING,
                    col(WebhookDeliveryRow.event_key).in_(keys),
                )
            ).all()
        )


# --- starting delivery workflows ------------------------------------------------------------


def workflow_id(delivery: WebhookDeliveryRow) -> str:
    """The workflow delivering this message now: the first one, or the latest redelivery."""
    if delivery.redeliveries:
        return f"webhook-{delivery.id}-redeliver-{delivery.redeliveries}"
    return f"webhook-{delivery.id}"


def delivery_input(delivery_id: str) -> WebhookDeliveryInput:
    """The retry schedule: the workflow's, unless REFERRALS_WEBHOOK_* say otherwise."""
    retry = _config.retry
    given = {
        name: value
        for name, value in (
            ("initial_interval_s", retry.initial_interval_s),
            ("maximum_interval_s", retry.maximum_interval_s),
            ("give_up_after_s", retry.give_up_after_s),
        )
        if value is not None
    }
    return WebhookDeliveryInput(delivery_id=delivery_id, **given)


def webhook_queue(task_queue: str) -> str:
    """The task queue of the referrals queue `task_queue`'s webhook deliveries, served by a
    worker of their own (worker.build_webhook_worker): an endpoint that never answers holds
    that worker's slots, never those the referrals' database writes and emails need."""
    return f"{task_queue}-webhooks"


async def start_delivery(client: Client, delivery: WebhookDeliveryRow, task_queue: str) -> bool:
    """Start the delivery's workflow on `task_queue`'s webhook queue; False if it was already
    started (this one is never started twice, so a retried caller never sends a message
    twice)."""
    try:
        await client.start_workflow(
            WebhookDeliveryWorkflow.run,
            delivery_input(delivery.id),
            id=workflow_id(delivery),
            task_queue=webhook_queue(task_queue),
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            static_summary=f"webhook {delivery.event_type} of {delivery.referral_id}",
            rpc_timeout=RPC_TIMEOUT,
        )
    except WorkflowAlreadyStartedError:
        return False
    return True


async def start_deliveries(
    client: Client, deliveries: Iterable[WebhookDeliveryRow], task_queue: str
) -> None:
    """After their events are committed: start each pending delivery (`pending_deliveries`).
    Run again by a retried activity, it starts what a failed run did not."""
    for delivery in deliveries:
        await start_delivery(client, delivery, task_queue)


def _stalled(engine: Engine, before: datetime) -> list[WebhookDeliveryRow]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(WebhookDeliveryRow).where(
                    WebhookDeliveryRow.status == PENDING,
                    col(WebhookDeliveryRow.updated_at) < before,
                )
            ).all()
        )


async def start_stalled_deliveries(
    client: Client, engine: Engine, task_queue: str, grace: timedelta
) -> list[str]:
    """For `referrals reconcile`: start the pending deliveries no workflow delivers (the
    process stopped between the commit and the start, or reconcile itself recorded the
    event). One line per delivery started."""
    lines = []
    for delivery in await asyncio.to_thread(_stalled, engine, datetime.now(UTC) - grace):
        if await start_delivery(client, delivery, task_queue):
            lines.append(
                f"{delivery.id}: webhook {delivery.event_type} of {delivery.referral_id} "
                "was not being delivered; started"
            )
    return lines


# --- delivering -----------------------------------------------------------------------------


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), the key
    being the base64 after `whsec_`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _body(session: Session, delivery: WebhookDeliveryRow, endpoint: WebhookEndpoint) -> bytes:
    content = json.loads(delivery.payload)
    if delivery.event_type == PAYOUT_CONFIRMED:
        payee = payee_data(session, delivery) if endpoint.include_personal_data else None
        content["data"].update(payee or {})
    elif endpoint.include_personal_data:
        row = session.get(ReferralRow, delivery.referral_id)
        assert row is not None  # checked by the caller
        content["data"].update(personal_data(ReferralState.model_validate_json(row.state)))
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def _refuse(engine: Engine, delivery_id: str, why: str) -> ApplicationError:
    """A message that can never be delivered: say why in its row; not retried."""
    with Session(engine) as session:
        delivery = session.get(WebhookDeliveryRow, delivery_id)
        if delivery is not None:
            delivery.last_outcome = why
            delivery.updated_at = datetime.now(UTC)
            session.add(delivery)
            session.commit()
    return ApplicationError(why, type="WebhookRefused", non_retryable=True)


def _record_attempt(
    engine: Engine, delivery_id: str, attempt: WebhookAttemptRow, outcome: str, delivered: bool
) -> None:
    with Session(engine) as session:
        delivery = session.get(WebhookDeliveryRow, delivery_id)
        assert delivery is not None
        count = session.exec(
            select(func.count()).where(WebhookAttemptRow.delivery_id == delivery_id)
        ).one()
        attempt.number = count + 1
        session.add(attempt)
        delivery.attempts = attempt.number
        delivery.last_outcome = outcome
        delivery.updated_at = attempt.at
        if delivered:
            delivery.status = DELIVERED
        session.add(delivery)
        session.commit()


def _breaker(session: Session, url: str, now: datetime) -> WebhookEndpointRow:
    state = session.get(WebhookEndpointRow, url)
    if state is None:
        state = WebhookEndpointRow(url=url, updated_at=now)
        session.add(state)
        try:
            session.commit()
        except IntegrityError:  # another worker added it first
            session.rollback()
            state = session.get(WebhookEndpointRow, url)
            assert state is not None
    return state


def wait_for_endpoint(engine: Engine, url: str, now: datetime) -> timedelta | None:
    """None: try the endpoint now. Otherwise how long until it may be tried: its circuit is
    open, or another delivery is probing it."""
    with Session(engine) as session:
        state = _breaker(session, url, now)
        if state.open_until is None:
            return None
        open_until = as_utc(state.open_until)
        if now < open_until:
            return open_until - now
        # Half open: the first to claim the probe tries; the others wait for its outcome.
        claimed = session.exec(
            update(WebhookEndpointRow)
            .where(
                col(WebhookEndpointRow.url) == url,
                or_(
                    col(WebhookEndpointRow.probe_until).is_(None),
                    col(WebhookEndpointRow.probe_until) < now,
                ),
            )
            .values(probe_until=now + PROBE_LEASE, updated_at=now)
        )
        session.commit()
        return None if claimed.rowcount == 1 else PROBE_LEASE


def endpoint_answered(engine: Engine, url: str, up: bool, now: datetime) -> None:
    """After an attempt: an endpoint that answered closes its circuit; one that is down
    counts a failure, and opens the circuit at BREAKER_FAILURES in a row."""
    with Session(engine) as session:
        state = _breaker(session, url, now)
        if up and not (state.failures or state.open_until or state.probe_until):
            return  # closed, and stays so: nothing to write
        if up:
            session.exec(
                update(WebhookEndpointRow)
                .where(col(WebhookEndpointRow.url) == url)
                .values(failures=0, open_until=None, probe_until=None, updated_at=now)
            )
            session.commit()
            return
        session.exec(
            update(WebhookEndpointRow)
            .where(col(WebhookEndpointRow.url) == url)
            .values(failures=WebhookEndpointRow.failures + 1, probe_until=None, updated_at=now)
        )
        session.commit()
        session.refresh(state)
        if state.failures >= BREAKER_FAILURES:
            doublings = min(state.failures - BREAKER_FAILURES, 16)
            state.open_until = now + min(BREAKER_OPEN * 2**doublings, BREAKER_OPEN_LONGEST)
            session.add(state)
            session.commit()


def post_webhook(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, str]:
    """Status, reason and the first ANSWER_BYTES of the answer; never more is read."""
    with httpx.Client(timeout=HTTP_TIMEOUT) as http:
        with http.stream("POST", url, content=body, headers=headers) as response:
            answer = b""
            for chunk in response.iter_bytes():
                answer += chunk
                if len(answer) >= ANSWER_BYTES:
                    break
            text = answer[:ANSWER_BYTES].decode(response.encoding or "utf-8", errors="replace")
            return response.status_code, response.reason_phrase, text


def deliver(engine: Engine, delivery_id: str) -> None:
    """One attempt: sign, POST, record the attempt; raise unless the endpoint took it (2xx).
    410 Gone, an endpoint no longer configured or a referral no longer recorded are final;
    anything else (other statuses, timeouts, refused connections) is retried. While the
    endpoint's circuit is open, nothing is sent: the next attempt waits until it may be."""
    with Session(engine) as session:
        delivery = session.get(WebhookDeliveryRow, delivery_id)
        if delivery is None:
            raise ApplicationError(
                f"unknown webhook delivery {delivery_id}", type="WebhookRefused", non_retryable=True
            )
        endpoint = _endpoint(delivery.endpoint_url)
        if endpoint is None:
            raise _refuse(engine, delivery_id, "endpoint no longer in program.yaml: not sent")
        run_id = delivery.referral_id.removeprefix(RUN_PREFIX)
        if run_id != delivery.referral_id:
            if session.get(PayoutRunRow, run_id) is None:
                raise _refuse(engine, delivery_id, "payout run no longer recorded: not sent")
        elif session.get(ReferralRow, delivery.referral_id) is None:
            raise _refuse(engine, delivery_id, "referral no longer recorded: not sent")
        body = _body(session, delivery, endpoint)
        url = delivery.endpoint_url
    [signing] = with_secrets([endpoint])  # a secret_env is read now: fixed, the retry signs
    assert signing.secret is not None
    secret = signing.secret
    at = datetime.now(UTC)
    wait = wait_for_endpoint(engine, url, at)
    if wait is not None:
        # Spread the deliveries waiting on one endpoint, so they do not all come back at once.
        wait += timedelta(seconds=random.uniform(0, min(30.0, wait.total_seconds())))
        raise ApplicationError(
            f"{url}: not tried, the endpoint has been failing; next try in "
            f"{round(wait.total_seconds())} s",
            type="WebhookEndpointDown",
            next_retry_delay=wait,
        )
    timestamp = int(at.timestamp())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, delivery_id, timestamp, body),
    }
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    try:
        status, reason, text = post_webhook(url, body, headers)
        outcome = f"{status} {reason}".strip()
        if not 200 <= status < 300:
            answer = " ".join(text[:ANSWER_CHARS].split())
            error = f"{outcome}: {answer}" if answer else outcome
    except httpx.HTTPError as failure:
        error = f"{type(failure).__name__}: {failure}".rstrip(": ")
        outcome = error
    endpoint_answered(engine, url, status is not None and status not in ENDPOINT_DOWN, at)
    attempt = WebhookAttemptRow(
        delivery_id=delivery_id,
        number=0,
        at=at,
        status_code=status,
        error=error,
        duration_ms=round((time.monotonic() - started) * 1000),
    )
    _record_attempt(engine, delivery_id, attempt, error or outcome, delivered=error is None)
    if status == 410:
        raise ApplicationError(
            f"{url} answered 410 Gone: not retried", type="WebhookRefused", non_retryable=True
        )
    if error is not None:
        raise ApplicationError(f"{url}: {error}", type="WebhookFailed")


def mark_failed(engine: Engine, delivery_id: str) -> None:
    with Session(engine) as session:
        delivery = session.get(WebhookDeliveryRow, delivery_id)
        if delivery is not None and delivery.status == PENDING:
            delivery.status = FAILED
            delivery.updated_at = datetime.now(UTC)
            session.add(delivery)
            session.commit()


class WebhookActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="deliver_webhook")
    def deliver_webhook(self, delivery_id: str) -> None:
        """One attempt to deliver a webhook message."""
        deliver(self._engine, delivery_id)

    @activity.defn(name="mark_webhook_failed")
    def mark_webhook_failed(self, delivery_id: str) -> None:
        """Retries are exhausted, or the message was refused for good."""
        mark_failed(self._engine, delivery_id)


# --- staff: list, redeliver, repair ---------------------------------------------------------


def list_deliveries(engine: Engine, failed_only: bool = False) -> list[WebhookDeliveryRow]:
    """Newest first."""
    query = select(WebhookDeliveryRow).order_by(
        col(WebhookDeliveryRow.created_at).desc(), col(WebhookDeliveryRow.id)
    )
    if failed_only:
        query = query.where(WebhookDeliveryRow.status == FAILED)
    with Session(engine) as session:
        return list(session.exec(query).all())


def list_attempts(engine: Engine, delivery_id: str) -> list[WebhookAttemptRow]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(WebhookAttemptRow)
                .where(WebhookAttemptRow.delivery_id == delivery_id)
                .order_by(col(WebhookAttemptRow.number))
            ).all()
        )


async def _running(client: Client, workflow: str) -> bool:
    try:
        description = await client.get_workflow_handle(workflow).describe(rpc_timeout=RPC_TIMEOUT)
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return description.status == WorkflowExecutionStatus.RUNNING


def _next_redelivery(engine: Engine, delivery_id: str) -> WebhookDeliveryRow:
    """Count one more redelivery and make the message pending again."""
    with Session(engine) as session:
        delivery = session.get(WebhookDeliveryRow, delivery_id)
        assert delivery is not None
        delivery.redeliveries += 1
        delivery.status = PENDING
        delivery.updated_at = datetime.now(UTC)
        session.add(delivery)
        session.commit()
        session.refresh(delivery)
        return delivery


async def redeliver(client: Client, engine: Engine, delivery_id: str, task_queue: str) -> str:
    """Send a message again (same `webhook-id`, new attempts): returns its workflow id."""
    with Session(engine) as session:
        delivery = session.get(WebhookDeliveryRow, delivery_id)
    if delivery is None:
        raise Refused(f"unknown webhook delivery {delivery_id}")
    if await _running(client, workflow_id(delivery)):
        raise Refused(
            f"{delivery_id} is still being attempted ({workflow_id(delivery)}); "
            "redeliver it once it is delivered or failed"
        )
    delivery = await asyncio.to_thread(_next_redelivery, engine, delivery_id)
    # An operator redelivers once the endpoint is back: try it now, whatever its circuit said.
    await asyncio.to_thread(
        endpoint_answered, engine, delivery.endpoint_url, True, datetime.now(UTC)
    )
    await start_delivery(client, delivery, task_queue)
    return workflow_id(delivery)
