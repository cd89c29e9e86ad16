"""The Temporal Schedules the program relies on, created by the worker when missing."""

from __future__ import annotations

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
)

from starter.client import task_queue
from workflows.models import ProgramRules
from workflows.reconcile import ReconcileWorkflow

RECONCILE_SCHEDULE = "referrals-reconcile"
RECONCILE_CRON = "30 3 * * *"  # nightly, in the program's time zone


async def ensure_reconcile_schedule(client: Client, rules: ProgramRules) -> bool:
    """Create the nightly reconciliation unless it exists; True if it was created."""
    try:
        await client.create_schedule(
            RECONCILE_SCHEDULE,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    ReconcileWorkflow.run,
                    id=f"{RECONCILE_SCHEDULE}-run",
                    task_queue=task_queue(),
                ),
                spec=ScheduleSpec(
                    cron_expressions=[RECONCILE_CRON], time_zone_name=rules.calendar.timezone
                ),
                policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
            ),
        )
    except ScheduleAlreadyRunningError:
        return False
    return True
