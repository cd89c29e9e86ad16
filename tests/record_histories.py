"""`make histories`: record one history per referral path into `tests/histories/<release>/`.

Each path runs on a real dev server with the contract's search attributes, the real worker,
a SQLite database and a loopback SMTP sink, exactly as a referral runs in production. The
folder is named for the release in pyproject.toml and is never overwritten: a set recorded
by an older release stays in the corpus, and `make test` replays every set on today's code.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.engine import Engine
from sqlmodel import Session as SqlSession
from sqlmodel import select
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowHistory,
)
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.db import WebhookDeliveryRow, make_engine
from activities.payees import accept_mandate, save_payee
from activities.schema import upgrade
from activities.webhooks import configure as configure_webhooks
from activities.webhooks import redeliver
from core.encryption import KEYS_ENV, new_key_entry
from core.payees import MANDATE_VERSION, MandateAcceptance, PayeeProfile, mandate_hash, mandate_text
from core.program import load_program
from core.settings import Settings, SmtpSettings
from core.temporal import data_converter, payload_codec
from devstack.factories import referral_input, submission
from devstack.ports import free_port
from devstack.settings import BIN, ROOT, SEARCH_ATTRIBUTES, SETTINGS, signed
from starter.intake import submit_referral
from starter.mail_sink import MaildirHandler
from starter.payouts import act_on_run, prepare_run
from worker import build_webhook_worker, build_worker
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralState, StaffAction, Stage
from workflows.models.values import Action
from workflows.payout_run import run_workflow_id
from workflows.payouts import RunAction, RunRequest, RunState, payout_referral, payout_requests
from workflows.referral import ReferralWorkflow

HISTORIES = ROOT / "tests" / "histories"
QUEUE = "referrals"


@dataclass
class Desk:
    client: Client
    engine: Engine
    rules: ProgramRules
    settings: Settings

    async def submit(
        self, received_at: datetime | None = None, referrer_email: str | None = None
    ) -> WorkflowHandle[Any, Any]:
        site = f"https://www.history-{uuid.uuid4().hex[:8]}.example/"
        changes = {"referrer.email": referrer_email} if referrer_email else {}
        referral_id = await submit_referral(
            self.client,
            self.engine,
            self.rules,
            submission(**{"prospect.website": site, **changes}),
            self.settings,
            submitted_by="desk-anna",
            received_at=received_at,
        )
        return self.client.get_workflow_handle(referral_id)

    async def start_unindexed(self, env: WorkflowEnvironment) -> WorkflowHandle[Any, Any]:
        """On the time-skipping server, which has no custom search attributes."""
        referral_id = f"R-{uuid.uuid4().hex[:10].upper()}"
        given = referral_input(
            self.rules, referral_id=referral_id, received_at=await env.get_current_time()
        ).model_copy(update={"index_search_attributes": False})
        return await self.client.start_workflow(
            ReferralWorkflow.run, given, id=referral_id, task_queue=QUEUE
        )

    async def state(self, handle: WorkflowHandle[Any, Any]) -> ReferralState:
        return await handle.query("state", result_type=ReferralState)

    async def act(self, handle: WorkflowHandle[Any, Any], action: Action, **values: Any) -> None:
        request = StaffAction(action=action, actor="desk-anna", **values)
        await handle.execute_update("act", signed(handle.id, request), result_type=None)

    async def signal(self, handle: WorkflowHandle[Any, Any], action: Action, **values: Any) -> None:
        await handle.signal("action", StaffAction(action=action, actor="crm-sync", **values))

    async def until(
        self, handle: WorkflowHandle[Any, Any], check: Callable[[ReferralState], bool]
    ) -> None:
        for _ in range(300):
            if check(await handle.query("state", result_type=ReferralState)):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{handle.id} did not reach the expected state")


async def walk_to(desk: Desk, handle: WorkflowHandle[Any, Any], stage: Stage) -> None:
    """Along the happy path, by updates, up to `stage`."""
    path: list[tuple[Action, dict[str, Any]]] = [
        (Action.CONTACTED, {"note": "phoned the referrer"}),
        (Action.ACCEPT, {}),
        (Action.APPROVE, {"note": "budget confirmed"}),
        (Action.WON, {"amount": Decimal("180000"), "currency": "EUR", "payment_terms_days": 0}),
        (Action.PAYMENT, {"amount": Decimal("180000"), "reference": "INV-1"}),
    ]
    order = [
        Stage.SUBMITTED,
        Stage.CONTACTED,
        Stage.QUALIFYING,
        Stage.APPROVED,
        Stage.WON,
        Stage.COMMISSION_PAYABLE,
    ]
    current = (await handle.query("state", result_type=ReferralState)).stage
    for (action, values), reached in zip(path, order[1:], strict=True):
        if order.index(reached) > order.index(current):
            await desk.act(handle, action, **values)
        if reached is stage:
            return


async def full_lifecycle(desk: Desk) -> WorkflowHandle[Any, Any]:
    """Partial payments, and a payment overdue reminder (terms of 0 days)."""
    handle = await desk.submit()
    await walk_to(desk, handle, Stage.WON)
    await desk.until(handle, lambda s: s.payment_reminders_sent >= 1)
    await desk.act(handle, Action.PAYMENT, amount=Decimal("100000"), reference="INV-1")
    await desk.act(handle, Action.PAYMENT, amount=Decimal("80000"), reference="INV-2")
    await desk.act(handle, Action.PAYOUT, reference="VIR-1")
    return handle


async def contact_sla_breach(desk: Desk) -> WorkflowHandle[Any, Any]:
    """Received two weeks ago: the reminder and the deadline are both due at once."""
    handle = await desk.submit(received_at=datetime.now(UTC) - timedelta(days=14))
    await desk.until(handle, lambda s: s.contact_sla_breached)
    await desk.act(handle, Action.CONTACTED, note="late, sorry")
    await desk.act(handle, Action.DECLINE, reason="already a customer")
    return handle


async def decline(desk: Desk) -> WorkflowHandle[Any, Any]:
    handle = await desk.submit()
    await desk.act(handle, Action.DECLINE, reason="not a fit")
    return handle


async def reject(desk: Desk) -> WorkflowHandle[Any, Any]:
    handle = await desk.submit()
    await walk_to(desk, handle, Stage.QUALIFYING)
    await desk.act(handle, Action.REJECT, reason="no budget")
    return handle


async def lost(desk: Desk) -> WorkflowHandle[Any, Any]:
    handle = await desk.submit()
    await walk_to(desk, handle, Stage.APPROVED)
    await desk.act(handle, Action.LOST, reason="went with a competitor")
    return handle


async def cancel_after_won(desk: Desk) -> WorkflowHandle[Any, Any]:
    handle = await desk.submit()
    await walk_to(desk, handle, Stage.WON)
    await desk.act(handle, Action.PAYMENT, amount=Decimal("20000"), reference="INV-1")
    await desk.act(handle, Action.CANCEL, reason="contract rescinded")
    return handle


async def temporal_cancellation(desk: Desk) -> WorkflowHandle[Any, Any]:
    """Cancelled from Temporal (the UI's button, `temporal workflow cancel`)."""
    handle = await desk.submit()
    await walk_to(desk, handle, Stage.QUALIFYING)
    await handle.cancel()
    return handle


async def refused_and_duplicated_signals(desk: Desk) -> WorkflowHandle[Any, Any]:
    """An integration that signals out of order and twice."""
    handle = await desk.submit()
    await desk.signal(handle, Action.APPROVE)  # not allowed yet: refused
    await desk.signal(handle, Action.CONTACTED, request_id="crm-1")
    await desk.signal(handle, Action.CONTACTED, request_id="crm-1")  # redelivered: applied once
    for action in (Action.CONTACTED, Action.ACCEPT, Action.APPROVE):  # a new request: refused
        await desk.signal(handle, action)
    won = {"amount": Decimal("50000"), "currency": "EUR", "request_id": "crm-2"}
    # A signal proves no actor: since 0.8 it cannot move money (refused, its request id not
    # used up), and the desk records the same request, signed, by update.
    await desk.signal(handle, Action.WON, **won)
    await desk.act(handle, Action.WON, **won)
    await desk.signal(handle, Action.WON, **won)  # applied already: ignored
    payment = {"amount": Decimal("50000"), "reference": "INV-7"}
    await desk.act(handle, Action.PAYMENT, **payment)
    await desk.until(handle, lambda s: s.stage is Stage.COMMISSION_PAYABLE)
    await desk.act(handle, Action.PAYOUT, reference="VIR-7")
    return handle


async def in_flight_won(desk: Desk) -> WorkflowHandle[Any, Any]:
    """Still running when recorded: won, partly paid, with a payment reminder pending."""
    handle = await desk.submit()
    await walk_to(desk, handle, Stage.WON)
    await desk.act(handle, Action.PAYMENT, amount=Decimal("60000"), reference="INV-1")
    return handle


async def in_flight_submitted(desk: Desk) -> WorkflowHandle[Any, Any]:
    """Still running when recorded: waiting for contact, timers pending."""
    return await desk.submit()


async def email_refused(desk: Desk) -> WorkflowHandle[Any, Any]:
    """The referrer's address does not exist: every email to it is refused (SMTP 550)."""
    handle = await desk.submit(referrer_email=f"claire@{BOUNCING_DOMAIN}")
    await desk.act(handle, Action.CONTACTED)
    await desk.act(handle, Action.DECLINE, reason="could not reach the referrer")
    return handle


async def upgraded_from_0_1_0(desk: Desk) -> list[WorkflowHandle[Any, Any]]:
    """Started as release 0.1.0 ran (patches off), then carried over by `upgrade`: the
    first run ends in continue-as-new, the second resumes from its state."""
    queue = f"legacy-{uuid.uuid4().hex[:6]}"
    given = referral_input(
        desk.rules, f"R-{uuid.uuid4().hex[:10].upper()}", received_at=datetime.now(UTC)
    )
    off = build_worker(
        desk.client,
        desk.engine,
        desk.settings,
        queue=queue,
        patch_activation_callback=lambda _: False,
    )
    async with off:
        first = await desk.client.start_workflow(
            ReferralWorkflow.run, given, id=given.referral_id, task_queue=queue
        )
        await walk_to(desk, first, Stage.APPROVED)
    async with build_worker(desk.client, desk.engine, desk.settings, queue=queue):
        await first.signal("upgrade")
        run1 = desk.client.get_workflow_handle(given.referral_id, run_id=first.result_run_id)
        while (await run1.describe()).status != WorkflowExecutionStatus.CONTINUED_AS_NEW:
            await asyncio.sleep(0.1)
        second = desk.client.get_workflow_handle(given.referral_id)
        await walk_to(desk, second, Stage.WON)
        await desk.act(second, Action.PAYMENT, amount=Decimal("180000"), reference="INV-1")
        await desk.act(second, Action.PAYOUT, reference="VIR-1")  # open for clawback
    described = await second.describe()
    return [run1, desk.client.get_workflow_handle(given.referral_id, run_id=described.run_id)]


async def continued_as_new(desk: Desk) -> list[WorkflowHandle[Any, Any]]:
    """Flooded with refused signals until its run continues as new at a quiet point (the
    server suggests it early, see `record_continued`), carrying refusals not yet written;
    then paid out on the new run, which stays open for clawback."""
    handle = await desk.submit()
    first = (await handle.describe()).run_id
    while (await handle.describe()).run_id == first:
        await desk.signal(handle, Action.PAYOUT)  # not payable yet: refused
    await walk_to(desk, handle, Stage.COMMISSION_PAYABLE)
    await desk.act(handle, Action.PAYOUT, reference="VIR-1")
    described = await handle.describe()
    return [
        desk.client.get_workflow_handle(handle.id, run_id=run_id)
        for run_id in (first, described.run_id)
    ]


async def extension(desk: Desk) -> WorkflowHandle[Any, Any]:
    """Still running when recorded: protected since `accept`, extended once (ProtectedUntil)."""
    handle = await desk.submit()
    await walk_to(desk, handle, Stage.APPROVED)
    await desk.act(handle, Action.EXTEND, days=45, reason="the board meets in spring")
    return handle


async def refund_before_payout(desk: Desk) -> WorkflowHandle[Any, Any]:
    """A credit note while payable lowers what is paid out; then open for clawback."""
    handle = await desk.submit()
    await walk_to(desk, handle, Stage.COMMISSION_PAYABLE)
    refund = {"amount": Decimal("45000"), "reference": "AV-1", "reason": "two modules returned"}
    await desk.act(handle, Action.REFUND, **refund)
    await desk.act(handle, Action.PAYOUT, reference="VIR-1")
    return handle


async def refund_after_payout(desk: Desk) -> WorkflowHandle[Any, Any]:
    """Still running when recorded: paid out, then clawed back by a refund, window open."""
    handle = await desk.submit()
    await walk_to(desk, handle, Stage.COMMISSION_PAYABLE)
    await desk.act(handle, Action.PAYOUT, reference="VIR-1")
    refund = {"amount": Decimal("90000"), "reference": "AV-1", "reason": "contract halved"}
    await desk.act(handle, Action.REFUND, **refund)
    return handle


async def protection_expiry(desk: Desk, env: WorkflowEnvironment) -> WorkflowHandle[Any, Any]:
    """Accepted, extended, warned, then expired: months of timers, on the time-skipping server."""
    handle = await desk.start_unindexed(env)
    await walk_to(desk, handle, Stage.QUALIFYING)
    await desk.act(handle, Action.EXTEND, days=30, reason="budget vote in June")
    ends = (await desk.state(handle)).protected_until
    assert ends is not None
    await env.sleep(ends + timedelta(hours=1) - await env.get_current_time())
    return handle


async def clawback_window_closed(desk: Desk, env: WorkflowEnvironment) -> WorkflowHandle[Any, Any]:
    """Paid, refunded in the window, then closed when the window ends (time-skipping server)."""
    handle = await desk.start_unindexed(env)
    await walk_to(desk, handle, Stage.COMMISSION_PAYABLE)
    await desk.act(handle, Action.PAYOUT, reference="VIR-1")
    refund = {"amount": Decimal("18000"), "reference": "AV-1", "reason": "one licence returned"}
    await desk.act(handle, Action.REFUND, **refund)
    ends = (await desk.state(handle)).clawback_until
    assert ends is not None
    await env.sleep(ends + timedelta(hours=1) - await env.get_current_time())
    return handle


class WebhookReceiver(BaseHTTPRequestHandler):
    """Loopback endpoints: `/ok` answers 200, `/flaky` 503 to the first two attempts of each
    message, `/down` 503 until `recovered` is set."""

    attempts: dict[str, int] = {}
    recovered = False

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        seen = self.attempts[self.headers["webhook-id"]] = (
            self.attempts.get(self.headers["webhook-id"], 0) + 1
        )
        failing = (self.path == "/flaky" and seen <= 2) or (
            self.path == "/down" and not WebhookReceiver.recovered
        )
        self.send_response(503 if failing else 200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def webhooks(desk: Desk, program: Path) -> dict[str, WorkflowHandle[Any, Any]]:
    """One referral's `referral.submitted` sent to three endpoints: delivered at once, after
    two failed attempts, given up (failed); then the failed one redelivered once its endpoint
    is back. The retry schedule is shortened (REFERRALS_WEBHOOK_* in `main`)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), WebhookReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    secret = "whsec_" + base64.b64encode(uuid.uuid4().bytes * 2).decode()
    endpoints = [
        {"url": f"{base}/{name}", "secret": secret, "events": ["referral.submitted"]}
        for name in ("ok", "flaky", "down")
    ]
    data = yaml.safe_load((ROOT / "program.yaml").read_text(encoding="utf-8"))
    program.write_text(yaml.safe_dump({**data, "webhooks": endpoints}), encoding="utf-8")
    try:
        referral = await desk.submit()
        rows: list[WebhookDeliveryRow] = []
        for _ in range(100):  # queued with the event, by the intake or record_referral
            with SqlSession(desk.engine) as session:
                rows = list(
                    session.exec(
                        select(WebhookDeliveryRow).where(
                            WebhookDeliveryRow.referral_id == referral.id
                        )
                    )
                )
            if len(rows) == len(endpoints):
                break
            await asyncio.sleep(0.1)
        by_endpoint = {row.endpoint_url.rsplit("/", 1)[1]: row.id for row in rows}
        runs = {
            path: desk.client.get_workflow_handle(f"webhook-{by_endpoint[name]}")
            for path, name in (
                ("webhook_delivered", "ok"),
                ("webhook_retried", "flaky"),
                ("webhook_failed", "down"),
            )
        }
        for handle in runs.values():
            await _started(handle)
        outcomes = [await handle.result() for handle in runs.values()]
        assert outcomes == ["delivered", "delivered", "failed"], outcomes
        WebhookReceiver.recovered = True
        again = await redeliver(desk.client, desk.engine, by_endpoint["down"], QUEUE)
        runs["webhook_redelivered"] = desk.client.get_workflow_handle(again)
        assert await runs["webhook_redelivered"].result() == "delivered"
        return runs
    finally:
        program.write_text((ROOT / "program.yaml").read_text(encoding="utf-8"), encoding="utf-8")
        server.shutdown()


async def _started(handle: WorkflowHandle[Any, Any]) -> None:
    """record_referral starts deliveries just after its write: wait for the workflow."""
    for _ in range(100):
        try:
            await handle.describe()
            return
        except RPCError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{handle.id} never started")


Runs = WorkflowHandle[Any, Any] | list[WorkflowHandle[Any, Any]]


async def payout_runs(desk: Desk) -> dict[str, WorkflowHandle[Any, Any]]:
    """Payout runs to their end: paid and confirmed, a payment the bank returned, cancelled.
    Each in a currency of its own, so that it pays only its own referral."""
    key, company = SETTINGS.actor_signing_key, desk.rules.payouts.company
    assert key is not None and company is not None
    # The program's cap is in euros: without it, a deal may be won in another currency.
    uncapped = desk.rules.commission.model_copy(update={"cap": None})
    desk = dataclasses.replace(desk, rules=desk.rules.model_copy(update={"commission": uncapped}))
    handles = {}
    for name, currency, iban in (
        ("payout_run_confirmed", "CHF", "FR7630001007941234567890185"),
        ("payout_run_failed_item", "SEK", "FR1420041010050500013M02606"),
        ("payout_run_cancelled", "NOK", "FR7630004000031234567890143"),
    ):
        email = f"payee-{currency.lower()}-{uuid.uuid4().hex[:6]}@partner.example"
        referral = await desk.submit(referrer_email=email)
        for action, values in (
            (Action.CONTACTED, {}),
            (Action.ACCEPT, {}),
            (Action.APPROVE, {}),
            (Action.WON, {"amount": Decimal("180000"), "currency": currency}),
            (Action.PAYMENT, {"amount": Decimal("180000"), "reference": "INV-1"}),
        ):
            await desk.act(referral, action, **values)
        now = datetime.now(UTC)
        payee = PayeeProfile.model_validate(
            {
                "email": email, "legal_name": f"Partner {currency}", "kind": "company",
                "country": "FR", "address": "1 place du Marché, 69001 Lyon",
                "siret": "73282932000074", "vat_regime": "franchise",
                "iban": iban,
            }
        )  # fmt: skip
        save_payee(desk.engine, payee, "desk-anna", now)
        text = mandate_text("fr", company, payee.legal_name)
        mandate = MandateAcceptance(
            version=MANDATE_VERSION, language="fr", text_sha256=mandate_hash(text),
            accepted_at=now, accepted_by="desk-anna", channel="paper", reason="signed copy",
        )  # fmt: skip
        accept_mandate(desk.engine, email, mandate, now)
        cutoff = now.date() + timedelta(days=desk.rules.payouts.holding_days + 1)
        state = await prepare_run(desk.client, desk.rules, QUEUE, currency, cutoff, "desk-anna", 60)

        async def act(
            action: RunAction, actor: str = "desk-anna", run_id: str = state.run_id, **values: Any
        ) -> RunState:
            request = RunRequest(action=action, actor=actor, request_id=uuid.uuid4().hex, **values)
            return await act_on_run(desk.client, run_id, request, 60, key)

        if name == "payout_run_cancelled":
            await act(RunAction.EXCLUDE, payee_email=email, reason="asked to wait")
            await act(RunAction.INCLUDE, payee_email=email, reason="changed their mind")
            await act(RunAction.APPROVE)
            await act(RunAction.CANCEL, reason="wrong cutoff")
        else:
            await act(RunAction.APPROVE)
            await act(RunAction.APPROVE, "desk-bob")
            exported = await act(RunAction.EXPORT)
            await act(RunAction.MARK_SENT)
            if name == "payout_run_failed_item":
                exported = await act(
                    RunAction.FAIL, payee_email=email, code="AC04", reason="account closed"
                )
            payouts = [
                key.sign(payout_referral(p), p) for p in payout_requests(exported, "desk-anna")
            ]
            await act(RunAction.CONFIRM, payouts=payouts)
        handle = desk.client.get_workflow_handle(run_workflow_id(state.run_id))
        await handle.result()
        handles[name] = handle
    return handles


PATHS: list[Callable[[Desk], Awaitable[Runs]]] = [
    full_lifecycle,
    contact_sla_breach,
    decline,
    reject,
    lost,
    cancel_after_won,
    temporal_cancellation,
    refused_and_duplicated_signals,
    in_flight_won,
    in_flight_submitted,
    email_refused,
    upgraded_from_0_1_0,
    extension,
    refund_before_payout,
    refund_after_payout,
]
# Paths that wait months: recorded on a time-skipping server each, run to their end.
TIMED_PATHS: list[Callable[[Desk, WorkflowEnvironment], Awaitable[WorkflowHandle[Any, Any]]]] = [
    protection_expiry,
    clawback_window_closed,
]
BOUNCING_DOMAIN = "bounce.example"


class BouncingSink(MaildirHandler):
    """The dev sink, except that it refuses every address at BOUNCING_DOMAIN for good."""

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.endswith(f"@{BOUNCING_DOMAIN}"):
            return "550 5.1.1 mailbox unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def settle(handle: WorkflowHandle[Any, Any]) -> None:
    """Closed paths: until the run ends. Running ones: until its effects are done."""
    try:
        await asyncio.wait_for(handle.result(), timeout=3)
    except WorkflowFailureError:
        pass  # cancelled from Temporal
    except TimeoutError:
        await asyncio.sleep(2)  # in flight: let the queued emails and writes finish


async def record_timed(
    path: Callable[[Desk, WorkflowEnvironment], Awaitable[WorkflowHandle[Any, Any]]],
    engine: Engine,
    settings: Settings,
    rules: ProgramRules,
) -> WorkflowHistory:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(BIN / "temporal-test-server"),
        data_converter=data_converter(payload_codec(settings)),
    )
    try:
        async with build_worker(env.client, engine, settings, queue=QUEUE):
            handle = await path(Desk(env.client, engine, rules, settings), env)
            with env.auto_time_skipping_disabled():  # closed during the sleep: just read it
                await handle.result()
            return await handle.fetch_history()
    finally:
        await env.shutdown()


async def record_continued(
    engine: Engine, settings: Settings, rules: ProgramRules
) -> dict[str, WorkflowHistory]:
    """`continued_as_new`, on a dev server of its own that suggests a new run after 300
    events (Temporal's default is 4 096), so that its histories stay small."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(payload_codec(settings)),
        dev_server_extra_args=[
            "--dynamic-config-value",
            "limit.historyCount.suggestContinueAsNew=300",
        ],
    )
    try:
        async with build_worker(env.client, engine, settings, queue=QUEUE):
            runs = await continued_as_new(Desk(env.client, engine, rules, settings))
            await settle(runs[-1])
            return {
                f"continued_as_new_run{number}": await run.fetch_history()
                for number, run in enumerate(runs, start=1)
            }
    finally:
        await env.shutdown()


async def record(target: Path) -> None:
    rules = load_program(ROOT / "program.yaml")
    work = Path(tempfile.mkdtemp(prefix="referral-histories-"))
    # The worker reads webhook endpoints from this file when it records an event: none until
    # the webhook paths add them.
    program = work / "program.yaml"
    program.write_text((ROOT / "program.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    engine = make_engine(f"sqlite:///{work / 'referrals.db'}")
    upgrade(engine)
    port = free_port()
    sink = Controller(BouncingSink(work / "mail"), hostname="127.0.0.1", port=port)
    sink.start()
    # The environment `main` set: this set's key, short webhook retries.
    settings = dataclasses.replace(
        Settings.from_env(cwd=work), smtp=SmtpSettings("127.0.0.1", port), program_path=program
    )
    configure_webhooks(settings.program_path, settings.webhook_retry)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(payload_codec(settings)),
    )
    try:
        worker = build_worker(env.client, engine, settings, queue=QUEUE)
        webhook_worker = build_webhook_worker(env.client, engine, settings, queue=QUEUE)
        async with worker, webhook_worker:
            desk = Desk(env.client, engine, rules, settings)
            recorded = await asyncio.gather(*(path(desk) for path in PATHS))
            runs = {
                f"{path.__name__}{f'_run{n}' if isinstance(got, list) else ''}": handle
                for path, got in zip(PATHS, recorded, strict=True)
                for n, handle in enumerate(got if isinstance(got, list) else [got], start=1)
            }
            await asyncio.gather(*(settle(handle) for handle in runs.values()))
            runs.update(await webhooks(desk, program))
            runs.update(await payout_runs(desk))
            histories = {name: await handle.fetch_history() for name, handle in runs.items()}
        for timed in TIMED_PATHS:
            histories[timed.__name__] = await record_timed(timed, engine, settings, rules)
        histories.update(await record_continued(engine, settings, rules))
        target.mkdir(parents=True)
        for name, history in histories.items():
            (target / f"{name}.json").write_text(history.to_json(), encoding="utf-8")
            print(f"  {name}: {len(history.events)} events")
    finally:
        await env.shutdown()
        sink.stop()


def main() -> int:
    # Recorded with a key of their own, stored with the set, so the replay test decodes them.
    keys = new_key_entry()
    os.environ[KEYS_ENV] = keys
    # Webhook deliveries retry within seconds, not days (see `webhooks`).
    os.environ.update(
        REFERRALS_WEBHOOK_RETRY_INITIAL_S="0.2",
        REFERRALS_WEBHOOK_RETRY_MAX_S="0.5",
        REFERRALS_WEBHOOK_GIVE_UP_S="3",
    )
    release = version("referral-desk")
    target = HISTORIES / release
    if target.exists():
        print(
            f"{target} exists: a recorded set is never overwritten; "
            "bump the version in pyproject.toml for a new release",
            file=sys.stderr,
        )
        return 1
    print(f"recording referral histories into {target.relative_to(ROOT)}")
    asyncio.run(record(target))
    (target / "encryption-keys").write_text(
        f"# The test key these histories were recorded with.\n{keys}\n", encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
