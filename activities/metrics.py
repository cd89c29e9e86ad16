"""The program's metrics (`referrals_…`), served by the worker beside Temporal's own on its
runtime's endpoint (core/metrics.py).

They come from two places: an activity interceptor counts what the worker does (emails sent and
failed, ledger write retries, activity failures), and a refresher reads the system of record
every REFERRALS_METRICS_REFRESH_S seconds (15) for the referrals by stage and the contact
promise. No label ever carries an address, a name or a referral id.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.common import MetricMeter
from temporalio.exceptions import CancelledError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from activities.db import ReferralRow
from workflows.models.referral import Stage

EMAILS_SENT = "referrals_emails_sent_total"
EMAILS_FAILED = "referrals_emails_failed_total"
LEDGER_RETRIES = "referrals_ledger_retries_total"
ACTIVITY_FAILURES = "referrals_activity_failures_total"
BY_STAGE = "referrals_by_stage"
SLA_BREACHED_OPEN = "referrals_contact_sla_breached"
CONTACT_OVERDUE = "referrals_contact_overdue"
SLA_BREACHED_EVER = "referrals_contact_sla_breached_ever"
REFRESHED_AT = "referrals_metrics_refreshed_timestamp_seconds"
REFRESH_ERRORS = "referrals_metrics_refresh_errors_total"

# The activities that write the system of record and the ledger: a second attempt means a write
# failed (database down, locked, a conflict) and Temporal is retrying it.
LEDGER_ACTIVITIES = frozenset({"record_commission", "record_referral", "release_prospect"})
SEND_EMAIL = "send_email"
# Template names are the workflow's own constants (`referrer_won`, `staff_refund`…); anything
# else is labelled "other", so a label can never carry more than a template's name.
_TEMPLATE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

log = logging.getLogger(__name__)


def _template(input: ExecuteActivityInput) -> str:
    """The email's template name, the only thing about an email worth a label."""
    template = getattr(input.args[0], "template", None) if input.args else None
    if isinstance(template, str) and _TEMPLATE_NAME.fullmatch(template):
        return template
    return "other"


class ActivityMetrics(Interceptor):
    """Counts, per activity, what the worker's activities do, on the activity's metric meter
    (the worker's runtime, so the same endpoint as Temporal's metrics; each series also carries
    the SDK's `namespace`, `task_queue` and `activity_type` labels):

    - `referrals_emails_sent_total{template}`: send_email attempts that succeeded (the email was
      handed to the SMTP server, or had been on an earlier attempt);
    - `referrals_emails_failed_total{template}`: send_email attempts that failed (a transient
      failure is retried; a permanent refusal is not);
    - `referrals_ledger_retries_total{activity}`: attempts after the first of the database
      writes (record_referral, record_commission, release_prospect);
    - `referrals_activity_failures_total{activity}`: failed attempts of any activity.
    """

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _CountingActivity(next)


class _CountingActivity(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        name = info.activity_type
        meter = activity.metric_meter()
        if name in LEDGER_ACTIVITIES and info.attempt > 1:
            meter.create_counter(
                LEDGER_RETRIES, "Retried attempts of the database and ledger writes"
            ).add(1, {"activity": name})
        try:
            result = await super().execute_activity(input)
        except CancelledError:
            raise  # the worker is stopping or the workflow gave up on it: not a failure
        except Exception:
            meter.create_counter(ACTIVITY_FAILURES, "Failed activity attempts").add(
                1, {"activity": name}
            )
            if name == SEND_EMAIL:
                meter.create_counter(EMAILS_FAILED, "Failed attempts to send an email").add(
                    1, {"template": _template(input)}
                )
            raise
        if name == SEND_EMAIL:
            meter.create_counter(EMAILS_SENT, "Emails sent").add(1, {"template": _template(input)})
        return result


@dataclass(frozen=True)
class ReferralFigures:
    """What the system of record says now."""

    by_stage: dict[str, int] = field(default_factory=dict)
    sla_breached_open: int = 0  # open referrals whose contact deadline passed before contact
    contact_overdue: int = 0  # of those, the ones still waiting to be contacted
    sla_breached_ever: int = 0  # every referral recorded whose contact deadline was missed


def referral_figures(engine: Engine) -> ReferralFigures:
    """One query: referrals per stage, with the contact promise's breaches among them."""
    table: Any = ReferralRow.__table__  # type: ignore[attr-defined]
    breached = table.c.contact_sla_breached.is_(True)
    open_ = table.c.closed_at.is_(None)
    query = select(
        table.c.stage,
        func.count(),
        func.coalesce(func.sum(case((breached & open_, 1), else_=0)), 0),
        func.coalesce(func.sum(case((breached, 1), else_=0)), 0),
    ).group_by(table.c.stage)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    by_stage = {stage.value: 0 for stage in Stage}
    sla_open = overdue = ever = 0
    for stage, count, breached_open, breached_all in rows:
        by_stage[str(stage)] = int(count)
        sla_open += int(breached_open)
        ever += int(breached_all)
        if stage == Stage.SUBMITTED:
            overdue += int(breached_open)
    return ReferralFigures(by_stage, sla_open, overdue, ever)


class ReferralGauges:
    """The gauges the refresher keeps up to date, on the worker's runtime meter."""

    def __init__(self, meter: MetricMeter) -> None:
        self.by_stage = meter.create_gauge(BY_STAGE, "Referrals in each stage")
        self.sla_breached_open = meter.create_gauge(
            SLA_BREACHED_OPEN, "Open referrals whose contact deadline passed before contact"
        )
        self.contact_overdue = meter.create_gauge(
            CONTACT_OVERDUE, "Referrals still waiting to be contacted after their deadline"
        )
        self.sla_breached_ever = meter.create_gauge(
            SLA_BREACHED_EVER, "Referrals recorded whose contact deadline was ever missed"
        )
        self.refreshed_at = meter.create_gauge(
            REFRESHED_AT, "When these gauges last read the database (Unix time)", "s"
        )
        self.refresh_errors = meter.create_counter(
            REFRESH_ERRORS, "Failed reads of the database for these gauges"
        )

    def set(self, figures: ReferralFigures, now: float | None = None) -> None:
        for stage, count in figures.by_stage.items():
            self.by_stage.set(count, {"stage": stage})
        self.sla_breached_open.set(figures.sla_breached_open)
        self.contact_overdue.set(figures.contact_overdue)
        self.sla_breached_ever.set(figures.sla_breached_ever)
        self.refreshed_at.set(int(time.time() if now is None else now))


async def refresh_gauges(engine: Engine, meter: MetricMeter, interval: float) -> None:
    """Until cancelled: read the database (in a thread) every `interval` seconds and set the
    gauges. A failed read is logged and tried again next time; it never stops the worker."""
    gauges = ReferralGauges(meter)
    while True:
        try:
            figures = await asyncio.to_thread(referral_figures, engine)
        except Exception as error:  # noqa: BLE001 - any failure waits for the next tick
            gauges.refresh_errors.add(1)
            log.warning("metrics: could not read the referrals: %s", error)
        else:
            gauges.set(figures)
        await asyncio.sleep(interval)
