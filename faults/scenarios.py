"""The eight fault scenarios, and the common run around them.

Each scenario gets a fresh stack (database, SMTP server, Temporal dev server, worker), so a
fault or a finding in one can never leak into the next. The fault lands mid-flight: the
scenario waits until a share of the staff actions has been applied, so referrals are spread
over every stage when it hits. Each scenario says when its fault started and when it was
cleared, so the staff updates sent in between are told apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, select
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from activities.db import SentEmail, WebhookDeliveryRow, WebhookEndpointRow
from activities.webhooks import configure as configure_webhooks
from activities.webhooks import start_deliveries, webhook_queue
from core.program import load_program
from core.settings import Settings
from devstack.ports import free_port
from faults.checks import Findings, verify, verify_outbox
from faults.database import Backend, ScenarioDatabase
from faults.driver import Batch
from faults.smtp import Mode, RecordingSmtpServer
from faults.stack import (
    NAMESPACE,
    ROOT,
    TASK_QUEUE,
    Children,
    StackError,
    TemporalServer,
    Worker,
    connect,
    wait_for,
)
from faults.webhooks import BlackholeEndpoint, enqueue_backlog, write_program
from workflows.features import RELEASES
from workflows.models.program import ClawbackRules, ProgramRules

PROGRAM = ROOT / "program.yaml"
DRIVE_TIMEOUT = 300.0
FINAL_TIMEOUT = 240.0
SERVER_DOWN_SECONDS = 5.0
SMTP_DOWN_SECONDS = 5.0
SMTP_TEMPFAIL_MIN_SECONDS = 2.5
SMTP_TEMPFAIL_MIN_REPLIES = 5
DB_DOWN_MIN_SECONDS = 5.0
DB_FAILING_SECONDS = 1.0
DB_DOWN_MAX_SECONDS = 90.0
# Signs the status links of the suite's referrals (as long as a real one must be).
SECRET = "fault-suite-secret-" + "f" * 32
REFUSED_REFERRER = "refused.referrer@conseil-martin.example"
# The rolling deploy: one v1 worker replaced by a v2 one at each of these shares of the staff
# actions, v2 made current at CURRENT_AT; a v1 worker stopped finishes its in-flight
# activities (the worker's graceful shutdown is 75 s).
OLD_VERSION, NEW_VERSION = "v1", "v2"
REPLACED_AT = (0.15, 0.45)
CURRENT_AT = 0.30
GRACEFUL_STOP_SECONDS = 90.0
NEWEST_RELEASE = RELEASES[0][0]
# Each worker process polls both: the referrals' queue and its webhook deliveries'.
VERSIONED_QUEUES = [TASK_QUEUE, webhook_queue(TASK_QUEUE)]
# The webhook endpoint that never answers: messages pending for it before the run.
BACKLOG_PER_REFERRAL = 10


@dataclass
class Outcome:
    name: str
    referrals: int
    faults: str
    lost: int
    duplicated: int
    recovery_seconds: float | None
    seconds: float
    staff_retries: int = 0
    problems: list[str] = field(default_factory=list)
    crashed: str | None = None
    # Seconds each staff update took: those sent while the fault was active, and all.
    updates_in_fault: list[float] = field(default_factory=list)
    updates: list[float] = field(default_factory=list)


@dataclass
class Run:
    """One scenario's live stack and what its fault did."""

    name: str
    workdir: Path
    rules: ProgramRules
    db: ScenarioDatabase
    smtp: RecordingSmtpServer
    server: TemporalServer
    children: Children
    worker_env: dict[str, str]
    workers: list[Worker]
    batch: Batch
    # What the scenario started besides the stack, stopped with it.
    closing: contextlib.AsyncExitStack
    program: Path = PROGRAM
    endpoint: BlackholeEndpoint | None = None
    backlog: set[str] = field(default_factory=set)
    faults: str = ""
    started_at: datetime | None = None
    cleared_at: datetime | None = None
    notes: list[str] = field(default_factory=list)
    findings: Findings = field(default_factory=Findings)

    @property
    def worker(self) -> Worker:
        """The first worker started (the only one, but in the rolling deploy)."""
        return self.workers[0]

    @property
    def client(self) -> Client:
        return self.batch.client

    async def start_worker(
        self, name: str = "worker", module: str = "worker", **env: str
    ) -> Worker:
        """Another `python -m worker` (or `module`) on the stack, with the run's program."""
        worker = Worker(
            self.children,
            self.workdir,
            {**self.worker_env, "REFERRALS_PROGRAM": str(self.program), **env},
            name,
            module,
        )
        self.workers.append(worker)
        await worker.start()
        return worker

    def fault_started(self) -> None:
        """The fault is active from now (the first call counts)."""
        if self.started_at is None:
            self.started_at = datetime.now(UTC)

    def cleared(self) -> None:
        self.cleared_at = datetime.now(UTC)

    def at_share(self, share: float) -> int:
        return max(1, round(self.batch.steps_total * share))

    def updates_in_fault(self) -> list[float]:
        """Seconds taken by the staff updates sent between the fault's start and its clearing
        (the end of driving for a fault never lifted)."""
        end = self.cleared_at or self.batch.driving_ended_at
        if self.started_at is None or end is None:
            return []
        return [u.seconds for u in self.batch.updates if self.started_at <= u.sent_at <= end]


