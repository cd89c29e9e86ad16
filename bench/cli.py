"""`cli_ms`: the staff CLI end to end, as a staff member runs it: a new process for each
command, its imports, settings and connections included. `show` of an open referral (the
system of record, then whether its workflow runs), `list` (its first page) and a staff action
(`contacted`, through the `act` update a worker applies), each `RUNS` times; p50 and p95."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from bench.lifecycle import percentiles

RUNS = 20
REFERRALS = str(Path(sys.executable).parent / "referrals")


async def timed(env: dict[str, str], cwd: Path, *args: str) -> float:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        REFERRALS, *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    elapsed = (time.perf_counter() - started) * 1000
    assert process.returncode == 0, f"referrals {' '.join(args)}: {err.decode()}"
    return elapsed


async def cli_timings(
    address: str, namespace: str, database_url: str, program: Path, cwd: Path, open_ids: list[str]
) -> dict[str, dict[str, float]]:
    """`open_ids`: at least RUNS referrals waiting for their first contact, with a worker
    running; each receives one `contacted`."""
    assert len(open_ids) >= RUNS
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_NAMESPACE": namespace,
        "REFERRALS_DATABASE_URL": database_url,
        "REFERRALS_PROGRAM": str(program),
        "REFERRALS_ACTOR": "bench",
    }
    await timed(env, cwd, "list")  # warm: the file cache, as on a desk used every day
    show = [await timed(env, cwd, "show", rid) for rid in open_ids[:RUNS]]
    listing = [await timed(env, cwd, "list") for _ in range(RUNS)]
    act = [await timed(env, cwd, "contacted", rid) for rid in open_ids[:RUNS]]
    return {"show": percentiles(show), "list": percentiles(listing), "act": percentiles(act)}
