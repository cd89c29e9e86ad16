"""The daily retention run: one activity, run by a Temporal Schedule on the referrals queue."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.models import RetentionReport


@workflow.defn
class RetentionWorkflow:
    @workflow.run
    async def run(self) -> RetentionReport:
        return await workflow.execute_activity(
            "erase_expired",
            start_to_close_timeout=timedelta(hours=1),
            heartbeat_timeout=timedelta(minutes=5),
            retry_policy=RetryPolicy(maximum_attempts=3),
            result_type=RetentionReport,
        )