Inject = Callable[[Run], Coroutine[Any, Any, None]]


async def one_worker(run: Run) -> None:
    await run.start_worker()


async def nothing_more(run: Run) -> None:
    """Nothing to add once the workers have stopped."""


@dataclass(frozen=True)
class Scenario:
    """`setup` starts the workers (and what the fault needs) before referrals are submitted;
    `inject` runs while they are driven; `conclude`, once every worker has stopped, may say
    what the fault did and add findings of its own."""

    name: str
    inject: Inject
    duplicates: bool = False
    refused_referrer: str | None = None
    setup: Inject = one_worker
    conclude: Inject = nothing_more


# --- 1. worker SIGKILL -----------------------------------------------------------------------


async def _bookkeeping_caught_up(run: Run) -> bool:
    """Every message the SMTP server accepted has its sent-email row."""
    delivered = {d.idempotency_key for d in run.smtp.deliveries}

    def recorded() -> set[str]:
        with Session(run.db.engine) as session:
            return set(session.exec(select(SentEmail.key)).all())

    return delivered <= await asyncio.to_thread(recorded)


async def kill_worker(run: Run) -> None:
    """SIGKILL the worker, but not in the instant between an SMTP server's 250 and the
    sender writing down that it got it: a crash there is indistinguishable from a lost reply
    and no SMTP sender can avoid resending. DATA replies are held while the kill lands, so
    emails in flight are cut before acceptance and must be retried, and any duplicate the
    suite reports is one the product could have avoided."""
    run.smtp.gate.clear()
    try:
        try:
            await wait_for(
                lambda: _bookkeeping_caught_up(run), "sent-email rows of accepted mail", 15
            )
        except StackError as error:
            run.notes.append(f"killed anyway: {error}")
        await run.worker.kill()
    finally:
        run.smtp.gate.set()
    await run.worker.start()


async def worker_sigkill(run: Run) -> None:
    applied = 0
    for share in (0.10, 0.25, 0.40):
        # Some work done by each new worker before it is killed too.
        target = max(run.at_share(share), applied + run.at_share(0.06))
        await run.batch.wait_applied(target, DRIVE_TIMEOUT)
        run.fault_started()
        await kill_worker(run)
        applied = run.batch.stats.applied
    run.cleared()
    run.faults = f"{run.worker.kills} worker SIGKILLs + restarts"


# --- 2. Temporal server restart --------------------------------------------------------------


async def server_restart(run: Run) -> None:
    await run.batch.wait_applied(run.at_share(0.30), DRIVE_TIMEOUT)
    run.fault_started()
    await run.server.stop()
    stopped = time.monotonic()
    # The outage itself: long enough for the worker's polls and completions, and the staff
    # clients' updates, to fail and retry against a dead address.
    await asyncio.sleep(SERVER_DOWN_SECONDS)
    await run.server.start()
    run.cleared()
    run.faults = f"server stopped {time.monotonic() - stopped:.0f}s, restarted on its db"


# --- 3. SMTP outage then temporary failures --------------------------------------------------


