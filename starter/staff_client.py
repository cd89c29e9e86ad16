"""The staff's one way into a referral's workflow, shared by the CLI, the web desk and the
fault driver: a staff action through the workflow's `act` update, called by reference
(`ReferralWorkflow.act`), so a renamed handler fails at lint, not at run time."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import cast

from sqlalchemy.engine import Engine
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.queries import load_referral
from activities.schema import open_database
from core.actor_assertions import SigningKey
from starter.actions import Refused
from workflows.models.referral import ActResult, ReferralState, StaffAction
from workflows.referral import ReferralWorkflow


class NotAnswered(Refused):
    """No answer within the timeout: the action may still apply when a worker takes it, and
    sending the same request (same request id) again is safe. `accepted`: a worker took it,
    but it was not recorded in time."""

    def __init__(self, message: str, *, seconds: float, accepted: bool) -> None:
        super().__init__(message)
        self.seconds = seconds
        self.accepted = accepted


async def send_action(
    client: Client,
    referral_id: str,
    request: StaffAction,
    timeout: float,
    database_url: str | Engine,
    signer: SigningKey | None,
) -> ActResult:
    """Apply one staff action through the `act` update, its request id as the update id, so
    a retried request is applied once. Waits at most `timeout` seconds in all. A referral
    Temporal does not know is looked up in the database at `database_url` (or that engine).
    `signer`: this surface's key, which asserts that the request's actor is who it
    authenticated; without one the action goes unsigned (money actions are then refused).

    Refused: `Refused` with the workflow's one-line reason (or the referral unknown or
    closed); `NotAnswered` when no worker answered, or one did but the action was not
    recorded, within the timeout (its message speaks the CLI's words)."""
    if signer is not None:  # signed at each attempt: a retry is a fresh assertion
        request = signer.sign(referral_id, request)
    handle = client.get_workflow_handle(referral_id)
    retry = f"repeat the command with --request-id {request.request_id} to retry it safely"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    accepted = False
    try:
        # The deadline bounds the whole call: the server answers an update's long poll empty
        # after about 20 s, and the SDK then polls again, past any RPC timeout.
        async with asyncio.timeout_at(deadline):
            update = await handle.start_update(
                ReferralWorkflow.act,
                request,
                id=request.request_id,
                wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                rpc_timeout=timedelta(seconds=timeout),
            )
            accepted = True
            left = max(0.1, deadline - loop.time())
            # mypy reads an async handler's result as its coroutine (the SDK's typing)
            answer = await update.result(rpc_timeout=timedelta(seconds=left))
            result = cast(ActResult | ReferralState, answer)
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        raise Refused(getattr(cause, "message", None) or str(cause or error)) from error
    except (WorkflowUpdateRPCTimeoutOrCancelledError, TimeoutError):
        if not accepted:
            raise NotAnswered(
                f"no worker answered within {timeout:g}s (is a worker running?); the action may "
                f"still apply when one does: {retry}",
                seconds=timeout,
                accepted=False,
            ) from None
        raise NotAnswered(
            f"{request.action.value} was accepted but not yet recorded after {timeout:g}s "
            f"(is the database reachable?); {retry}",
            seconds=timeout,
            accepted=True,
        ) from None
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        engine = open_database(database_url) if isinstance(database_url, str) else database_url
        state = await asyncio.to_thread(load_referral, engine, referral_id)
        if state is None:
            raise Refused(f"unknown referral {referral_id}") from error
        raise Refused(f"referral {referral_id} is closed ({state.stage.value})") from error
    if isinstance(result, ActResult):
        return result
    # A run from before slim payloads answers with the whole referral.
    return ActResult(referral_id=result.referral_id, stage=result.stage, revision=result.revision)
