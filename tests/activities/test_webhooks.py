"""Signed webhooks: the outbox written with each event, the Standard Webhooks signature, and
delivery end to end on the dev server to real HTTP receivers on loopback that verify every
signature, one failing then recovering, one always down, one holding another secret."""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.db import (
    CommissionRow,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
)
from activities.records import save_referral
from activities.webhooks import (
    ANSWER_BYTES,
    BREAKER_FAILURES,
    EVENT_TYPES,
    PAYABLE,
    PAYOUT_CONFIRMED,
    delivery_id,
    list_attempts,
    pending_deliveries,
    post_webhook,
    sign,
    start_deliveries,
    start_stalled_deliveries,
    with_secrets,
)
from activities.webhooks import configure as configure_webhooks
from core.program import ProgramError, load_program
from core.settings import SettingsError, WebhookRetry
from devstack.factories import RECEIVED, referral_input, submission
from devstack.settings import SETTINGS
from starter.intake import new_referral_id, submit_referral
from tests.conftest import Cli, Live, eventually
from tests.desk import act_by_id
from worker import ACTIVITY_THREADS, WEBHOOK_THREADS
from workflows.models.program import ProgramRules, WebhookEvent
from workflows.models.referral import (
    HistoryEntry,
    ReferralRecord,
    ReferralState,
    Refusal,
    StaffAction,
    Stage,
)
from workflows.models.values import Action
from workflows.transitions import apply_action, initial_state

ALL_EVENTS = list(WebhookEvent.__args__)  # type: ignore[attr-defined]
REFERRER_EMAIL = "claire.martin@conseil-martin.example"
CONTACT_EMAIL = "j.roche@fromagerie-bellevue.example"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """Standard Webhooks verification, written from the specification, apart from the code
    under test: any `v1,` signature of the space-separated list may match; the timestamp must
    be recent."""
    try:
        message_id = headers["webhook-id"]
        timestamp = headers["webhook-timestamp"]
        signatures = headers["webhook-signature"].split(" ")
        if abs(time.time() - int(timestamp)) > tolerance:
            return False
        key = base64.b64decode(secret.split("_", 1)[1])
    except (KeyError, ValueError):
        return False
    content = message_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.digest(key, content, "sha256"))
    return any(
        version == "v1" and hmac.compare_digest(given.encode(), expected)
        for version, _, given in (s.partition(",") for s in signatures)
    )


