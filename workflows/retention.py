"""The daily retention run: one activity, run by a Temporal Schedule on the referrals queue."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.models.referral import RetentionReport

ERASE_EXPIRED = "erase_expired"  # activities/erasure.py defines it under this name


@workflow.defn
class RetentionWorkflow:
    @workflow.run
    async def run(self) -> RetentionReport:
        return await workflow.execute_activity(
            ERASE_EXPIRED,
            start_to_close_timeout=timedelta(hours=1),
            heartbeat_timeout=timedelta(minutes=5),
            retry_policy=RetryPolicy(maximum_attempts=3),
            result_type=RetentionReport,
        )
