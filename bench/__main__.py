"""`make bench`: the project's referral lifecycle against a bare Temporal lifecycle of the same
shape, in one run, on one dev server, with the real worker, SQLite and a loopback SMTP sink;
then the intake under load, throughput with one and two workers, a timer storm with the
worker's memory, and the staff views over many open referrals (bench/scale.py).

Writes bench/results.json and prints a table. `make bench QUICK=1` (BENCH_QUICK=1) uses
smaller numbers, for a run of a few minutes; BENCH_REFERRALS, BENCH_POSTS, BENCH_STORM and
BENCH_OPEN set them (100, 1000, 2000 and 10 000 by default).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory

from bench.cli import RUNS as CLI_RUNS
from bench.cli import cli_timings
from bench.intake import post_referrals
from bench.lifecycle import (
    BARE_QUEUE,
    percentiles,
    shape_of,
    submit_one,
    walk_bare,
    walk_referrals,
)
from bench.scale import measure_open_referrals
from bench.stack import bench_stack
from bench.storm import timer_storm
from bench.workers import (
    cpu_seconds,
    server_pid,
    throughput_by_workers,
    worker_processes,
)
from devstack.servers import referrals_web
from devstack.settings import SETTINGS

RESULTS = Path(__file__).resolve().parent / "results.json"
PROGRAM = Path(__file__).resolve().parent.parent / "program.yaml"


@contextmanager
def cpu_per(count: int, server: int, worker: int) -> Iterator[dict[str, float]]:
    """CPU milliseconds per lifecycle spent meanwhile by the dev server, the worker and this
    process (the load: clients, codec), filled in when the block ends."""
    pids = {"server": server, "worker": worker, "bench": os.getpid()}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    spent: dict[str, float] = {}
    yield spent
    for name, pid in pids.items():
        spent[name] = round((cpu_seconds(pid) - before[name]) * 1000 / count, 1)


def payload_bytes(history: WorkflowHistory) -> int:
    """The bytes of every payload a history holds (inputs, results, update arguments…), as
    stored: encrypted."""
    total = 0

    def visit(message: Message) -> None:
        nonlocal total
        if isinstance(message, Payload):
            total += len(message.data)
            return
        for field, value in message.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if isinstance(value, Message):
                visit(value)
                continue
            for item in value.values() if hasattr(value, "values") else value:  # map or list
                if isinstance(item, Message):
                    visit(item)

    for event in history.events:
        visit(event)
    return total


async def measure(count: int, posts: int, storm: int, open_count: int) -> dict[str, Any]:
    """Every worker runs in its own process, as in production (bench/worker_process.py): the
    bench process only drives the load, so its own work shares no interpreter with the worker
    it measures."""
    async with bench_stack("referral-bench-") as stack:
        client, engine, rules, work = stack.client, stack.engine, stack.rules, stack.work
        address, database_url, port = stack.address, stack.database_url, stack.smtp_port
        server = server_pid(address)
        async with referrals_web(
            work,
            "/healthz",
            TEMPORAL_ADDRESS=address,
            TEMPORAL_NAMESPACE=client.namespace,
            REFERRALS_DATABASE_URL=database_url,
            REFERRALS_SMTP_HOST="127.0.0.1",
            REFERRALS_SMTP_PORT=str(port),
            REFERRALS_RATE_LIMIT="off",
        ) as base:
            async with worker_processes(
                1, address, database_url, port, SETTINGS.task_queue, work
            ) as workers:
                await walk_referrals(client, engine, rules, 2)  # warm: imports, sandbox, pool
                with cpu_per(count, server, workers[0].pid) as project_cpu:
                    project = await walk_referrals(client, engine, rules, count)
                history = await client.get_workflow_handle(project.last_id).fetch_history()
                # With the worker idle, as a desk finds it between bursts: the thousand
                # referrals the intake starts below keep it busy for minutes.
                waiting = [await submit_one(client, engine, rules) for _ in range(CLI_RUNS)]
                cli = await cli_timings(
                    address, client.namespace, database_url, PROGRAM, work, waiting
                )
                await post_referrals(base, 20)  # warm
                intake = await post_referrals(base, posts)
            # The intake's own path, with no worker sharing the machine's cores: the
            # referrals it starts wait on their task queue.
            intake_alone = await post_referrals(base, posts)
        plan = shape_of(history)
        async with worker_processes(1, address, "", port, BARE_QUEUE, work, bare=True) as bares:
            await walk_bare(client, plan, 2)
            with cpu_per(count, server, bares[0].pid) as bare_cpu:
                bare = await walk_bare(client, plan, count)
        by_workers = await throughput_by_workers(
            client, engine, database_url, port, rules, count, work
        )
        timers = await timer_storm(
            client, engine, database_url, port, stack.maildir, rules, work, count=storm
        )
    # A folder of its own: its mail sink's box must not hold the thousands of emails above,
    # which the sign-in would otherwise read through to find its link.
    scale = await measure_open_referrals(work / "scale", open_count)
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
        "lifecycles_per_s_by_workers": by_workers,
        "cpu_ms_per_lifecycle": {"project": project_cpu, "bare": bare_cpu},
        "intake_rps": round(intake.per_second, 1),
        "intake_p99_ms": percentiles(intake.latency_ms)["p99"],
        "intake_errors": sum(intake.errors.values()),
        "intake_latency_ms": percentiles(intake.latency_ms),
        "intake_posts": posts,
        "intake_errors_by_status": {str(k): v for k, v in intake.errors.items()},
        "intake_alone": {
            "rps": round(intake_alone.per_second, 1),
            "latency_ms": percentiles(intake_alone.latency_ms),
            "errors": sum(intake_alone.errors.values()),
        },
        "timer_storm": {
            "referrals": timers["referrals"],
            "all_delivered_s": timers["all_delivered_s"],
            "p50_delivered_s": timers["p50_delivered_s"],
            "reminders_delivered": timers["reminders_delivered"],
            "idle_before_storm": timers["idle_before_storm"],
        },
        "open_referrals": scale["open_referrals"],
        "worker_rss_mib": timers["worker_rss_mib"],
        "worker_rss_before_mib": timers["worker_rss_before_mib"],
        "cached_referrals": timers["open_referrals"],
        "memory_per_cached_referral_kib": timers["memory_per_cached_referral_kib"],
        "list_first_page_ms": scale["list_first_page_ms"],
        "list_cli_ms": scale["list_cli_ms"],
        "cli_ms": {command: timing["p50"] for command, timing in cli.items()},
        "cli_latency_ms": cli,
        "dashboard_ms": scale["dashboard_ms"],
        "dashboard_with_charts_ms": scale["dashboard_with_charts_ms"],
        "dashboard_after_change_ms": scale["dashboard_after_change_ms"],
        "lifecycle_shape": {"updates": plan.updates, "writes": plan.writes, "emails": plan.emails},
        "lifecycle_history": {
            "events": len(history.events),
            "json_bytes": len(history.to_json().encode()),
            "payload_bytes": payload_bytes(history),
        },
    }


def table(results: dict[str, Any]) -> str:
    update, bare = results["update_latency_ms"], results["bare_update_latency_ms"]
    rows = [
        ("lifecycles/s", results["lifecycles_per_s"], results["bare_lifecycles_per_s"]),
        ("update p50 ms", update["p50"], bare["p50"]),
        ("update p95 ms", update["p95"], bare["p95"]),
        ("update p99 ms", update["p99"], bare["p99"]),
    ]
    intake, alone = results["intake_latency_ms"], results["intake_alone"]
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
        f"({results['intake_posts']} posts); with no worker running: "
        f"{alone['rps']} posts/s, p99 {alone['latency_ms']['p99']} ms, {alone['errors']} errors"
    )
    cpu = results["cpu_ms_per_lifecycle"]
    lines.append(
        "CPU ms per lifecycle (server/worker/bench): project "
        + "/".join(str(cpu["project"][k]) for k in ("server", "worker", "bench"))
        + ", bare "
        + "/".join(str(cpu["bare"][k]) for k in ("server", "worker", "bench"))
    )
    storm, workers = results["timer_storm"], results["lifecycles_per_s_by_workers"]
    lines.append(
        f"timer storm: {storm['referrals']} reminders all delivered in "
        f"{storm['all_delivered_s']} s; worker RSS {results['worker_rss_mib']} MiB with "
        f"{results['cached_referrals']} referrals cached, "
        f"{results['memory_per_cached_referral_kib']} KiB each"
    )
    lines.append(
        f"workers: {workers['1']} lifecycles/s with one, {workers['2']} with two; "
        f"{results['open_referrals']} open referrals: list first page "
        f"{results['list_first_page_ms']} ms, dashboard {results['dashboard_ms']} ms "
        f"({results['dashboard_after_change_ms']} ms after a change)"
    )
    cli = results["cli_ms"]
    lines.append(
        f"CLI end to end, p50 of {CLI_RUNS}: show {cli['show']} ms, list {cli['list']} ms, "
        f"a staff action {cli['act']} ms"
    )
    return "\n".join(lines)


def main() -> None:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    count = int(os.environ.get("BENCH_REFERRALS") or (20 if quick else 100))
    posts = int(os.environ.get("BENCH_POSTS") or (200 if quick else 1000))
    storm = int(os.environ.get("BENCH_STORM") or (200 if quick else 2000))
    open_count = int(os.environ.get("BENCH_OPEN") or (2000 if quick else 10_000))
    results = asyncio.run(measure(count, posts, storm, open_count))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
