"""`make bench`: the project's referral lifecycle against a bare Temporal lifecycle of the same
shape, in one run, on one dev server, with the real worker, SQLite and a loopback SMTP sink.

Writes bench/results.json and prints a table. `make bench QUICK=1` (BENCH_QUICK=1) walks
fewer lifecycles and posts, for a run of a minute or two; BENCH_REFERRALS=N and
BENCH_POSTS=N set the numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.testing import WorkflowEnvironment

from activities.db import make_engine
from activities.email import SmtpSettings
from activities.schema import upgrade
from bench.intake import post_referrals
from bench.lifecycle import percentiles, shape_of, walk_bare, walk_referrals
from starter.client import data_converter
from starter.encryption import KEYS_ENV, new_key_entry
from starter.mail_sink import start_sink
from starter.program import load_program
from tests.conftest import SEARCH_ATTRIBUTES, free_port, referrals_web
from worker import build_worker
from workflows.models import ClawbackRules

RESULTS = Path(__file__).resolve().parent / "results.json"


async def measure(count: int, posts: int) -> dict[str, Any]:
    # The bench's worker and the web app it starts share one payload key.
    os.environ[KEYS_ENV] = new_key_entry()
    # Payout closes a referral at once, so each one is timed to its end (no clawback window).
    rules = load_program("program.yaml").model_copy(update={"clawback": ClawbackRules(days=0)})
    work = Path(tempfile.mkdtemp(prefix="referral-bench-"))
    database_url = f"sqlite:///{work / 'bench.db'}"
    engine = make_engine(database_url)
    upgrade(engine)
    port = free_port()
    sink = start_sink("127.0.0.1", port, work / "mail")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(),
    )
    try:
        async with build_worker(env.client, engine, SmtpSettings("127.0.0.1", port), "referrals"):
            await walk_referrals(env.client, engine, rules, 2)  # warm: imports, sandbox, pool
            project = await walk_referrals(env.client, engine, rules, count)
            history = await env.client.get_workflow_handle(project.last_id).fetch_history()
            async with referrals_web(
                work,
                "/healthz",
                TEMPORAL_ADDRESS=env.client.service_client.config.target_host,
                TEMPORAL_NAMESPACE=env.client.namespace,
                REFERRALS_DATABASE_URL=database_url,
                REFERRALS_SMTP_HOST="127.0.0.1",
                REFERRALS_SMTP_PORT=str(port),
                REFERRALS_RATE_LIMIT="off",
            ) as base:
                await post_referrals(base, 20)  # warm
                intake = await post_referrals(base, posts)
        plan = shape_of(history)
        await walk_bare(env.client, plan, 2)
        bare = await walk_bare(env.client, plan, count)
    finally:
        await env.shutdown()
        sink.stop()
    emails = len(list((work / "mail" / "new").iterdir()))
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "referrals": count,
        "lifecycles_per_s": round(project.per_second, 2),
        "bare_lifecycles_per_s": round(bare.per_second, 2),
        "ratio_vs_bare": round(project.per_second / bare.per_second, 3),
        "update_latency_ms": percentiles(project.update_ms),
        "bare_update_latency_ms": percentiles(bare.update_ms),
        "submit_latency_ms": percentiles(project.submit_ms),
        "intake_rps": round(intake.per_second, 1),
        "intake_p99_ms": percentiles(intake.latency_ms)["p99"],
        "intake_errors": sum(intake.errors.values()),
        "intake_latency_ms": percentiles(intake.latency_ms),
        "intake_posts": posts,
        "intake_errors_by_status": {str(k): v for k, v in intake.errors.items()},
        "lifecycle_shape": {"updates": plan.updates, "writes": plan.writes, "emails": plan.emails},
        "lifecycle_history": {
            "events": len(history.events),
            "json_bytes": len(history.to_json().encode()),
        },
        "emails_delivered": emails,
    }


def table(results: dict[str, Any]) -> str:
    update, bare = results["update_latency_ms"], results["bare_update_latency_ms"]
    rows = [
        ("lifecycles/s", results["lifecycles_per_s"], results["bare_lifecycles_per_s"]),
        ("update p50 ms", update["p50"], bare["p50"]),
        ("update p95 ms", update["p95"], bare["p95"]),
        ("update p99 ms", update["p99"], bare["p99"]),
    ]
    intake = results["intake_latency_ms"]
    lines = [f"{'':<16}{'project':>10}{'bare':>10}"]
    lines += [f"{name:<16}{mine:>10}{theirs:>10}" for name, mine, theirs in rows]
    shape = results["lifecycle_shape"]
    lines.append(
        f"ratio_vs_bare {results['ratio_vs_bare']}; {results['referrals']} lifecycles each, "
        f"{shape['updates']} updates; writes {shape['writes']}, emails {shape['emails']}; "
        f"history {results['lifecycle_history']['events']} events, "
        f"{results['lifecycle_history']['json_bytes']} bytes"
    )
    lines.append(
        f"intake: {results['intake_rps']} posts/s from 20 clients, p50 {intake['p50']} ms, "
        f"p99 {intake['p99']} ms, {results['intake_errors']} errors "
        f"({results['intake_posts']} posts)"
    )
    return "\n".join(lines)


def main() -> None:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    count = int(os.environ.get("BENCH_REFERRALS") or (20 if quick else 100))
    posts = int(os.environ.get("BENCH_POSTS") or (200 if quick else 1000))
    results = asyncio.run(measure(count, posts))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
