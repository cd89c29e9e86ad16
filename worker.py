"""Runs a worker on the referrals task queue: wiring only."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.db import make_engine
from activities.email import EmailActivities, SmtpSettings
from activities.ledger import LedgerActivities
from starter.client import connect, task_queue
from workflows.referral import ReferralWorkflow


def workflow_runner() -> SandboxedWorkflowRunner:
    """Pydantic's email validation is loaded once, outside the sandbox, like the models."""
    restrictions = SandboxRestrictions.default.with_passthrough_modules("email_validator", "idna")
    return SandboxedWorkflowRunner(restrictions=restrictions)


def build_worker(
    client: Client, engine: Engine, smtp: SmtpSettings, queue: str | None = None
) -> Worker:
    email = EmailActivities(engine, smtp)
    ledger = LedgerActivities(engine)
    return Worker(
        client,
        task_queue=queue or task_queue(),
        workflows=[ReferralWorkflow],
        workflow_runner=workflow_runner(),
        activities=[email.send_email, ledger.record_commission, ledger.release_prospect],
        activity_executor=ThreadPoolExecutor(max_workers=8),
    )


async def run_worker() -> None:
    client = await connect()
    worker = build_worker(client, make_engine(), SmtpSettings.from_env())
    print(f"worker polling task queue {task_queue()!r}", flush=True)
    await worker.run()


def main() -> None:
    try:
        asyncio.run(run_worker())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
