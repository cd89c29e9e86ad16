"""Timer storm: `count` referrals whose contact reminders fall due at one instant T, and the
time from T until every reminder email is in the SMTP sink; with the worker's RSS before and
after the referrals are open and cached.

    await timer_storm(client, engine, database_url, smtp_port, maildir, rules, workdir,
                      count=2000, namespace="default", profile=None, margin_s=None) -> dict
        {"referrals", "all_delivered_s", "first_delivered_s", "p50_delivered_s",
         "reminders_delivered", "start_s", "margin_s", "idle_before_storm", "open_referrals",
         "worker_rss_mib", "worker_rss_before_mib", "memory_per_cached_referral_kib",
         "max_cached_workflows"}

The worker is the real one in its own process (bench/workers.py), on a queue of its own, with
max_cached_workflows above `count`. Each referral goes through the intake's own
submit_referral (claim, record, ReferralInput, workflow start); only its contact window is
moved: reminder at T, deadline a day later. T is set far enough ahead (`margin_s`, default
30 s + 0.08 s a referral) that all are started, their submission emails delivered and the
worker idle (then gc) before it: `idle_before_storm` says whether that held. The storm's
referrals are left open (on a queue no worker polls once the function returns).
`open_referrals`: running workflows on the storm's queue when the RSS was read (the storm's
and the warm-up's).

    python -m bench.storm [COUNT] [--walks N] [--skip-workers] [--profile OUT.svg|OUT.txt]

runs it on its own dev server, SQLite file and sink, then throughput_by_workers (bench/workers.py)
with N lifecycles, and prints the results as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

from sqlalchemy.engine import Engine
from temporalio.client import Client

from bench.stack import bench_stack
from bench.workers import WorkerProcess, throughput_by_workers
from devstack.factories import submission_data
from devstack.settings import SETTINGS
from starter.contact_window import contact_window
from starter.intake import parse_submission, submit_referral
from workflows.models.program import CalendarRules, ContactRules, ProgramRules
from workflows.models.referral import ContactWindow

REMINDER = "staff_contact_reminder"
WARM = 20  # warm-up referrals (normal contact window): imports, sandbox, caches
CONCURRENT_STARTS = 50
_KEY = re.compile(rb"^X-Idempotency-Key:\s*(\S+)", re.MULTILINE | re.IGNORECASE)


class Maildir:
    """The sink's delivered messages by idempotency key (`<referral>/<template>...`), each with
    its delivery time (the file's mtime); only files not seen before are read."""

    def __init__(self, path: Path) -> None:
        self.new = path / "new"
        self._seen: dict[str, tuple[str, float]] = {}

    def scan(self) -> list[tuple[str, float]]:
        for entry in os.scandir(self.new):
            if entry.name in self._seen:
                continue
            with open(entry.path, "rb") as file:
                head = file.read(4096)
            found = _KEY.search(head.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0])
            key = found.group(1).decode() if found else ""
            self._seen[entry.name] = (key, entry.stat().st_mtime)
        return list(self._seen.values())

    def by_referral(self, ids: set[str]) -> list[tuple[str, float]]:
        return [(k, at) for k, at in self.scan() if k.split("/", 1)[0] in ids]


