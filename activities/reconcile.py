"""Reconcile the system of record with Temporal, and repair what can be repaired.

Run by `referrals reconcile` and nightly by a Temporal Schedule (ReconcileWorkflow).
Temporal is the authority on whether a referral's workflow runs; the database is
the authority on everything else. Repairs:

- a referral the database holds as open whose workflow was terminated, failed, was
  cancelled before business cancellation existed, or is gone: marked `cancelled` (actor
  `system`), a pending commission voided, its prospect released;
- a referral whose workflow completed but whose last write is missing: its final state,
  taken from the workflow's result, is recorded;
- a prospect claim whose referral is closed or whose workflow is gone: released;
- a running referral started before the system of record (no database row): sent the
  `upgrade` signal, which carries it over to a run that records itself;
- a running referral started before the newest release (its runs hold no marker of it,
  `TemporalChangeVersion`): sent `upgrade` too, which carries it over to a run with every
  behaviour of the workers' release, at its next quiet point (so a security rule such as
  0.8's signed actors does not wait months for it to close);
- a referral started before the system of record and closed since (no database row):
  recorded from its workflow's result or, when it did not complete, its last state;
- a webhook delivery still pending that no workflow delivers: its delivery started.

As the nightly activity it heartbeats its progress (`Progress`: the phase and the last id it
finished, in id order), so a lost worker shows within the heartbeat timeout and a retry resumes
after the last heartbeat instead of starting over; every repair is idempotent, so redoing the
few handled since that heartbeat is harmless. From the CLI it runs straight through.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowQueryFailedError,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.db import ProspectClaim, ReferralRow, as_utc
from activities.ledger import release_claim, save_commission
from activities.queries import load_referral
from activities.records import save_referral
from activities.webhooks import start_stalled_deliveries
from workflows.features import RELEASES
from workflows.models.ledger import CommissionRecord, CommissionStatus
from workflows.models.referral import (
    HistoryEntry,
    ReconcileReport,
    ReferralRecord,
    ReferralState,
    Stage,
)
from workflows.reconcile import RECONCILE
from workflows.referral import ReferralWorkflow

# A referral or claim younger than this may have a workflow that is only starting.
GRACE = timedelta(minutes=2)
QUERY_TIMEOUT = timedelta(seconds=10)
RUNNING = "WorkflowType = 'ReferralWorkflow' AND ExecutionStatus = 'Running'"
NEWEST_RELEASE = RELEASES[0][0]
CLOSED = (
    "WorkflowType = 'ReferralWorkflow' AND ExecutionStatus != 'Running' "
    "AND ExecutionStatus != 'ContinuedAsNew'"
)


PHASES = ("open", "claims", "upgrade", "closed", "webhooks")
# A heartbeat after this many referrals or claims: each costs at most a describe or a query
# (QUERY_TIMEOUT), so ten fit well within the nightly workflow's heartbeat timeout.
HEARTBEAT_EVERY = 10


class Progress(BaseModel):
    """What a heartbeat says: the phase, the last referral id (in `claims`, domain) finished
    in it, and the counts a resumed report carries on. Nothing else: no report, no person."""

    phase: str = PHASES[0]
    after: str = ""
    checked: int = 0
    repairs: int = 0


class _Run:
    """One attempt's way through the phases. In an activity it heartbeats its progress and
    starts after the progress its previous attempt last heartbeated."""

    def __init__(self) -> None:
        self._in_activity = activity.in_activity()
        details = activity.info().heartbeat_details if self._in_activity else []
        self.progress = Progress.model_validate(details[0]) if details else Progress()
        self.report = ReconcileReport()
        if details:
            where = self.progress.after or "the start"
            self.report.resumed = (
                f"resumed after {where} of the {self.progress.phase} phase; the "
                f"{self.progress.repairs} repairs before it are in earlier attempts' logs"
            )
        self._since_heartbeat = 0

    def enter(self, phase: str) -> str | None:
        """The id to start `phase` after ("" for all of it); None when an earlier attempt
        finished the phase."""
        if PHASES.index(phase) < PHASES.index(self.progress.phase):
            return None
        if phase != self.progress.phase:
            self.progress = self.progress.model_copy(update={"phase": phase, "after": ""})
        self._heartbeat()
        return self.progress.after

    def repaired(self, line: str) -> None:
        self.report.fixed.append(line)
        self.progress.repairs += 1
        if self._in_activity:  # as it happens: a failed attempt's repairs are logged too
            activity.logger.info("reconcile: %s", line)

    def done(self, key: str) -> None:
        """`key` is handled, its repair (if any) made: a retry may start after it."""
        self.progress.after = key
        self._since_heartbeat += 1
        if self._since_heartbeat >= HEARTBEAT_EVERY:
            self._heartbeat()

    def _heartbeat(self) -> None:
        self._since_heartbeat = 0
        if self._in_activity:  # a copy: the SDK encodes the details later
            activity.heartbeat(self.progress.model_dump())


async def reconcile(client: Client, engine: Engine, task_queue: str) -> ReconcileReport:
    """`task_queue`: where stalled webhook deliveries are started."""
    now = datetime.now(UTC)
    run = _Run()
    running = {wf.id async for wf in client.list_workflows(RUNNING, rpc_timeout=QUERY_TIMEOUT)}
    if (after := run.enter("open")) is not None:
        for referral_id, submitted_at in await asyncio.to_thread(_open_referrals, engine, after):
            line = await _check_open(client, engine, running, referral_id, submitted_at, now)
            if line is not None:
                run.repaired(line)
            run.progress.checked += 1
            run.done(referral_id)
    if (after := run.enter("claims")) is not None:
        for domain, referral_id, claimed_at in await asyncio.to_thread(_claims, engine, after):
            if await _claim_is_stale(client, running, referral_id, claimed_at, now):
                await asyncio.to_thread(release_claim, engine, domain, referral_id)
                run.repaired(f"{domain}: released the claim of {referral_id} (not running)")
            run.done(domain)
    if (after := run.enter("upgrade")) is not None:
        recorded = await asyncio.to_thread(_known, engine, running)
        # Not the youngest: a run's marker reaches visibility a moment after it starts.
        started_before = (now - GRACE).isoformat()
        behind = {
            wf.id
            async for wf in client.list_workflows(
                f"{RUNNING} AND TemporalChangeVersion NOT IN ('{NEWEST_RELEASE}') "
                f"AND StartTime < '{started_before}'",
                rpc_timeout=QUERY_TIMEOUT,
            )
        }
        unrecorded = running - recorded
        for referral_id in sorted(rid for rid in unrecorded | behind if rid > after):
            await client.get_workflow_handle(referral_id).signal(
                ReferralWorkflow.upgrade, rpc_timeout=QUERY_TIMEOUT
            )
            started = "the system of record" if referral_id in unrecorded else NEWEST_RELEASE
            run.repaired(f"{referral_id}: started before {started}; upgrade requested")
            run.done(referral_id)
    if (after := run.enter("closed")) is not None:
        closed = {
            wf.id: wf.status
            async for wf in client.list_workflows(CLOSED, rpc_timeout=QUERY_TIMEOUT)
        }
        recorded = await asyncio.to_thread(_known, engine, set(closed))
        for referral_id in sorted(rid for rid in set(closed) - recorded if rid > after):
            run.repaired(await _record_closed(client, engine, referral_id, closed[referral_id]))
            run.done(referral_id)
    if run.enter("webhooks") is not None:
        for line in await start_stalled_deliveries(client, engine, task_queue, GRACE):
            run.repaired(line)
    run.report.checked = run.progress.checked
    return run.report


async def _check_open(
    client: Client,
    engine: Engine,
    running: set[str],
    referral_id: str,
    submitted_at: datetime,
    now: datetime,
) -> str | None:
    """An open referral: its repair's line, or None when its workflow runs (or may be
    only starting)."""
    if referral_id in running:
        return None  # visibility lags: what it does not list as running is described
    status = await _status(client, referral_id)
    if status == WorkflowExecutionStatus.RUNNING or (status is None and now - submitted_at < GRACE):
        return None
    if status == WorkflowExecutionStatus.COMPLETED:
        handle = client.get_workflow_handle(referral_id, result_type=ReferralState)
        final = await handle.result(rpc_timeout=QUERY_TIMEOUT)
        record = ReferralRecord(
            state=final.model_copy(update={"history": []}), events=final.history
        )
        await asyncio.to_thread(save_referral, engine, record)
        return f"{referral_id}: recorded its final stage {final.stage.value}"
    what = f"workflow {status.name.lower()}" if status else "workflow not found"
    return await asyncio.to_thread(_close_lost, engine, referral_id, what, now)


async def _claim_is_stale(
    client: Client, running: set[str], referral_id: str, claimed_at: datetime, now: datetime
) -> bool:
    if referral_id in running:
        return False
    status = await _status(client, referral_id)
    return not (
        status == WorkflowExecutionStatus.RUNNING or (status is None and now - claimed_at < GRACE)
    )


async def _record_closed(
    client: Client, engine: Engine, referral_id: str, status: WorkflowExecutionStatus | None
) -> str:
    """A referral that closed before it ever wrote to the database."""
    handle = client.get_workflow_handle(referral_id, result_type=ReferralState)
    try:
        if status == WorkflowExecutionStatus.COMPLETED:
            final = await handle.result(rpc_timeout=QUERY_TIMEOUT)
        else:  # a query replays the closed run on a worker of its task queue
            final = await handle.query(ReferralWorkflow.state, rpc_timeout=QUERY_TIMEOUT)
    except (RPCError, WorkflowQueryFailedError, WorkflowFailureError) as error:
        return f"{referral_id}: closed before the system of record; not recorded ({error})"
    record = ReferralRecord(state=final.model_copy(update={"history": []}), events=final.history)
    await asyncio.to_thread(save_referral, engine, record)
    line = f"{referral_id}: closed before the system of record; recorded ({final.stage.value})"
    if status != WorkflowExecutionStatus.COMPLETED and not final.is_terminal:
        what = f"workflow {status.name.lower()}" if status else "workflow not found"
        line = await asyncio.to_thread(_close_lost, engine, referral_id, what, datetime.now(UTC))
    return line


async def _status(client: Client, referral_id: str) -> WorkflowExecutionStatus | None:
    """The latest run's status; None when Temporal has no such workflow."""
    try:
        handle = client.get_workflow_handle(referral_id)
        return (await handle.describe(rpc_timeout=QUERY_TIMEOUT)).status
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


