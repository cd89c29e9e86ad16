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
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.worker import Worker, WorkerDeploymentConfig
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.email import EmailActivities
from activities.erasure import RetentionActivities
from activities.ledger import LedgerActivities
from activities.metrics import ActivityMetrics, refresh_gauges
from activities.payouts import PayoutActivities
from activities.receipts import configure as configure_receipts
from activities.receipts import signing_answers
from activities.reconcile import ReconcileActivities
from activities.records import RecordActivities
from activities.schema import SchemaOutOfDate, open_database
from activities.webhooks import WebhookActivities, webhook_queue, with_secrets
from activities.webhooks import configure as configure_webhooks
from core.actor_assertions import trust
from core.health import HealthServer, database_answers, temporal_answers
from core.links import status_url
from core.logs import configure_logging
from core.metrics import MetricsSettingError, worker_runtime
from core.program import ProgramError, load_program
from core.provisioning import ProvisioningError, check_namespace
from core.settings import Need, Settings, SettingsError
from core.temporal import connect
from workflows.models.program import ProgramRules
from workflows.payout_run import PayoutRunWorkflow
from workflows.payout_schedule import MonthlyPayoutsWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.referral import ReferralWorkflow
from workflows.retention import RetentionWorkflow
from workflows.webhook_delivery import WebhookDeliveryWorkflow

# Activities block on SMTP and SQL: one thread each (record_referral, async for the Temporal
# client it starts webhook deliveries with, hands its SQL to a thread), never more than threads.
ACTIVITY_THREADS = 8
# Webhook deliveries' own threads and slots (build_webhook_worker): an endpoint that never
# answers holds these, for at most its HTTP timeout each, and nothing else.
WEBHOOK_THREADS = 4
# On SIGTERM or Ctrl-C, in-flight activities may finish: longer than any activity's timeout.
GRACEFUL_SHUTDOWN = timedelta(seconds=75)


def workflow_runner() -> SandboxedWorkflowRunner:
    """Pydantic's email validation is loaded once, outside the sandbox, like the models; so
    are PyJWT and cryptography, which the `act` validator loads when it first checks an
    assertion (a native module cannot be imported again inside a sandbox)."""
    restrictions = SandboxRestrictions.default.with_passthrough_modules(
        "email_validator", "idna", "jwt", "cryptography"
    )
    return SandboxedWorkflowRunner(restrictions=restrictions)


def versioning(
    settings: Settings, behavior: VersioningBehavior = VersioningBehavior.AUTO_UPGRADE
) -> dict[str, Any]:
    """The options of every Worker this process runs. With a build id, the worker is that version
    of the settings' Worker Deployment: once a version is made current, new runs and every
    running one's next task go to its workers only, so a run started on new code never lands on
    an old worker mid-rollout (docs/rollout.md). `behavior` is the default of the worker's
    workflows (AUTO_UPGRADE; the webhook worker's PINNED), declared here rather than in
    `@workflow.defn`: a declared behaviour is sent by an unversioned worker too, and the server
    refuses that worker's tasks. Without a build id (the dev stack, most tests), unversioned,
    as before: any worker takes any task."""
    if settings.build_id is None:
        return {}
    version = WorkerDeploymentVersion(settings.deployment_name, settings.build_id)
    config = WorkerDeploymentConfig(
        version=version,
        use_worker_versioning=True,
        default_versioning_behavior=behavior,
    )
    return {"deployment_config": config}


def build_worker(
    client: Client,
    engine: Engine,
    settings: Settings,
    queue: str | None = None,
    rules: ProgramRules | None = None,
    **options: Any,
) -> Worker:
    """`settings`: the relay, the links' secrets and public URL, the webhooks' program file and
    retries; `queue` (default the settings'); `rules`: the program in force, for its retention
    period (default: the settings' program file)."""
    configure_webhooks(settings.program_path, settings.webhook_retry)
    configure_receipts(settings.key_ring())  # the receipts of acceptances and releases
    if settings.actor_trusted_keys is not None:
        trust(settings.actor_trusted_keys)  # what the `act` validator checks assertions with
    email = EmailActivities(
        engine,
        settings.smtp,
        status_link=lambda referral_id: status_url(
            settings.public_url, referral_id, settings.secret_keys
        ),
        verify_url=f"{settings.public_url}/receipts/verify",
    )
    ledger = LedgerActivities(engine)
    records = RecordActivities(engine, client)
    webhooks = WebhookActivities(engine)
    reconcile = ReconcileActivities(client, engine, settings.task_queue)
    rules = rules or load_program(settings.program_path)
    retention = RetentionActivities(
        client,
        engine,
        rules.retention.personal_data_days,
        settings.task_queue,
        settings.dev_maildir,
    )
    payouts = PayoutActivities(engine, rules, client, email)
    return Worker(
        client,
        task_queue=queue or settings.task_queue,
        workflows=[
            ReferralWorkflow,
            PayoutRunWorkflow,
            MonthlyPayoutsWorkflow,
            ReconcileWorkflow,
            RetentionWorkflow,
            WebhookDeliveryWorkflow,
        ],
        workflow_runner=workflow_runner(),
        activities=[
            email.send_email,
            ledger.record_commission,
            ledger.release_prospect,
            records.record_referral,
            payouts.collect_payout_items,
            payouts.record_payout_run,
            payouts.export_payout_run,
            payouts.fail_payout_item,
            payouts.confirm_payout_run,
            payouts.notify_payees,
            payouts.prepare_scheduled_runs,
            reconcile.reconcile,
            retention.erase_expired,
            webhooks.deliver_webhook,
            webhooks.mark_webhook_failed,
        ],
        activity_executor=ThreadPoolExecutor(max_workers=ACTIVITY_THREADS),
        max_concurrent_activities=ACTIVITY_THREADS,
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        **versioning(settings),
        **options,
    )


