"""The Temporal Schedules the program relies on, created by the worker when missing."""

from __future__ import annotations

from typing import Any

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
)

from core.temporal import task_queue
from workflows.models import ProgramRules
from workflows.reconcile import ReconcileWorkflow
from workflows.retention import RetentionWorkflow

RECONCILE_SCHEDULE = "referrals-reconcile"
RETENTION_SCHEDULE = "referrals-retention"
# Nightly, in the program's time zone: reconcile first, then erase what retention expired.
SCHEDULES: dict[str, tuple[Any, str]] = {
    RECONCILE_SCHEDULE: (ReconcileWorkflow.run, "30 3 * * *"),
    RETENTION_SCHEDULE: (RetentionWorkflow.run, "30 4 * * *"),
}


async def ensure_schedules(
    client: Client, rules: ProgramRules, queue: str | None = None
) -> list[str]:
    """Create the program's schedules that do not exist yet; returns their ids."""
    created = []
    for schedule_id, (run, cron) in SCHEDULES.items():
        try:
            await client.create_schedule(
                schedule_id,
                Schedule(
                    action=ScheduleActionStartWorkflow(
                        run, id=f"{schedule_id}-run", task_queue=queue or task_queue()
                    ),
                    spec=ScheduleSpec(
                        cron_expressions=[cron], time_zone_name=rules.calendar.timezone
                    ),
                    policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
                ),
            )
        except ScheduleAlreadyRunningError:
            continue
        created.append(schedule_id)
    return created