async def smtp_outage(run: Run) -> None:
    smtp = run.smtp
    await run.batch.wait_applied(run.at_share(0.20), DRIVE_TIMEOUT)
    # The server goes down as it accepts a message: that sender gets its 250, then 421 to
    # its QUIT, as from any mail server being shut down (RFC 5321 3.8).
    smtp.on_delivery.append(smtp.stop_now)
    try:
        await wait_for(lambda: not smtp.running, "an email to shut the SMTP server down on", 30)
    except StackError:
        smtp.on_delivery.clear()
        run.notes.append("no email accepted within 30s: SMTP stopped at an arbitrary moment")
    run.fault_started()
    await smtp.stop()
    down = time.monotonic()
    await asyncio.sleep(SMTP_DOWN_SECONDS)  # the outage itself: connections refused
    down_for = time.monotonic() - down
    counts = []
    started = time.monotonic()
    for mode in (Mode.TEMPFAIL_RCPT, Mode.TEMPFAIL_DATA):
        smtp.mode = mode
        if not smtp.running:
            await smtp.start()
        before, since = smtp.replies.tempfail, time.monotonic()

        def enough(before: int = before, since: float = since) -> bool:
            return (
                smtp.replies.tempfail - before >= SMTP_TEMPFAIL_MIN_REPLIES
                and time.monotonic() - since >= SMTP_TEMPFAIL_MIN_SECONDS
            )

        try:
            await wait_for(enough, f"{SMTP_TEMPFAIL_MIN_REPLIES} sends answered {mode.value}", 60)
        except StackError as error:
            run.notes.append(str(error))
        counts.append(f"{mode.value} x{smtp.replies.tempfail - before}")
    smtp.mode = Mode.ACCEPT
    run.cleared()
    run.faults = (
        f"SMTP down {down_for:.0f}s, then {' + '.join(counts)} "
        f"over {time.monotonic() - started:.0f}s"
    )


# --- 4. one referrer's address refused for good -----------------------------------------------


async def smtp_refuse_one(run: Run) -> None:
    """The refusal is armed before submission and never lifted: nothing to recover from."""
    run.fault_started()
    run.faults = "550 on RCPT for 1 referrer address (see refusals)"


async def count_refusals(run: Run) -> None:
    run.faults = f"550 on RCPT for 1 address: {run.smtp.replies.rejected} refusals"


# --- 5. database unavailable -----------------------------------------------------------------


def _activity_failures(run: Run, since: int) -> int:
    return run.worker.log_text(since).count("Completing activity as failed")


async def database_outage(run: Run) -> None:
    """The database goes away as the SMTP server accepts a message: the moment the sender
    must write down that it sent it. PostgreSQL: the proxy is cut. SQLite: a writer holds
    the database exclusively (readers still read) past the worker's busy timeout. The
    fault lasts until the worker's database calls have been failing for a moment."""
    db, smtp = run.db, run.smtp
    await run.batch.wait_applied(run.at_share(0.30), DRIVE_TIMEOUT)
    since = run.worker.log_size()
    started = time.monotonic()
    smtp.on_delivery.append(lambda _session: db.make_unavailable())
    try:
        await wait_for(lambda: db.unavailable, "an email to cut the database on", 30)
    except StackError:
        smtp.on_delivery.clear()
        db.make_unavailable()
        run.notes.append("no email accepted within 30s: database cut at an arbitrary moment")
    run.fault_started()
    if smtp.hook_errors:
        raise StackError(f"could not take the database away: {smtp.hook_errors}")
    how = "PostgreSQL proxy cut" if db.proxy is not None else "SQLite BEGIN EXCLUSIVE"
    failing_since: list[float] = []

    def failing() -> bool:
        if not failing_since and _activity_failures(run, since) > 0:
            failing_since.append(time.monotonic())
        return (
            bool(failing_since)
            and time.monotonic() - failing_since[0] >= DB_FAILING_SECONDS
            and time.monotonic() - started >= DB_DOWN_MIN_SECONDS
        )

    try:
        await wait_for(failing, "the worker's database calls to fail", DB_DOWN_MAX_SECONDS)
    except StackError as error:
        run.notes.append(str(error))
    await db.make_available()
    run.cleared()
    cut = f", {db.proxy.connections_cut} connections dropped" if db.proxy is not None else ""
    run.faults = (
        f"{how} {time.monotonic() - started:.0f}s{cut}; "
        f"{_activity_failures(run, since)} activity attempts failed"
    )


# --- 6. every staff action delivered twice more ----------------------------------------------


async def duplicate_deliveries(run: Run) -> None:
    """The duplicates are sent by the driver with each action; the fault ends with them."""
    run.fault_started()


# --- 7. rolling deploy: v1 workers replaced one by one by v2 ---------------------------------


