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
- a referral started before the system of record and closed since (no database row):
  recorded from its workflow's result or, when it did not complete, its last state;
- a webhook delivery still pending that no workflow delivers: its delivery started.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

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
from activities.records import load_referral, save_referral
from activities.webhooks import start_stalled_deliveries
from workflows.models import (
    CommissionRecord,
    CommissionStatus,
    HistoryEntry,
    ReconcileReport,
    ReferralRecord,
    ReferralState,
    Stage,
)

# A referral or claim younger than this may have a workflow that is only starting.
GRACE = timedelta(minutes=2)
QUERY_TIMEOUT = timedelta(seconds=10)
RUNNING = "WorkflowType = 'ReferralWorkflow' AND ExecutionStatus = 'Running'"
CLOSED = (
    "WorkflowType = 'ReferralWorkflow' AND ExecutionStatus != 'Running' "
    "AND ExecutionStatus != 'ContinuedAsNew'"
)


async def reconcile(client: Client, engine: Engine, task_queue: str) -> ReconcileReport:
    """`task_queue`: where stalled webhook deliveries are started."""
    now = datetime.now(UTC)
    report = ReconcileReport()
    running = {wf.id async for wf in client.list_workflows(RUNNING)}
    open_rows = await asyncio.to_thread(_open_referrals, engine)
    for referral_id, submitted_at in open_rows:
        if referral_id in running:
            continue  # visibility lags: what it does not list as running is described
        status = await _status(client, referral_id)
        if status == WorkflowExecutionStatus.RUNNING or (
            status is None and now - submitted_at < GRACE
        ):
            continue
        if status == WorkflowExecutionStatus.COMPLETED:
            handle = client.get_workflow_handle(referral_id, result_type=ReferralState)
            final = await handle.result()
            record = ReferralRecord(
                state=final.model_copy(update={"history": []}), events=final.history
            )
            await asyncio.to_thread(save_referral, engine, record)
            report.fixed.append(f"{referral_id}: recorded its final stage {final.stage.value}")
            continue
        what = f"workflow {status.name.lower()}" if status else "workflow not found"
        line = await asyncio.to_thread(_close_lost, engine, referral_id, what, now)
        report.fixed.append(line)
    for domain, referral_id, claimed_at in await asyncio.to_thread(_claims, engine):
        if referral_id in running:
            continue
        status = await _status(client, referral_id)
        if status == WorkflowExecutionStatus.RUNNING or (
            status is None and now - claimed_at < GRACE
        ):
            continue
        await asyncio.to_thread(release_claim, engine, domain, referral_id)
        report.fixed.append(f"{domain}: released the claim of {referral_id} (not running)")
    recorded = await asyncio.to_thread(_known, engine, running)
    for referral_id in sorted(running - recorded):
        await client.get_workflow_handle(referral_id).signal("upgrade")
        report.fixed.append(
            f"{referral_id}: started before the system of record; upgrade requested"
        )
    closed = {wf.id: wf.status async for wf in client.list_workflows(CLOSED)}
    recorded = await asyncio.to_thread(_known, engine, set(closed))
    for referral_id in sorted(set(closed) - recorded):
        report.fixed.append(await _record_closed(client, engine, referral_id, closed[referral_id]))
    report.fixed.extend(await start_stalled_deliveries(client, engine, task_queue, GRACE))
    report.checked = len(open_rows)
    return report


async def _record_closed(
    client: Client, engine: Engine, referral_id: str, status: WorkflowExecutionStatus | None
) -> str:
    """A referral that closed before it ever wrote to the database."""
    handle = client.get_workflow_handle(referral_id, result_type=ReferralState)
    try:
        if status == WorkflowExecutionStatus.COMPLETED:
            final = await handle.result()
        else:  # a query replays the closed run on a worker of its task queue
            final = await handle.query(
                "state", result_type=ReferralState, rpc_timeout=QUERY_TIMEOUT
            )
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


def _open_referrals(engine: Engine) -> list[tuple[str, datetime]]:
    with Session(engine) as session:
        rows = session.exec(
            select(ReferralRow.referral_id, ReferralRow.submitted_at).where(
                col(ReferralRow.closed_at).is_(None)
            )
        ).all()
    return [(referral_id, as_utc(submitted)) for referral_id, submitted in rows]


def _claims(engine: Engine) -> list[tuple[str, str, datetime]]:
    with Session(engine) as session:
        claims = session.exec(select(ProspectClaim)).all()
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

    @activity.defn(name="reconcile")
    async def reconcile(self) -> ReconcileReport:
        """The nightly reconciliation, as an activity of the worker."""
        report = await reconcile(self._client, self._engine, self._task_queue)
        for line in report.fixed:
            activity.logger.info("reconcile: %s", line)
        return report
