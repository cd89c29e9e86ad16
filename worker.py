"""Runs a worker on the referrals task queue: wiring only."""

from __future__ import annotations

import asyncio
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.email import EmailActivities, SmtpSettings
from activities.erasure import RetentionActivities
from activities.ledger import LedgerActivities
from activities.metrics import ActivityMetrics, refresh_gauges
from activities.reconcile import ReconcileActivities
from activities.records import RecordActivities
from activities.schema import SchemaOutOfDate, open_database
from activities.webhooks import WebhookActivities
from core.links import status_url
from core.metrics import MetricsSettingError, metrics_endpoint, refresh_interval, worker_runtime
from core.program import ProgramError, load_program
from core.schedules import ensure_schedules
from core.temporal import connect, task_queue
from workflows.models import ProgramRules
from workflows.reconcile import ReconcileWorkflow
from workflows.referral import ReferralWorkflow
from workflows.retention import RetentionWorkflow
from workflows.webhook_delivery import WebhookDeliveryWorkflow

# Activities block on SMTP and SQL: one thread each (record_referral, async for the Temporal
# client it starts webhook deliveries with, hands its SQL to a thread), never more than threads.
ACTIVITY_THREADS = 8
# On SIGTERM or Ctrl-C, in-flight activities may finish: longer than any activity's timeout.
GRACEFUL_SHUTDOWN = timedelta(seconds=75)


def workflow_runner() -> SandboxedWorkflowRunner:
    """Pydantic's email validation is loaded once, outside the sandbox, like the models."""
    restrictions = SandboxRestrictions.default.with_passthrough_modules("email_validator", "idna")
    return SandboxedWorkflowRunner(restrictions=restrictions)


def build_worker(
    client: Client,
    engine: Engine,
    smtp: SmtpSettings,
    queue: str | None = None,
    rules: ProgramRules | None = None,
    **options: Any,
) -> Worker:
    """`rules`: the program in force, for its retention period (default: program.yaml)."""
    email = EmailActivities(engine, smtp, status_link=status_url)
    ledger = LedgerActivities(engine)
    records = RecordActivities(engine, client)
    webhooks = WebhookActivities(engine)
    reconcile = ReconcileActivities(client, engine)
    retention = RetentionActivities(
        client, engine, (rules or load_program()).retention.personal_data_days
    )
    return Worker(
        client,
        task_queue=queue or task_queue(),
        workflows=[ReferralWorkflow, ReconcileWorkflow, RetentionWorkflow, WebhookDeliveryWorkflow],
        workflow_runner=workflow_runner(),
        activities=[
            email.send_email,
            ledger.record_commission,
            ledger.release_prospect,
            records.record_referral,
            reconcile.reconcile,
            retention.erase_expired,
            webhooks.deliver_webhook,
            webhooks.mark_webhook_failed,
        ],
        activity_executor=ThreadPoolExecutor(max_workers=ACTIVITY_THREADS),
        max_concurrent_activities=ACTIVITY_THREADS,
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        **options,
    )


async def run_worker() -> None:
    # REFERRALS_METRICS_PORT: Prometheus metrics, Temporal's and the program's (core.metrics).
    metrics = metrics_endpoint()
    interval = refresh_interval() if metrics else 0.0
    rules = load_program()
    engine = open_database()
    runtime = worker_runtime(metrics.port, metrics.host) if metrics else None
    client = await connect(runtime=runtime)
    for schedule in await ensure_schedules(client, rules):
        print(f"created the schedule {schedule}", flush=True)
    worker = build_worker(
        client,
        engine,
        SmtpSettings.from_env(),
        rules=rules,
        interceptors=[ActivityMetrics()] if runtime else [],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    gauges = None
    if metrics and runtime:
        gauges = asyncio.create_task(refresh_gauges(engine, runtime.metric_meter, interval))
        print(f"metrics on {metrics.url}", flush=True)
    async with worker:
        print(f"worker polling task queue {task_queue()!r}", flush=True)
        await stop.wait()
        print("worker stopping: finishing in-flight activities…", flush=True)
        if gauges:
            gauges.cancel()
    print("worker stopped", flush=True)


def main() -> None:
    try:
        asyncio.run(run_worker())
    except (SchemaOutOfDate, ProgramError, MetricsSettingError) as error:
        print(f"worker: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