async def start_old_version(run: Run) -> None:
    """v1 as a first versioned install: its workers poll, then the operator makes it current
    (a version takes no task before). v1 is this checkout's worker as the release before was
    (faults.previous_release): its runs record the release before's markers."""
    for number in range(1, len(REPLACED_AT) + 1):
        await run.start_worker(
            f"{OLD_VERSION}-{number}", "faults.previous_release", REFERRALS_BUILD_ID=OLD_VERSION
        )
    await run.server.make_current(run.client, TASK_QUEUE, OLD_VERSION, VERSIONED_QUEUES)


async def rolling_deploy(run: Run) -> None:
    """Each v1 worker in turn: a v2 worker starts, then the v1 one gets SIGTERM (its in-flight
    activities finish). v2 is made current between the two replacements, as an operator would
    once a new worker is seen running: from then on every referral moves to v2 at its next
    task, while the last v1 worker still polls."""
    old = list(run.workers)
    for number, (worker, share) in enumerate(zip(old, REPLACED_AT, strict=True), 1):
        await run.batch.wait_applied(run.at_share(share), DRIVE_TIMEOUT)
        run.fault_started()
        await run.start_worker(f"{NEW_VERSION}-{number}", REFERRALS_BUILD_ID=NEW_VERSION)
        if not await worker.stop(GRACEFUL_STOP_SECONDS):
            run.notes.append(
                f"{worker.name} still running {GRACEFUL_STOP_SECONDS:.0f}s after SIGTERM"
            )
        if number == 1:
            await run.batch.wait_applied(run.at_share(CURRENT_AT), DRIVE_TIMEOUT)
            await run.server.make_current(run.client, TASK_QUEUE, NEW_VERSION, VERSIONED_QUEUES)
    run.cleared()
    run.faults = f"{len(old)} {OLD_VERSION} workers replaced by {NEW_VERSION} one by one"


def _patch_id(event: HistoryEvent) -> str:
    """The patch id of a patch marker."""
    details = event.marker_recorded_event_attributes.details["patch-data"].payloads[0].data
    return str(json.loads(details)["id"])


async def versions_seen(run: Run) -> None:
    """What each run's history says: the version that completed each workflow task, and the
    patch markers it recorded. A rolling deploy that moved no run from v1 code to v2 code
    would prove nothing, and fails the scenario."""
    moved = 0
    for referral in run.batch.referrals:
        history = await run.client.get_workflow_handle(referral.referral_id).fetch_history()
        builds = [
            event.workflow_task_completed_event_attributes.deployment_version.build_id
            for event in history.events
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
        ]
        markers = {
            _patch_id(event)
            for event in history.events
            if event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
            and event.marker_recorded_event_attributes.marker_name == "core_patch"
        }
        behind = bool(markers) and NEWEST_RELEASE not in markers
        if builds[:1] == [OLD_VERSION] and behind and builds[-1:] == [NEW_VERSION]:
            moved += 1
        since_switch = builds[builds.index(NEW_VERSION) :] if NEW_VERSION in builds else []
        if OLD_VERSION in since_switch:
            run.notes.append(f"{referral.referral_id}: a task on {OLD_VERSION} after {NEW_VERSION}")
    if moved == 0:
        raise StackError(f"no referral started on {OLD_VERSION} code and finished on {NEW_VERSION}")
    run.faults = (
        f"{OLD_VERSION} (before {NEWEST_RELEASE}) -> {NEW_VERSION}, {len(REPLACED_AT)} workers "
        f"1 by 1, current mid-way: {moved}/{len(run.batch.referrals)} runs moved"
    )


# --- 8. a webhook endpoint that takes connections and never answers --------------------------


async def start_with_blackhole(run: Run) -> None:
    """The endpoint is in the program's webhooks, subscribed to every event the referrals
    record, before the worker starts."""
    endpoint = BlackholeEndpoint("127.0.0.1", free_port())
    await endpoint.start()
    run.closing.push_async_callback(endpoint.stop)
    run.endpoint = endpoint
    run.program = write_program(PROGRAM, run.workdir / "program.yaml", endpoint.url)
    await run.start_worker()


