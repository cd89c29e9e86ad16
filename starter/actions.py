"""A staff action, however it arrives (the CLI, the staff web desk): the values each action
takes, how they are read and checked before anything is sent, and `send_action`, which
applies it through the referral workflow's `act` update.

Both ways in build their `StaffAction` with `staff_action` from the table `ACTION_FIELDS`
(the CLI's options are made from it), so a value the CLI refuses the desk refuses too, and
both send it with `send_action`, so a retried request (same request id) is applied once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum

from sqlalchemy.engine import Engine
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.records import load_referral
from activities.schema import open_database
from core.actor_assertions import SigningKey
from workflows.models import Action, ActResult, StaffAction

# How long a staff action may wait for a worker, unless REFERRALS_CLI_TIMEOUT says otherwise.
DEFAULT_TIMEOUT_SECONDS = 30.0


class Refused(Exception):
    """The action (or command) could not be done; the message is the one line the user sees."""


class Problem(StrEnum):
    """What is wrong with a value, before anything is sent."""

    REQUIRED = "required"
    DECIMAL = "decimal"
    FINITE = "finite"
    INTEGER = "integer"


class InvalidValue(Refused):
    """One of the action's values cannot be read: `field` names it, `problem` says why."""

    def __init__(self, field: str, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.problem = problem


class NotAnswered(Refused):
    """No answer within the timeout: the action may still apply when a worker takes it, and
    sending the same request (same request id) again is safe. `accepted`: a worker took it,
    but it was not recorded in time."""

    def __init__(self, message: str, *, seconds: float, accepted: bool) -> None:
        super().__init__(message)
        self.seconds = seconds
        self.accepted = accepted


class Kind(StrEnum):
    TEXT = "text"
    DECIMAL = "decimal"
    INTEGER = "integer"


@dataclass(frozen=True)
class Field:
    """One value an action takes: its `StaffAction` field (and form field) name."""

    name: str
    required: bool = False
    kind: Kind = Kind.TEXT
    help: str | None = None  # the CLI option's

    @property
    def option(self) -> str:
        """The CLI's option: `--payment-terms-days`."""
        return "--" + self.name.replace("_", "-")


NOTE = Field("note")
REASON = Field("reason", required=True)

# Every action, in the CLI's order, with what it does (the CLI's help) and its values.
ACTION_FIELDS: dict[Action, tuple[str, tuple[Field, ...]]] = {
    Action.CONTACTED: ("the referrer has been contacted", (NOTE,)),
    Action.ACCEPT: ("accept the referral and hand it to sales", (NOTE,)),
    Action.APPROVE: ("approve the opportunity: it enters the sales cycle", (NOTE,)),
    Action.DECLINE: ("decline the referral", (REASON,)),
    Action.REJECT: ("reject the opportunity", (REASON,)),
    Action.LOST: ("the deal is lost", (REASON,)),
    Action.CANCEL: ("cancel the referral", (REASON,)),
    Action.WON: (
        "the deal is won: record the first-year subscription value",
        (
            Field("amount", True, Kind.DECIMAL, "first-year subscription value"),
            Field("currency", True),
            Field("payment_terms_days", kind=Kind.INTEGER),
        ),
    ),
    Action.PAYMENT: (
        "record a customer payment",
        (
            Field("amount", True, Kind.DECIMAL),
            Field("reference", True, help="the payment's unique reference"),
        ),
    ),
    Action.PAYOUT: (
        "mark the commission paid to the referrer",
        (Field("reference", True, help="the payout's reference"),),
    ),
    Action.EXTEND: (
        "extend the prospect's protection",
        (
            Field("days", True, Kind.INTEGER, "days the protection gains (1 to 365)"),
            Field("reason", True, help="why; the history keeps it"),
        ),
    ),
    Action.REFUND: (
        "record a customer refund or credit note (claws back)",
        (
            Field("amount", True, Kind.DECIMAL, "refunded, in the deal's currency"),
            Field("reference", True, help="the refund's unique reference"),
            Field("reason", True, help="why; the clawback line keeps it"),
        ),
    ),
}


def fields_of(action: Action) -> tuple[Field, ...]:
    return ACTION_FIELDS[action][1]


def decimal_value(text: str, field: Field) -> Decimal:
    """`text` as a finite decimal; refused naming the field's CLI option (`--amount`)."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise InvalidValue(
            field.name,
            Problem.DECIMAL,
            f"{field.option} must be a decimal number like 1234.50, not {text!r}",
        ) from None
    if not value.is_finite():
        raise InvalidValue(
            field.name, Problem.FINITE, f"{field.option} must be a finite decimal number"
        )
    return value


def integer_value(text: str, field: Field) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise InvalidValue(
            field.name, Problem.INTEGER, f"{field.option} must be a whole number, not {text!r}"
        ) from None


def staff_action(
    action: Action, values: Mapping[str, str | int | None], *, actor: str, request_id: str
) -> StaffAction:
    """The request for `action` from its `values` (text as typed, or an int the CLI has
    already read), or `InvalidValue` for the first one that cannot be read. A missing
    required value is refused; an empty one is the workflow's to judge, as from the CLI."""
    given: dict[str, object] = {}
    for field in fields_of(action):
        value = values.get(field.name)
        if value is None:
            if field.required:
                raise InvalidValue(field.name, Problem.REQUIRED, f"{field.option} is required")
            continue
        if field.kind is Kind.DECIMAL:
            given[field.name] = decimal_value(str(value), field)
        elif field.kind is Kind.INTEGER:
            given[field.name] = value if isinstance(value, int) else integer_value(value, field)
        else:
            given[field.name] = value
    return StaffAction(action=action, actor=actor, request_id=request_id, **given)  # type: ignore[arg-type]


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
                "act",
                request,
                id=request.request_id,
                wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                result_type=ActResult,
                rpc_timeout=timedelta(seconds=timeout),
            )
            accepted = True
            left = max(0.1, deadline - loop.time())
            return await update.result(rpc_timeout=timedelta(seconds=left))
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
