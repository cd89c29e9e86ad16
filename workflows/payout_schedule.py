"""The monthly payout runs: a Schedule starts this workflow each morning of the first week of
the month; its activity prepares a run per currency on the month's first business day when
program.yaml's `payouts.schedule` is `monthly`, and does nothing otherwise (docs/payouts.md).
No I/O here."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

PREPARE_SCHEDULED = "prepare_scheduled_runs"


@workflow.defn
class MonthlyPayoutsWorkflow:
    @workflow.run
    async def run(self) -> list[str]:
        """The ids of the runs prepared (none on other days, or with manual payouts)."""
        return await workflow.execute_activity(
            PREPARE_SCHEDULED,
            start_to_close_timeout=timedelta(minutes=5),
            schedule_to_close_timeout=timedelta(hours=6),
            retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=10)),
            result_type=list[str],
        )