# --- the signature ------------------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_example() -> None:
    """The specification's published example (secret, id, timestamp, body -> signature)."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-signature": signature}
    assert verify(secret, {**headers, "webhook-timestamp": "1614265330"}, body, tolerance=10**10)
    assert not verify(secret, {**headers, "webhook-timestamp": "1614265331"}, body, 10**10)


def test_every_event_type_is_emitted_and_subscribable() -> None:
    assert sorted([*EVENT_TYPES.values(), PAYABLE, PAYOUT_CONFIRMED]) == sorted(ALL_EVENTS)


# --- program.yaml -------------------------------------------------------------------------


def write_program(path: Path, webhooks: list[dict[str, Any]], base: Path) -> Path:
    data = yaml.safe_load(base.read_text(encoding="utf-8"))
    data["webhooks"] = webhooks
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ({"secret": "s3cret"}, "webhooks.0.secret: Value error, a webhook secret is 'whsec_'"),
        ({"secret": "whsec_c2hvcnQ="}, "24 to 64 random bytes"),
        ({"url": "ftp://crm.example/x"}, "webhooks.0.url: Value error, 'ftp://crm.example/x' is"),
        ({"events": ["referral.won", "deal.won"]}, "webhooks.0.events.1: Input should be"),
        ({"events": []}, "webhooks.0.events: List should have at least 1 item"),
        ({"colour": "blue"}, "webhooks.0.colour: Extra inputs are not permitted"),
        ({"secret_env": "CRM_SECRET"}, "give the endpoint's secret, or secret_env"),
        ({"secret": None, "secret_env": "crm secret"}, "webhooks.0.secret_env: String should"),
        (
            {"url": "http://crm.example/x", "include_personal_data": True},
            "webhooks.0.url: an endpoint with include_personal_data must use https",
        ),
    ],
)
def test_a_bad_endpoint_stops_the_program_with_its_field(
    tmp_path: Path, program_file: Path, endpoint: dict[str, Any], message: str
) -> None:
    good = {"url": "https://crm.example/hooks", "secret": new_secret(), "events": ["referral.won"]}
    path = write_program(tmp_path / "program.yaml", [{**good, **endpoint}], program_file)
    with pytest.raises(ProgramError) as raised:
        load_program(path)
    assert message in str(raised.value)


def test_an_endpoint_url_appears_once(tmp_path: Path, program_file: Path) -> None:
    endpoint = {"url": "https://crm.example/h", "secret": new_secret(), "events": ["referral.won"]}
    path = write_program(tmp_path / "program.yaml", [endpoint, endpoint], program_file)
    with pytest.raises(ProgramError, match="each webhook url may appear only once"):
        load_program(path)


def test_an_endpoint_secret_can_live_in_the_environment(
    tmp_path: Path, program_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`secret_env` keeps the secret out of program.yaml: read from the variable, or from the
    file its `_FILE` names; a process whose variable is missing or wrong is told which."""
    endpoint = {
        "url": "https://crm.example/h",
        "secret_env": "CRM_SECRET",
        "events": ["referral.won"],
    }
    rules = load_program(write_program(tmp_path / "program.yaml", [endpoint], program_file))
    secret = new_secret()
    with pytest.raises(SettingsError, match="missing CRM_SECRET"):
        with_secrets(rules.webhooks)
    monkeypatch.setenv("CRM_SECRET", "not-a-whsec")
    with pytest.raises(SettingsError, match="CRM_SECRET: Value error, a webhook secret is"):
        with_secrets(rules.webhooks)
    monkeypatch.delenv("CRM_SECRET")
    (tmp_path / "crm-secret").write_text(secret + "\n")
    monkeypatch.setenv("CRM_SECRET_FILE", str(tmp_path / "crm-secret"))
    [resolved] = with_secrets(rules.webhooks)
    assert resolved.secret == secret and resolved.url == "https://crm.example/h"


# --- the outbox ---------------------------------------------------------------------------


def lifecycle(rules: ProgramRules) -> list[ReferralRecord]:
    """One referral's writes to the system of record, change by change as the workflow makes
    them, a refused action and a partial payment among them. A new referral id each time:
    delivery ids, and so their workflow ids, derive from it."""
    state = initial_state(referral_input(rules, referral_id=new_referral_id()))
    records = [ReferralRecord(state=state.model_copy(update={"history": []}), events=state.history)]
    steps: list[dict[str, Any]] = [
        {"action": Action.CONTACTED},
        {"action": Action.APPROVE},  # refused: not allowed yet
        {"action": Action.ACCEPT},
        {"action": Action.EXTEND, "days": 30, "reason": "board meets in June"},
        {"action": Action.APPROVE},
        {"action": Action.WON, "amount": Decimal("180000"), "currency": "EUR"},
        {"action": Action.PAYMENT, "amount": Decimal("100000"), "reference": "INV-1"},
        {"action": Action.PAYMENT, "amount": Decimal("80000"), "reference": "INV-2"},
        {
            "action": Action.REFUND,
            "amount": Decimal("18000"),
            "reference": "AV-1",
            "reason": "credit note",
        },
        {"action": Action.PAYOUT, "reference": "VIR-1"},
    ]
    for number, step in enumerate(steps, start=1):
        at = RECEIVED + timedelta(days=number)
        result = apply_action(state, StaffAction(actor="alice", **step), rules, at)
        if isinstance(result, Refusal):
            entry = HistoryEntry(
                at=at,
                action=step["action"].value,
                actor="alice",
                outcome="refused",
                seq=state.next_seq(),
            )
            state = state.model_copy(update={"history": [*state.history, entry]})
        else:
            state = result
        state.revision += 1
        records.append(
            ReferralRecord(
                state=state.model_copy(update={"history": []}), events=[state.history[-1]]
            )
        )
    return records