async def _submit(
    client: Client, engine: Engine, rules: ProgramRules, count: int, queue: str
) -> list[str]:
    gate = asyncio.Semaphore(CONCURRENT_STARTS)
    settings = dataclasses.replace(SETTINGS, task_queue=queue)

    async def one() -> str:
        data = submission_data(**{"prospect.website": f"s-{uuid.uuid4().hex[:12]}.example"})
        async with gate:
            return await submit_referral(client, engine, rules, parse_submission(data), settings)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _delivered(maildir: Maildir, ids: set[str], emails: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while len(maildir.by_referral(ids)) < emails:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


async def _profiler(
    pid: int, out: Path, due: datetime, seconds: float
) -> asyncio.subprocess.Process:
    await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds() - 1))
    spy = str(Path(sys.executable).parent / "py-spy")
    return await asyncio.create_subprocess_exec(
        *(spy, "record", "-p", str(pid), "-o", str(out), "-d", str(int(seconds) + 1)),
        *(
            "--rate",
            "50",
            "--nonblocking",
            "--gil",
            "--format",
            "raw" if out.suffix == ".txt" else "flamegraph",
        ),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def timer_storm(
    client: Client,
    engine: Engine,
    database_url: str,
    smtp_port: int,
    maildir: Path,
    rules: ProgramRules,
    workdir: Path,
    count: int = 2000,
    namespace: str = "default",
    profile: Path | None = None,
    margin_s: float | None = None,
) -> dict[str, Any]:
    """`margin_s`: from the start of the storm's submissions to T (default 30 s + 0.08 s a
    referral). `profile`: py-spy records the worker from just before T into this file (installed
    separately): a flame graph (SVG), or collapsed stacks if it ends in .txt."""
    queue = f"bench-storm-{uuid.uuid4().hex[:6]}"
    address = client.service_client.config.target_host
    cached = count + WARM + 100
    worker = WorkerProcess(
        address, database_url, smtp_port, queue, workdir, cached, namespace, name="storm"
    )
    mail = Maildir(maildir)
    await worker.start()
    try:
        warm = set(await _submit(client, engine, rules, WARM, queue))
        await worker.settle()
        per_referral = len(mail.by_referral(warm)) // WARM
        assert per_referral > 0, "the warm-up referrals sent no email"
        before = worker.rss_kib()
        # All started, emailed and idle before T: the worker handles some 25 referrals'
        # starts a second on two cores (it falls behind the starts, which go faster).
        margin = margin_s if margin_s is not None else 30 + 0.08 * count
        due = datetime.now(UTC) + timedelta(seconds=margin)

        def storm_window(
            received_at: datetime, calendar: CalendarRules, contact: ContactRules
        ) -> ContactWindow:
            window = contact_window(received_at, calendar, contact)
            return window.model_copy(
                update={"reminder_at": due, "deadline": due + timedelta(days=1)}
            )

        started = time.monotonic()
        with mock.patch("starter.intake.contact_window", storm_window):
            ids = set(await _submit(client, engine, rules, count, queue))
        start_s = time.monotonic() - started
        remaining = (due - datetime.now(UTC)).total_seconds()
        await _delivered(mail, ids, per_referral * count, max(remaining, 0))
        await worker.settle()
        idle = datetime.now(UTC) < due
        after = worker.rss_kib()
        running = await client.count_workflows(
            f'TaskQueue = "{queue}" AND ExecutionStatus = "Running"'
        )

        # The storm: every reminder, from T.
        limit = max(120.0, count * 0.5)
        spy = None
        if profile is not None:
            spy = await _profiler(worker.pid, profile, due, limit)
        wait_until = max(0.0, (due - datetime.now(UTC)).total_seconds()) + limit
        expected = per_referral * count + count
        await _delivered(mail, ids, expected, wait_until)
        reminders = sorted(at for key, at in mail.by_referral(ids) if key.endswith(f"/{REMINDER}"))
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            await spy.wait()
    finally:
        await worker.stop()
    t0 = due.timestamp()
    return {
        "referrals": count,
        "all_delivered_s": round(reminders[-1] - t0, 2) if len(reminders) == count else None,
        "first_delivered_s": round(reminders[0] - t0, 2) if reminders else None,
        "p50_delivered_s": round(statistics.median(reminders) - t0, 2) if reminders else None,
        "reminders_delivered": len(reminders),
        "start_s": round(start_s, 2),
        "margin_s": round(margin, 1),
        "idle_before_storm": idle,
        "open_referrals": running.count,
        "worker_rss_before_mib": round(before / 1024, 1),
        "worker_rss_mib": round(after / 1024, 1),
        "memory_per_cached_referral_kib": round((after - before) / count, 1),
        "max_cached_workflows": cached,
    }


async def _run(count: int, walks: int, workers: bool, profile: Path | None) -> dict[str, Any]:
    async with bench_stack("referral-storm-") as stack:
        results: dict[str, Any] = {"workdir": str(stack.work)}
        results["timer_storm"] = await timer_storm(
            stack.client,
            stack.engine,
            stack.database_url,
            stack.smtp_port,
            stack.maildir,
            stack.rules,
            stack.work,
            count,
            profile=profile,
        )
        print(json.dumps(results["timer_storm"]), file=sys.stderr, flush=True)
        if workers:
            results["lifecycles_per_s_by_workers"] = await throughput_by_workers(
                stack.client,
                stack.engine,
                stack.database_url,
                stack.smtp_port,
                stack.rules,
                walks,
                stack.work,
            )
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("count", type=int, nargs="?", default=2000)
    parser.add_argument("--walks", type=int, default=50, help="lifecycles per worker count")
    parser.add_argument("--skip-workers", action="store_true")
    parser.add_argument("--profile", type=Path, help="py-spy of the storm: OUT.svg or OUT.txt")
    args = parser.parse_args()
    results = asyncio.run(_run(args.count, args.walks, not args.skip_workers, args.profile))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
