"""The nightly reconciliation: one activity, run by a Temporal Schedule on the referrals queue."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.models import ReconcileReport


@workflow.defn
class ReconcileWorkflow:
    @workflow.run
    async def run(self) -> ReconcileReport:
        return await workflow.execute_activity(
            "reconcile",
            start_to_close_timeout=timedelta(minutes=30),
            retry_policy=RetryPolicy(maximum_attempts=3),
            result_type=ReconcileReport,
        )
