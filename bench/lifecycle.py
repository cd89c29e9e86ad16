"""Benchmark: referrals submitted and walked to commission_paid on a real dev server.

Real worker, real activities (SQLite ledger, emails to a loopback SMTP sink).
Prints latency percentiles for submission and staff updates, and throughput.
Run with `make bench` (BENCH_REFERRALS=N to change the count).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from activities.db import make_engine
from activities.email import SmtpSettings
from activities.schema import upgrade
from starter.client import data_converter
from starter.intake import parse_submission, submit_referral
from starter.mail_sink import start_sink
from starter.program import load_program
from tests.conftest import SEARCH_ATTRIBUTES, free_port
from tests.factories import submission_data
from worker import build_worker
from workflows.models import Action, ClawbackRules, ReferralState, StaffAction

STEPS = [
    StaffAction(action=Action.CONTACTED, actor="bench"),
    StaffAction(action=Action.ACCEPT, actor="bench"),
    StaffAction(action=Action.APPROVE, actor="bench"),
    StaffAction(action=Action.WON, actor="bench", amount=Decimal("120000"), currency="EUR"),
    StaffAction(action=Action.PAYMENT, actor="bench", amount=Decimal("120000"), reference="INV"),
    StaffAction(action=Action.PAYOUT, actor="bench", reference="VIR"),
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(count: int) -> None:
    # Payout closes a referral at once, so each one is timed to its end (no clawback window).
    rules = load_program("program.yaml").model_copy(update={"clawback": ClawbackRules(days=0)})
    work = Path(tempfile.mkdtemp(prefix="referral-bench-"))
    engine = make_engine(f"sqlite:///{work / 'bench.db'}")
    upgrade(engine)
    port = free_port()
    sink = start_sink("127.0.0.1", port, work / "mail")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(),
    )
    submit_ms: list[float] = []
    update_ms: list[float] = []
    try:
        worker = build_worker(env.client, engine, SmtpSettings("127.0.0.1", port), "referrals")
        async with worker:
            started = time.perf_counter()

            async def one() -> None:
                data = submission_data(**{"prospect.website": f"b-{uuid.uuid4().hex[:10]}.example"})
                t0 = time.perf_counter()
                rid = await submit_referral(env.client, engine, rules, parse_submission(data))
                submit_ms.append((time.perf_counter() - t0) * 1000)
                handle = env.client.get_workflow_handle(rid, result_type=ReferralState)
                for step in STEPS:
                    t0 = time.perf_counter()
                    await handle.execute_update("act", step, result_type=ReferralState)
                    update_ms.append((time.perf_counter() - t0) * 1000)
                await handle.result()

            await asyncio.gather(*(one() for _ in range(count)))
            elapsed = time.perf_counter() - started
    finally:
        await env.shutdown()
        sink.stop()
    emails = len(list((work / "mail" / "new").iterdir()))
    print(
        f"referrals walked to commission_paid: {count} in {elapsed:.1f} s "
        f"({count / elapsed:.1f} referrals/s, {emails} emails delivered)"
    )
    for name, values in (("submit", submit_ms), ("update", update_ms)):
        print(
            f"{name:>7} latency ms: p50 {statistics.median(values):.0f}  "
            f"p95 {percentile(values, 0.95):.0f}  max {max(values):.0f}  (n={len(values)})"
        )


if __name__ == "__main__":
    asyncio.run(main(int(os.environ.get("BENCH_REFERRALS", "50"))))