def build_webhook_worker(
    client: Client, engine: Engine, settings: Settings, queue: str | None = None, **options: Any
) -> Worker:
    """The webhook deliveries of the referrals queue `queue` (default the settings'), on a
    queue and slots of their own. Each delivery is PINNED when versioned: it ends on the
    code that started it, a short run a release never has to replay."""
    webhooks = WebhookActivities(engine)
    return Worker(
        client,
        task_queue=webhook_queue(queue or settings.task_queue),
        workflows=[WebhookDeliveryWorkflow],
        workflow_runner=workflow_runner(),
        activities=[webhooks.deliver_webhook, webhooks.mark_webhook_failed],
        activity_executor=ThreadPoolExecutor(max_workers=WEBHOOK_THREADS),
        max_concurrent_activities=WEBHOOK_THREADS,
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        **versioning(settings, VersioningBehavior.PINNED),
        **options,
    )


async def run_worker(settings: Settings) -> None:
    settings.require(Need.DATABASE, Need.ENCRYPTION, Need.SECRET, Need.ACTOR_KEYS)
    configure_logging(settings)
    rules = load_program(settings.program_path)
    with_secrets(rules.webhooks)  # every webhook's secret_env set: refuse to start otherwise
    engine = open_database(settings.database())
    # REFERRALS_METRICS_PORT: Prometheus metrics, Temporal's and the program's.
    metrics = settings.worker_metrics
    runtime = worker_runtime(metrics) if metrics else None
    client = await connect(settings, runtime=runtime)
    await check_namespace(client)  # a missing search attribute would fail every referral
    worker = build_worker(
        client,
        engine,
        settings,
        rules=rules,
        interceptors=[ActivityMetrics()] if runtime else [],
    )
    webhook_worker = build_webhook_worker(
        client, engine, settings, interceptors=[ActivityMetrics()] if runtime else []
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    polling = False

    async def ready() -> dict[str, str]:
        temporal, database, receipts = await asyncio.gather(
            temporal_answers(client), database_answers(engine), signing_answers(engine)
        )
        return {
            "polling": "ok" if polling else "not polling",
            "temporal": temporal,
            "database": database,
            "receipts": receipts,
        }

    health = HealthServer(ready)
    if settings.health_port is not None:
        await health.start(settings.health_host, settings.health_port)
        print(
            f"probes on {settings.health_host}:{settings.health_port} (/livez, /readyz)", flush=True
        )
    gauges = None
    if metrics and runtime:
        gauges = asyncio.create_task(
            refresh_gauges(engine, runtime.metric_meter, settings.metrics_refresh_s)
        )
        print(f"metrics on {metrics.url}", flush=True)
    async with worker, webhook_worker:
        polling = True
        version = (
            f", version {settings.build_id} of {settings.deployment_name!r} (tasks once current)"
            if settings.build_id
            else ""
        )
        print(f"worker polling task queue {settings.task_queue!r}{version}", flush=True)
        await stop.wait()
        polling = False  # not ready: in-flight activities finish, nothing new should come
        print("worker stopping: finishing in-flight activities…", flush=True)
        if gauges:
            gauges.cancel()
    await health.stop()
    print("worker stopped", flush=True)


def main(settings: Settings | None = None) -> None:
    try:
        asyncio.run(run_worker(settings or Settings.from_env()))
    except (
        SettingsError,
        SchemaOutOfDate,
        ProgramError,
        MetricsSettingError,
        ProvisioningError,
    ) as error:
        print(f"worker: {error}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as error:  # the client's connection: say so in one line
        if "connect" not in str(error).lower():
            raise
        print(f"worker: cannot reach Temporal: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