async def webhook_blackhole(run: Run) -> None:
    """Never lifted: the fault lasts the whole run. A backlog of messages for the endpoint is
    enqueued as the referrals start, so hundreds of deliveries are pending throughout."""
    endpoint = run.endpoint
    assert endpoint is not None
    run.fault_started()
    referral_ids = [r.referral_id for r in run.batch.referrals]
    rows = await asyncio.to_thread(
        enqueue_backlog, run.db.engine, referral_ids, endpoint.url, BACKLOG_PER_REFERRAL
    )
    run.backlog = {row.id for row in rows}
    await start_deliveries(run.client, rows, TASK_QUEUE)
    await wait_for(lambda: endpoint.requests > 0, "a request to the webhook endpoint", 60)
    run.faults = f"webhook endpoint never answers, {len(rows)} messages of backlog"


def _webhook_counts(run: Run, url: str) -> tuple[Counter[str], WebhookEndpointRow | None]:
    """The endpoint's messages by status, and its circuit breaker."""
    with Session(run.db.engine) as session:
        statuses = Counter(
            session.exec(
                select(WebhookDeliveryRow.status).where(WebhookDeliveryRow.endpoint_url == url)
            ).all()
        )
        return statuses, session.get(WebhookEndpointRow, url)


async def count_webhooks(run: Run) -> None:
    """Messages are not counted lost for being undelivered (nothing can take them), but each
    must be in the outbox once; what the endpoint got is the circuit breaker's work."""
    endpoint = run.endpoint
    assert endpoint is not None and run.started_at is not None
    run.findings = await asyncio.to_thread(
        verify_outbox, run.batch, run.db.engine, endpoint.url, run.backlog
    )
    statuses, breaker = await asyncio.to_thread(_webhook_counts, run, endpoint.url)
    if statuses["delivered"]:
        run.notes.append(f"{statuses['delivered']} webhook messages recorded as delivered")
    seconds = (datetime.now(UTC) - run.started_at).total_seconds()
    circuit = "open" if breaker is not None and breaker.open_until is not None else "closed"
    run.faults = (
        f"endpoint never answers: {statuses['pending']}/{sum(statuses.values())} msgs pending "
        f"({len(run.backlog)} backlog), {endpoint.requests} requests in {seconds:.0f}s, "
        f"circuit {circuit}"
    )


SCENARIOS = [
    Scenario("worker-sigkill", worker_sigkill),
    Scenario("server-restart", server_restart),
    Scenario("smtp-outage", smtp_outage),
    Scenario(
        "smtp-550", smtp_refuse_one, refused_referrer=REFUSED_REFERRER, conclude=count_refusals
    ),
    Scenario("database-outage", database_outage),
    Scenario("duplicate-actions", duplicate_deliveries, duplicates=True),
    Scenario("rolling-deploy", rolling_deploy, setup=start_old_version, conclude=versions_seen),
    Scenario(
        "webhook-blackhole",
        webhook_blackhole,
        setup=start_with_blackhole,
        conclude=count_webhooks,
    ),
]


# --- the common run --------------------------------------------------------------------------