def _open_referrals(engine: Engine, after: str) -> list[tuple[str, datetime]]:
    """The open referrals whose id sorts after `after`, in id order."""
    with Session(engine) as session:
        rows = session.exec(
            select(ReferralRow.referral_id, ReferralRow.submitted_at)
            .where(col(ReferralRow.closed_at).is_(None), col(ReferralRow.referral_id) > after)
            .order_by(col(ReferralRow.referral_id))
        ).all()
    return [(referral_id, as_utc(submitted)) for referral_id, submitted in rows]


def _claims(engine: Engine, after: str) -> list[tuple[str, str, datetime]]:
    """The claims whose domain sorts after `after`, in domain order."""
    with Session(engine) as session:
        claims = session.exec(
            select(ProspectClaim)
            .where(col(ProspectClaim.domain) > after)
            .order_by(col(ProspectClaim.domain))
        ).all()
    return [(c.domain, c.referral_id, as_utc(c.claimed_at)) for c in claims]


def _known(engine: Engine, referral_ids: set[str]) -> set[str]:
    """Those of `referral_ids` the database has (asked 500 at a time)."""
    ids = sorted(referral_ids)
    found: set[str] = set()
    with Session(engine) as session:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found.update(
                session.exec(
                    select(ReferralRow.referral_id).where(col(ReferralRow.referral_id).in_(chunk))
                ).all()
            )
    return found