WebhooksFrom = Callable[..., None]


@pytest.fixture
def webhooks_from() -> Iterator[WebhooksFrom]:
    """Configures this process's webhooks as an entry point does from its settings (the
    program file, the retries); back to the defaults afterwards."""
    defaults = WebhookRetry()
    yield lambda path, retry=defaults: configure_webhooks(path, retry)
    configure_webhooks(Path("program.yaml"), defaults)


def deliveries(engine: Engine, referral_id: str | None = None) -> list[WebhookDeliveryRow]:
    with Session(engine) as session:
        query = select(WebhookDeliveryRow).order_by(WebhookDeliveryRow.event_key)
        if referral_id is not None:
            query = query.where(WebhookDeliveryRow.referral_id == referral_id)
        return list(session.exec(query).all())


def test_without_webhooks_nothing_is_written(
    engine: Engine, rules: ProgramRules, program_file: Path, webhooks_from: WebhooksFrom
) -> None:
    webhooks_from(program_file)
    for record in lifecycle(rules):
        save_referral(engine, record)
    assert deliveries(engine) == []


def test_each_event_is_queued_once_for_each_subscribed_endpoint(
    engine: Engine,
    rules: ProgramRules,
    program_file: Path,
    tmp_path: Path,
    webhooks_from: WebhooksFrom,
) -> None:
    crm = {"url": "https://crm.example/hooks", "secret": new_secret(), "events": ALL_EVENTS}
    finance = {
        "url": "http://127.0.0.1:9/finance",
        "secret": new_secret(),
        "events": ["commission.payable", "commission.paid"],
    }
    webhooks_from(write_program(tmp_path / "program.yaml", [crm, finance], program_file))
    records = lifecycle(rules)
    for record in records:
        save_referral(engine, record)
    for record in records:  # a retried activity writes again: nothing more
        save_referral(engine, record)

    rows = sorted(deliveries(engine), key=lambda r: int(r.event_key.rpartition("/")[2]))
    to_crm = [r for r in rows if r.endpoint_url == crm["url"]]
    assert [r.event_type for r in to_crm] == [
        "referral.submitted",
        "referral.contacted",
        "referral.accepted",
        "referral.protection_extended",
        "referral.approved",
        "referral.won",
        "commission.payable",  # the second payment, which completes the basis
        "commission.clawback",
        "commission.paid",
    ]
    assert [r.event_type for r in rows if r.endpoint_url == finance["url"]] == [
        "commission.payable",
        "commission.paid",
    ]
    assert all(r.status == "pending" and r.attempts == 0 for r in rows)
    assert len({r.id for r in rows}) == len(rows)
    assert all(r.id.startswith("msg_") for r in rows)
    won = json.loads(next(r.payload for r in to_crm if r.event_type == "referral.won"))
    assert won["type"] == "referral.won"
    assert won["data"]["stage"] == "won"
    assert won["data"]["commission"] == {
        "amount": "18000.00",
        "currency": "EUR",
        "status": "pending",
        "basis_amount": "180000.00",
        "customer_paid": "0.00",
        "clawed_back": "0.00",
    }
    stored = " ".join(r.payload for r in rows)
    assert REFERRER_EMAIL not in stored and "Claire" not in stored  # added only when sent