def _say(name: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {message}", file=sys.stderr, flush=True)


async def run_scenario(
    scenario: Scenario,
    backend: Backend,
    children: Children,
    root: Path,
    count: int,
    seed: int,
) -> Outcome:
    started = time.monotonic()
    workdir = root / scenario.name
    workdir.mkdir(parents=True)
    # Payout closes a referral at once: the suite checks how each one ended, not the clawback
    # window after payout (tests/workflows/test_clawback.py does, on the time-skipping server).
    rules = load_program(PROGRAM).model_copy(update={"clawback": ClawbackRules(days=0)})
    db = ScenarioDatabase(backend, workdir)
    smtp = RecordingSmtpServer("127.0.0.1", free_port())
    server = TemporalServer(children, workdir)
    worker_env = {
        "TEMPORAL_ADDRESS": server.address,
        "TEMPORAL_NAMESPACE": NAMESPACE,
        "REFERRALS_TASK_QUEUE": TASK_QUEUE,
        "REFERRALS_DATABASE_URL": db.worker_url,
        "REFERRALS_SMTP_HOST": smtp.host,
        "REFERRALS_SMTP_PORT": str(smtp.port),
        "REFERRALS_SMTP_USER": "",
        "REFERRALS_SMTP_PASSWORD": "",
        "REFERRALS_SMTP_STARTTLS": "",
        "REFERRALS_SECRET_KEY": SECRET,
        "PYTHONUNBUFFERED": "1",
    }
    # What the driver's intake and the CLI code it reuses run with.
    intake = Settings.from_env(
        {
            **os.environ,
            "REFERRALS_DATABASE_URL": db.url,
            "TEMPORAL_ADDRESS": server.address,
            "REFERRALS_TASK_QUEUE": TASK_QUEUE,
            "REFERRALS_SECRET_KEY": SECRET,
        }
    )
    workers: list[Worker] = []
    outcome = Outcome(scenario.name, count, "", 0, 0, None, 0.0)
    try:
        async with contextlib.AsyncExitStack() as closing:
            if scenario.refused_referrer is not None:
                smtp.rejected_addresses.add(scenario.refused_referrer.lower())
            _say(scenario.name, f"starting the stack ({backend.name})")
            await db.start()
            await smtp.start()
            await server.start()
            client = await connect(server.address)
            batch = Batch(client, db.engine, rules, intake, scenario.name, seed)
            run = Run(
                scenario.name, workdir, rules, db, smtp, server, children, worker_env, workers,
                batch, closing,
            )  # fmt: skip
            await scenario.setup(run)
            # The intake records each submission, and so enqueues its webhook messages, as
            # the web app does: for the endpoints of the program the workers run with.
            configure_webhooks(run.program, intake.webhook_retry)
            _say(scenario.name, f"submitting {count} referrals")
            await batch.submit(count, scenario.refused_referrer)
            driving = asyncio.create_task(batch.drive(duplicates=scenario.duplicates))
            injecting = asyncio.create_task(scenario.inject(run))
            await _both(driving, injecting, scenario.name)
            if scenario.duplicates:
                run.cleared()  # the last duplicate delivered
                stats = batch.stats
                run.faults = (
                    f"{stats.duplicates_sent} duplicates (update resent + signal, same "
                    f"request id; {stats.moot} after close)"
                )
            _say(scenario.name, f"fault injected: {run.faults}; waiting for every referral")
            await batch.wait_final(FINAL_TIMEOUT)
            for worker in workers:
                worker.check_alive()
            for worker in workers:  # no late attempt can deliver anything after the count
                await worker.stop()
            await scenario.conclude(run)
            findings = await asyncio.to_thread(
                verify,
                batch,
                db.engine,
                smtp,
                rules,
                frozenset(smtp.rejected_addresses),
            )
        outcome.faults = run.faults
        outcome.lost = findings.lost + run.findings.lost
        outcome.duplicated = findings.duplicated + run.findings.duplicated
        outcome.problems = (
            findings.problems + run.findings.problems + [f"NOTE {n}" for n in run.notes]
        )
        outcome.recovery_seconds = _recovery(run)
        outcome.staff_retries = batch.stats.retries
        outcome.updates_in_fault = run.updates_in_fault()
        outcome.updates = [u.seconds for u in batch.updates]
    except Exception as error:  # a crashed scenario is reported, and fails the run
        outcome.crashed = f"{type(error).__name__}: {error}"
        outcome.problems.append(f"CRASH {outcome.crashed}")
        for worker in workers:
            tail = worker.log_text(max(0, worker.log_size() - 1500))
            if tail:
                outcome.problems.append(f"{worker.name} log tail:\n{tail}")
    finally:
        for worker in workers:  # stopped already when all went well; a failed run ends here
            await worker.kill()
        await server.stop()
        await smtp.stop()
        await db.close()
    outcome.seconds = time.monotonic() - started
    return outcome


async def _both(driving: asyncio.Task[None], injecting: asyncio.Task[None], name: str) -> None:
    """Drive and inject together; whichever fails first stops the other, with its reason."""
    try:
        done, _ = await asyncio.wait(
            {driving, injecting}, timeout=DRIVE_TIMEOUT, return_when=asyncio.FIRST_EXCEPTION
        )
        for task in done:
            task.result()
        if driving not in done or injecting not in done:
            raise TimeoutError(f"{name}: driving the batch took longer than {DRIVE_TIMEOUT:.0f}s")
    finally:
        for task in (driving, injecting):
            if not task.done():
                task.cancel()
        await asyncio.gather(driving, injecting, return_exceptions=True)


def _recovery(run: Run) -> float | None:
    """Seconds from the fault being cleared to the last referral closing (0 if every
    referral was done before)."""
    if run.cleared_at is None:
        return None
    closed = [r.closed_at for r in run.batch.referrals if r.closed_at is not None]
    if not closed:
        return None
    return max(0.0, (max(closed) - run.cleared_at).total_seconds())