def _close_lost(engine: Engine, referral_id: str, what: str, now: datetime) -> str:
    """An open referral whose workflow is gone: a paid one closes as paid (its clawback
    window ends early: the commission was paid, it still counts as won and paid); any other
    is cancelled."""
    state = load_referral(engine, referral_id)
    assert state is not None
    if state.stage is Stage.COMMISSION_PAID:
        return _close_paid(engine, state, what, now)
    return _mark_cancelled(engine, state, what, now)


def _close_paid(engine: Engine, state: ReferralState, what: str, now: datetime) -> str:
    note = (
        f"{what} in Temporal during the clawback window; the window closed early, the "
        "commission stays paid"
    )
    state.clawback_closed = True
    state.closed_at = now
    state.revision += 1
    entry = HistoryEntry(
        at=now,
        action="clawback_window_closed",
        actor="system",
        note=note,
        outcome="system",
        seq=state.next_seq(),
    )
    save_referral(
        engine, ReferralRecord(state=state.model_copy(update={"history": []}), events=[entry])
    )
    release_claim(engine, state.prospect_domain, state.referral_id)
    return f"{state.referral_id}: {note}"


def _mark_cancelled(engine: Engine, state: ReferralState, what: str, now: datetime) -> str:
    referral_id = state.referral_id
    note = f"{what} in Temporal while the referral was {state.stage.value}; marked cancelled"
    state.stage = Stage.CANCELLED
    state.closed_at = now
    state.revision += 1
    commission = state.commission
    if commission is not None and commission.status is CommissionStatus.PENDING:
        commission.status = CommissionStatus.VOID
        note += "; commission void"
    elif commission is not None and commission.status is CommissionStatus.PAYABLE:
        note += "; the commission stays payable: pay it out or void it by hand"
    entry = HistoryEntry(
        at=now, action="cancel", actor="system", note=note, outcome="system", seq=state.next_seq()
    )
    save_referral(
        engine, ReferralRecord(state=state.model_copy(update={"history": []}), events=[entry])
    )
    if commission is not None and commission.status is CommissionStatus.VOID:
        save_commission(
            engine,
            CommissionRecord.after(
                state,
                event="cancel",
                event_key=f"{referral_id}/reconcile-cancel",
                at=now,
                actor="system",
                note=note,
            ),
        )
    release_claim(engine, state.prospect_domain, referral_id)
    return f"{referral_id}: {note}"


class ReconcileActivities:
    def __init__(self, client: Client, engine: Engine, task_queue: str) -> None:
        self._client = client
        self._engine = engine
        self._task_queue = task_queue

    @activity.defn(name=RECONCILE)
    async def reconcile(self) -> ReconcileReport:
        """The nightly reconciliation, as an activity of the worker: it logs each repair as
        it makes it, and a retry resumes after the last heartbeat."""
        return await reconcile(self._client, self._engine, self._task_queue)
