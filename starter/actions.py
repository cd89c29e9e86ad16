"""A staff action, however it arrives (the CLI, the staff web desk): the values each action
takes, and how they are read and checked before anything is sent. `send_action`
(starter/staff_client.py) applies it through the referral workflow's `act` update.

Both ways in build their `StaffAction` with `staff_action` from the table `ACTION_FIELDS`
(the CLI's options are made from it), so a value the CLI refuses the desk refuses too, and
both send it with `send_action`, so a retried request (same request id) is applied once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum

from core.errors import Refused
from workflows.models.referral import StaffAction
from workflows.models.values import Action

# How long a staff action may wait for a worker, unless REFERRALS_CLI_TIMEOUT says otherwise.
DEFAULT_TIMEOUT_SECONDS = 30.0


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
