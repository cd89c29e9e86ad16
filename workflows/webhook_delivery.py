"""Delivers one webhook message: the endpoint is tried with exponential backoff for up to
three days (docs/webhooks.md), then the message is marked failed. One workflow per message
(and per redelivery), so a failing endpoint holds up nothing else: the referral never waits
on it. No I/O here; the activities do it."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

DELIVER = "deliver_webhook"
MARK_FAILED = "mark_webhook_failed"
# An endpoint answers within this (the activity's HTTP timeout is shorter).
ATTEMPT_TIMEOUT = timedelta(seconds=30)


class WebhookDeliveryInput(BaseModel):
    """Which message, and how long to keep trying: the defaults are the program's; tests
    shorten them (REFERRALS_WEBHOOK_RETRY_* variables, read by whoever starts a delivery)."""

    delivery_id: str
    initial_interval_s: float = 30
    maximum_interval_s: float = 3600
    give_up_after_s: float = 3 * 24 * 3600


@workflow.defn
class WebhookDeliveryWorkflow:
    @workflow.run
    async def run(self, input: WebhookDeliveryInput) -> str:
        """`delivered`, or `failed` once retries are exhausted or the endpoint refused it
        for good (410 Gone, or no longer configured)."""
        try:
            await workflow.execute_activity(
                DELIVER,
                input.delivery_id,
                start_to_close_timeout=ATTEMPT_TIMEOUT,
                schedule_to_close_timeout=timedelta(seconds=input.give_up_after_s),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=input.initial_interval_s),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=input.maximum_interval_s),
                ),
            )
        except ActivityError:
            await workflow.execute_activity(
                MARK_FAILED,
                input.delivery_id,
                start_to_close_timeout=ATTEMPT_TIMEOUT,
                retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=10)),
            )
            return "failed"
        return "delivered"
