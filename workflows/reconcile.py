"""The nightly reconciliation: one activity, run by a Temporal Schedule on the referrals queue."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.models.referral import ReconcileReport

RECONCILE = "reconcile"  # activities/reconcile.py defines it under this name


@workflow.defn
class ReconcileWorkflow:
    @workflow.run
    async def run(self) -> ReconcileReport:
        """The activity heartbeats as it goes: a lost worker shows within two minutes, not at
        the end of the attempt, and each retry resumes after the last heartbeat."""
        return await workflow.execute_activity(
            RECONCILE,
            heartbeat_timeout=timedelta(minutes=2),
            start_to_close_timeout=timedelta(minutes=30),
            schedule_to_close_timeout=timedelta(hours=2),
            retry_policy=RetryPolicy(maximum_attempts=5),
            result_type=ReconcileReport,
        )
