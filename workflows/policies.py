"""How the referral workflow retries, indexes and reports: its constants and pure helpers.

They live outside workflows/referral.py because the sandbox runs the workflow's own module
again for every referral it caches; this module is passed through, imported once per worker.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, FailureError
from temporalio.exceptions import TimeoutError as ActivityTimeout

from workflows.models.referral import ReferralState, Stage

STAGE_KEY = SearchAttributeKey.for_keyword("ReferralStage")
DOMAIN_KEY = SearchAttributeKey.for_keyword("ProspectDomain")
# Holds addresses: set only by referrals started before `private-search-attributes`.
REFERRER_EMAIL_KEY = SearchAttributeKey.for_keyword("ReferrerEmail")
REFERRER_KEY = SearchAttributeKey.for_keyword("ReferrerKey")
PRODUCT_KEY = SearchAttributeKey.for_keyword("Product")
SLA_KEY = SearchAttributeKey.for_bool("ContactSlaBreached")
PROTECTED_KEY = SearchAttributeKey.for_datetime("ProtectedUntil")
# What the referral workflow sets: `referrals temporal setup` registers them, and a worker
# refuses to start on a namespace without them (core/provisioning.py).
SEARCH_ATTRIBUTES = (STAGE_KEY, DOMAIN_KEY, REFERRER_KEY, PRODUCT_KEY, SLA_KEY, PROTECTED_KEY)

# Referrals started before `effect-failures`: every effect is retried until it succeeds.
EFFECT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
)
EFFECT_TIMEOUT = timedelta(seconds=60)

# Email: a permanent refusal is not retried; anything else is, until the program's limit.
PERMANENT_EMAIL_FAILURE = "PermanentEmailFailure"
EMAIL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    non_retryable_error_types=[PERMANENT_EMAIL_FAILURE],
)
EMAIL_ATTEMPT_TIMEOUT = timedelta(seconds=40)  # the activity's own SMTP deadline is 30 s

# Database writes: a few quick attempts, then the workflow waits and tries again, for as long
# as it takes, and says so in the referral's current details meanwhile.
WRITE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=4),
    maximum_attempts=3,
)
WRITE_TIMEOUT = timedelta(seconds=10)  # a write takes milliseconds; a lost attempt is retried
WRITE_PAUSE = timedelta(seconds=5)
WRITE_PAUSE_MAX = timedelta(minutes=10)

# A misbehaving integration can send refused signals without end; the history keeps the last.
MAX_REFUSALS_KEPT = 100

# Who hears about a stage, besides the referrer (who hears about every one).
STAFF_NOTICE: dict[Stage, tuple[str, str]] = {
    Stage.SUBMITTED: ("desk", "staff_new_referral"),
    Stage.QUALIFYING: ("sales", "staff_sales_handoff"),
    Stage.WON: ("finance", "staff_deal_won"),
    Stage.COMMISSION_PAYABLE: ("finance", "staff_commission_payable"),
}


def failure_reason(error: ActivityError) -> str:
    """One line on why an activity attempt failed."""
    return _message(error.cause or error)


def email_failure_reason(error: ActivityError, retry_for_hours: int) -> str:
    """The refusal for a permanent failure; for anything else, that retries ran out."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.type == PERMANENT_EMAIL_FAILURE:
        return cause.message
    last = cause.cause if isinstance(cause, ActivityTimeout) else cause
    return f"still failing after retrying for {retry_for_hours} h" + (
        f" (last error: {_message(last)})" if last is not None else ""
    )


def _message(error: BaseException) -> str:
    return error.message if isinstance(error, FailureError) else str(error)


def current_details(
    state: ReferralState, timer: tuple[datetime, Any] | None, trouble: str | None = None
) -> str:
    lines = [f"**Stage:** {state.stage.value}"]
    if timer is not None:
        due, fire = timer
        what = fire.__name__.strip("_").replace("_", " ")
        lines.append(f"**Next:** {what} at {due:%Y-%m-%d %H:%M} UTC")
    if state.contact_sla_breached:
        lines.append("**Contact SLA:** breached")
    if state.commission is not None:
        c = state.commission
        lines.append(
            f"**Commission:** {c.amount} {c.currency} ({c.status.value}); "
            f"customer paid {c.customer_paid} of {c.basis_amount} {c.currency}"
        )
    if trouble is not None:
        lines.append(f"**Database writes failing:** {trouble}")
    return "\n".join(lines)