async def test_a_delivery_is_started_once_whoever_starts_it(
    engine: Engine,
    dev_env: WorkflowEnvironment,
    rules: ProgramRules,
    program_file: Path,
    tmp_path: Path,
    webhooks_from: WebhooksFrom,
) -> None:
    """record_referral starts the deliveries of the events it wrote, again when retried;
    reconcile starts those nobody started. Neither ever starts one twice."""
    crm = {"url": "https://crm.example/hooks", "secret": new_secret(), "events": ALL_EVENTS}
    webhooks_from(write_program(tmp_path / "program.yaml", [crm], program_file))
    client = dev_env.client
    queue = f"webhooks-test-{uuid.uuid4()}"  # no worker: the workflows only wait
    submitted, contacted = lifecycle(rules)[:2]
    referral_id = submitted.state.referral_id
    save_referral(engine, submitted)
    save_referral(engine, contacted)
    first, second = deliveries(engine)
    started = []
    try:
        for _ in range(2):  # the activity, then its retry
            await start_deliveries(client, pending_deliveries(engine, referral_id, [0]), queue)
        started.append(client.get_workflow_handle(f"webhook-{first.id}"))
        assert (await started[0].describe()).status == WorkflowExecutionStatus.RUNNING
        lines = await start_stalled_deliveries(client, engine, queue, timedelta(0))
        started.append(client.get_workflow_handle(f"webhook-{second.id}"))
        assert lines == [
            f"{second.id}: webhook referral.contacted of {referral_id} was not being "
            "delivered; started"
        ]
        assert await start_stalled_deliveries(client, engine, queue, timedelta(0)) == []
        assert (await started[1].describe()).status == WorkflowExecutionStatus.RUNNING
    finally:
        for handle in started:
            await handle.terminate(reason="test over")


