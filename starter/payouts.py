"""Starting a payout run and moving it: what the CLI (and later the staff desk) call
(docs/payouts.md)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy.engine import Engine
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.payouts import load_run, start_run
from core.actor_assertions import SigningKey
from starter.actions import Refused
from workflows.models.program import ProgramRules
from workflows.payout_run import PayoutRunWorkflow, run_workflow_id
from workflows.payouts import RunRequest, RunState


def new_run_id(currency: str, cutoff: date) -> str:
    """Readable and unique: the currency, the cutoff, and a short random part."""
    return f"{currency.lower()}-{cutoff.isoformat()}-{uuid.uuid4().hex[:6]}"


async def prepare_run(
    client: Client,
    rules: ProgramRules,
    queue: str,
    currency: str,
    cutoff: date,
    actor: str,
    timeout: float,
) -> RunState:
    """Start a run and wait (at most `timeout` seconds) until it has collected its items."""
    code = currency.strip().upper()
    run_id = new_run_id(code, cutoff)
    handle = await start_run(client, rules.payouts, queue, run_id, code, cutoff, actor)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        state = await handle.query(PayoutRunWorkflow.state, rpc_timeout=timedelta(seconds=10))
        if state.revision > 0:
            return state
        if loop.time() > deadline:
            raise Refused(
                f"run {run_id} was started but has not collected its items after {timeout:g}s "
                "(is a worker running?): see `referrals payouts show`"
            )
        await asyncio.sleep(0.2)


async def act_on_run(
    client: Client,
    run_id: str,
    request: RunRequest,
    timeout: float,
    signer: SigningKey | None,
    engine: Engine | None = None,
) -> RunState:
    """One update to a run, its request id as the update id (a repeat applies once), signed
    when this surface knows who acts. `engine`: where to read why a run Temporal no longer
    runs is closed."""
    workflow_id = run_workflow_id(run_id)
    if signer is not None:
        request = signer.sign(workflow_id, request)
    handle = client.get_workflow_handle(workflow_id)
    try:
        async with asyncio.timeout(timeout):
            return await handle.execute_update(
                PayoutRunWorkflow.act,
                request,
                id=request.request_id,
                rpc_timeout=timedelta(seconds=timeout),
            )
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        raise Refused(getattr(cause, "message", None) or str(cause or error)) from error
    except TimeoutError:
        raise Refused(
            f"no worker answered within {timeout:g}s; repeat with --request-id "
            f"{request.request_id} to retry it safely"
        ) from None
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        closed = load_run(engine, run_id) if engine is not None else None
        if closed is None:
            raise Refused(f"no payout run {run_id} is open") from None
        raise Refused(f"run {run_id} is {closed.status}: it takes no more actions") from None


def new_request_id(given: str | None) -> str:
    return given or f"run-{uuid.uuid4().hex}"


def local_today(rules: ProgramRules, now: datetime) -> date:
    return now.astimezone(ZoneInfo(rules.calendar.timezone)).date()