# --- end to end ---------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int

    @property
    def message(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Endpoint:
    """How one path of the receiver behaves: the secret it verifies with, and how many
    requests it answers 503 before answering 200 (`down`: every one)."""

    secret: str
    fail_first: int = 0
    down: bool = False


@dataclass
class Receiver:
    """A real HTTP server on loopback, endpoints by path; a request whose signature does not
    verify is answered 401."""

    port: int
    endpoints: dict[str, Endpoint]
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            endpoint = self.endpoints.get(path)
            if endpoint is None:
                return 404
            verified = verify(endpoint.secret, headers, body)
            if not verified:
                status = 401
            elif endpoint.down or endpoint.fail_first > 0:
                endpoint.fail_first -= 1
                status = 503
            else:
                status = 200
            self.received.append(Received(path, headers, body, verified, status))
            return status

    def at(self, path: str, referral_id: str) -> list[Received]:
        with self.lock:
            return [
                r
                for r in self.received
                if r.path == path and r.message["data"]["referral_id"] == referral_id
            ]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status = state["receiver"].answer(self.path, headers, body)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["receiver"] = Receiver(port=server.server_address[1], endpoints={})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state["receiver"]
    server.shutdown()
    server.server_close()


async def test_deliveries_are_signed_retried_recorded_and_never_hold_up_the_referral(
    live: Live,
    cli: Cli,
    rules: ProgramRules,
    program_file: Path,
    receiver: Receiver,
    tmp_path: Path,
    webhooks_from: WebhooksFrom,
) -> None:
    crm, flaky, down, wrong = new_secret(), new_secret(), new_secret(), new_secret()
    receiver.endpoints = {
        "/crm": Endpoint(crm),
        "/flaky": Endpoint(flaky, fail_first=2),
        "/down": Endpoint(down, down=True),
        "/wrong": Endpoint(new_secret()),  # verifies with another secret than ours
    }
    webhooks: list[dict[str, Any]] = [
        {
            "url": receiver.url("/crm"),
            "secret": crm,
            "events": ALL_EVENTS,
            "include_personal_data": True,
        },
        {
            "url": receiver.url("/flaky"),
            "secret": flaky,
            "events": ["referral.submitted", "referral.contacted", "referral.won"],
        },
        {"url": receiver.url("/down"), "secret": down, "events": ["referral.submitted"]},
        {"url": receiver.url("/wrong"), "secret": wrong, "events": ["referral.submitted"]},
    ]
    # Give up after 12 s: long enough for /flaky's three attempts to queue behind others on a
    # loaded machine.
    webhooks_from(
        write_program(tmp_path / "program.yaml", webhooks, program_file),
        WebhookRetry(initial_interval_s=0.2, maximum_interval_s=0.5, give_up_after_s=12),
    )

    site = f"https://www.prospect-{uuid.uuid4().hex[:8]}.example/"
    referral_id = await submit_referral(
        live.client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
    )
    await act_by_id(live.client, referral_id, Action.CONTACTED)
    await act_by_id(live.client, referral_id, Action.ACCEPT)
    await act_by_id(live.client, referral_id, Action.APPROVE)
    await act_by_id(live.client, referral_id, Action.WON, amount=Decimal("180000"), currency="EUR")
    await act_by_id(
        live.client, referral_id, Action.PAYMENT, amount=Decimal("100000"), reference="INV-1"
    )
    await act_by_id(
        live.client, referral_id, Action.PAYMENT, amount=Decimal("80000"), reference="INV-2"
    )
    await act_by_id(live.client, referral_id, Action.PAYOUT, reference="VIR-1")
    handle = live.client.get_workflow_handle(referral_id, result_type=ReferralState)
    # The referral, its emails and its ledger went on while /down and /wrong refused.
    assert (await handle.result()).stage is Stage.COMMISSION_PAID
    with Session(live.engine) as session:
        commission = session.get(CommissionRow, referral_id)
        assert commission is not None and commission.status == "paid"
    referrer_mails = [
        m
        for m in live.sink.messages()
        if m["X-Referral-Id"] == referral_id and m["To"] == REFERRER_EMAIL
    ]
    assert len(referrer_mails) == 7

    async def settled() -> bool:
        return all(d.status != "pending" for d in deliveries(live.engine, referral_id))

    await eventually(settled, seconds=60)
    rows = {(d.endpoint_url, d.event_type): d for d in deliveries(live.engine, referral_id)}
    assert len(rows) == 7 + 3 + 1 + 1

    # /crm: every event, once each, signed, with personal data.
    got = receiver.at("/crm", referral_id)
    assert all(r.verified and r.answered == 200 for r in got)
    in_order = sorted(got, key=lambda r: int(r.message["data"]["event_seq"]))
    assert [r.message["type"] for r in in_order] == [
        "referral.submitted",
        "referral.contacted",
        "referral.accepted",
        "referral.approved",
        "referral.won",
        "commission.payable",  # the second payment completed the basis
        "commission.paid",
    ]
    for r in got:
        delivery = rows[(receiver.url("/crm"), r.message["type"])]
        assert r.headers["webhook-id"] == delivery.id
        assert r.headers["content-type"] == "application/json"
        assert delivery.status == "delivered" and delivery.attempts == 1
        assert r.message["data"]["referrer"]["email"] == REFERRER_EMAIL
        assert r.message["data"]["contact"]["email"] == CONTACT_EMAIL
    paid = next(r.message for r in got if r.message["type"] == "commission.paid")
    assert paid["data"]["stage"] == "commission_paid"
    assert paid["data"]["commission"]["amount"] == "18000.00"
    assert paid["data"]["commission"]["status"] == "paid"

    # /flaky: two 503s, then everything delivered; each attempt recorded with its answer.
    got = receiver.at("/flaky", referral_id)
    assert all(r.verified for r in got)
    assert [r.answered for r in got].count(503) == 2
    assert sorted(r.message["type"] for r in got if r.answered == 200) == [
        "referral.contacted",
        "referral.submitted",
        "referral.won",
    ]
    assert all(REFERRER_EMAIL not in r.body.decode() for r in got)
    assert all(CONTACT_EMAIL not in r.body.decode() for r in got)
    assert all("referrer" not in r.message["data"] for r in got)
    flaky_rows = [d for (url, _), d in rows.items() if url == receiver.url("/flaky")]
    assert all(d.status == "delivered" for d in flaky_rows)
    attempts = [a for d in flaky_rows for a in list_attempts(live.engine, d.id)]
    assert len(attempts) == len(got) == 5
    assert sorted(a.status_code or 0 for a in attempts) == [200, 200, 200, 503, 503]
    assert all(
        a.error and a.error.startswith("503 Service Unavailable")
        for a in attempts
        if a.status_code == 503
    )
    for d in flaky_rows:  # the same webhook-id on every attempt
        ids = {r.headers["webhook-id"] for r in got if r.message["type"] == d.event_type}
        assert ids == {d.id}

    # /down and /wrong: given up after the retry schedule; every attempt recorded.
    gone = rows[(receiver.url("/down"), "referral.submitted")]
    refused = rows[(receiver.url("/wrong"), "referral.submitted")]
    for delivery, status in ((gone, 503), (refused, 401)):
        assert delivery.status == "failed" and delivery.attempts >= 2
        recorded = list_attempts(live.engine, delivery.id)
        assert [a.number for a in recorded] == list(range(1, delivery.attempts + 1))
        assert {a.status_code for a in recorded} == {status}
    assert all(not r.verified for r in receiver.at("/wrong", referral_id))

    # The CLI lists what failed; a redelivery keeps the webhook-id and adds attempts.
    result = await cli("webhooks", "--failed", "--json")
    assert result.code == 0, result.err
    failed = {d["id"]: d for d in json.loads(result.out)}
    assert {gone.id, refused.id} <= set(failed)
    assert failed[gone.id]["status"] == "failed"
    assert failed[gone.id]["endpoint_url"] == receiver.url("/down")
    assert failed[gone.id]["last_outcome"].startswith("503")
    listing = await cli("webhooks")
    assert listing.code == 0 and gone.id in listing.out and "referral.submitted" in listing.out

    receiver.endpoints["/down"].down = False
    redo = await cli("webhooks", "redeliver", gone.id)
    assert redo.code == 0, redo.err
    assert f"webhook-{gone.id}-redeliver-1" in redo.out

    async def redelivered() -> bool:
        with Session(live.engine) as session:
            row = session.get(WebhookDeliveryRow, gone.id)
            return row is not None and row.status == "delivered"

    await eventually(redelivered)
    last = receiver.at("/down", referral_id)[-1]
    assert last.answered == 200 and last.verified and last.headers["webhook-id"] == gone.id
    recorded = list_attempts(live.engine, gone.id)
    assert len(recorded) == gone.attempts + 1 and recorded[-1].status_code == 200

    unknown = await cli("webhooks", "redeliver", "msg_nosuchdelivery")
    assert unknown.code == 1
    assert unknown.err.strip().splitlines() == [
        "referrals: unknown webhook delivery msg_nosuchdelivery"
    ]
    with Session(live.engine) as session:
        assert (
            session.exec(
                select(WebhookAttemptRow).where(
                    WebhookAttemptRow.delivery_id == "msg_nosuchdelivery"
                )
            ).all()
            == []
        )


def test_only_the_start_of_an_answer_is_read() -> None:
    """An endpoint that answers without end (or with gigabytes) costs one short read: the
    attempt ends, recorded with the start of the answer, instead of holding a slot."""

    class Endless(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(500)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            try:
                while True:  # 1 KiB every 50 ms: never a read timeout, never an end
                    self.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the client hung up: what we want

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        status, _, answer = post_webhook(
            f"http://127.0.0.1:{server.server_address[1]}/hooks", b"{}", {}
        )
        took = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert status == 500 and len(answer) <= ANSWER_BYTES and answer.startswith("xxx")
    assert took < 5, took


async def test_a_dead_endpoint_costs_few_attempts(
    live: Live,
    rules: ProgramRules,
    program_file: Path,
    receiver: Receiver,
    tmp_path: Path,
    webhooks_from: WebhooksFrom,
) -> None:
    """Twenty messages for an endpoint that is down: once it has failed BREAKER_FAILURES
    times in a row, no delivery tries it until its circuit's cool-down has passed, so it is
    sent a few requests in all, not a few per message."""
    down = new_secret()
    receiver.endpoints = {"/down": Endpoint(down, down=True)}
    endpoint = {"url": receiver.url("/down"), "secret": down, "events": ["referral.submitted"]}
    webhooks_from(
        write_program(tmp_path / "program.yaml", [endpoint], program_file),
        WebhookRetry(initial_interval_s=0.2, maximum_interval_s=0.5, give_up_after_s=10),
    )
    referrals = [
        await submit_referral(
            live.client,
            live.engine,
            rules,
            submission(**{"prospect.website": f"https://www.dead-{uuid.uuid4().hex[:8]}.example/"}),
            SETTINGS,
        )
        for _ in range(20)
    ]

    async def given_up() -> bool:
        rows = [d for r in referrals for d in deliveries(live.engine, r)]
        return len(rows) == 20 and all(d.status == "failed" for d in rows)

    await eventually(given_up, seconds=60)
    sent = [r for r in receiver.received if r.path == "/down"]
    # Without the breaker: every message tried every 0.2 to 0.5 s for 10 s, about 500 requests.
    assert len(sent) <= BREAKER_FAILURES + ACTIVITY_THREADS, len(sent)
    with Session(live.engine) as session:
        breaker = session.get(WebhookEndpointRow, receiver.url("/down"))
    assert breaker is not None and breaker.failures >= BREAKER_FAILURES
    assert breaker.open_until is not None


class BlackHole:
    """An endpoint that takes every connection and never answers, as a hung server or a
    firewall that drops replies does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.held.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


async def test_an_endpoint_that_never_answers_holds_up_no_staff_update(
    live: Live,
    rules: ProgramRules,
    program_file: Path,
    tmp_path: Path,
    webhooks_from: WebhooksFrom,
) -> None:
    """Three hundred messages pending for it: their attempts fill the webhook worker's own
    slots, 10 seconds each, and the referrals' database writes, which staff updates wait on,
    go on as usual on theirs."""
    hole = BlackHole()
    url = f"http://127.0.0.1:{hole.port}/hooks"
    endpoint = {"url": url, "secret": new_secret(), "events": ["referral.submitted"]}
    webhooks_from(
        write_program(tmp_path / "program.yaml", [endpoint], program_file),
        WebhookRetry(initial_interval_s=1, maximum_interval_s=2, give_up_after_s=120),
    )
    site = f"https://www.hole-{uuid.uuid4().hex[:8]}.example/"
    owner = await submit_referral(
        live.client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
    )
    now = datetime.now(UTC)
    pending = [
        WebhookDeliveryRow(
            id=delivery_id(f"{owner}/backlog-{n}", url),
            event_key=f"{owner}/backlog-{n}",
            event_type="referral.submitted",
            referral_id=owner,
            endpoint_url=url,
            payload=json.dumps({"type": "referral.submitted", "data": {"referral_id": owner}}),
            status="pending",
            created_at=now,
            updated_at=now,
        )  # fmt: skip
        for n in range(300)
    ]
    with Session(live.engine, expire_on_commit=False) as session:
        session.add_all(pending)
        session.commit()
    try:
        await start_deliveries(live.client, pending, SETTINGS.task_queue)

        async def slots_full() -> bool:
            return len(hole.held) >= WEBHOOK_THREADS

        await eventually(slots_full)
        took = []
        site = f"https://www.busy-{uuid.uuid4().hex[:8]}.example/"
        referral_id = await submit_referral(
            live.client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
        )
        for action in (Action.CONTACTED, Action.ACCEPT, Action.APPROVE):
            started = time.monotonic()
            await act_by_id(live.client, referral_id, action)
            took.append(time.monotonic() - started)
        assert len(hole.held) >= WEBHOOK_THREADS  # the endpoint was still holding them
        # Each update waits for its database write; shared slots would have queued it behind
        # the 300 attempts (minutes). Usually well under a second.
        assert max(took) < 5, took
    finally:
        hole.close()  # the attempts in flight end now, not at their timeout
        for delivery in pending:
            with contextlib.suppress(RPCError):
                await live.client.get_workflow_handle(f"webhook-{delivery.id}").terminate()
