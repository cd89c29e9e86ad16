"""`python -m faults`: every fault scenario, one table row each, and a verdict line.

Each row also has the staff updates' answer times (seconds, every retry of an update
included): p50 and p99 of those sent while the fault was active, and of all of them; a line
under the table pools every scenario's. The last line is machine-readable
(`faults: S scenarios, R referrals, L lost, D duplicated`) and the exit status is 0 only
when nothing was lost or duplicated and no scenario crashed, so CI can run it as is.
Everything it starts or writes is removed on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from temporalio.client import RPCTimeoutOrCancelledError, WorkflowUpdateRPCTimeoutOrCancelledError

from core.actor_assertions import SIGNING_KEY_ENV, TRUSTED_KEYS_ENV, SigningKey
from core.encryption import KEYS_ENV, new_key_entry
from faults.database import Backend
from faults.scenarios import SCENARIOS, Outcome, run_scenario
from faults.stack import Children, process_running

MIN_REFERRALS = 20
WORKDIR_PREFIX = "referral-faults-"
PROBLEMS_SHOWN = 20
COLUMNS = (
    "scenario",
    "referrals",
    "faults injected",
    "lost",
    "duplicated",
    "recover s",
    "staff retries",
    "updates in fault",
    "p50 s",
    "p99 s",
    "all p50 s",
    "all p99 s",
    "wall s",
)
WIDTHS = [17, 9, 92, 4, 10, 9, 13, 16, 5, 5, 9, 9, 6]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[s.name for s in SCENARIOS],
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--referrals",
        type=int,
        default=MIN_REFERRALS,
        help=f"referrals per scenario (default {MIN_REFERRALS})",
    )
    parser.add_argument(
        "--sqlite",
        action="store_true",
        help="use SQLite even when REFERRALS_TEST_POSTGRES_URL is set",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, databases)"
    )
    parser.add_argument("--seed", type=int, default=7, help="pacing of staff actions")
    return parser.parse_args(argv)


def _quiet_about_cancelled_calls(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An interrupted run cancels staff actions in flight; the SDK then leaves their inner
    tasks failed with "cancelled" and unobserved. That is the interruption, not a finding."""
    if isinstance(
        context.get("exception"),
        WorkflowUpdateRPCTimeoutOrCancelledError | RPCTimeoutOrCancelledError,
    ):
        return
    loop.default_exception_handler(context)


def percentile(seconds: list[float], share: float) -> float | None:
    """Nearest rank: the smallest value at least `share` of them do not exceed."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def latency(seconds: list[float], share: float) -> str:
    value = percentile(seconds, share)
    return "-" if value is None else f"{value:.2f}"


def row(values: tuple[str, ...], widths: list[int]) -> str:
    return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()


def cells(outcome: Outcome) -> tuple[str, ...]:
    recovery = "-" if outcome.recovery_seconds is None else f"{outcome.recovery_seconds:.1f}"
    faults = f"CRASHED: {outcome.crashed}" if outcome.crashed else outcome.faults
    return (
        outcome.name,
        str(outcome.referrals),
        faults,
        str(outcome.lost),
        str(outcome.duplicated),
        recovery,
        str(outcome.staff_retries),
        str(len(outcome.updates_in_fault)),
        latency(outcome.updates_in_fault, 0.50),
        latency(outcome.updates_in_fault, 0.99),
        latency(outcome.updates, 0.50),
        latency(outcome.updates, 0.99),
        f"{outcome.seconds:.0f}",
    )


async def run(args: argparse.Namespace, root: Path, children: Children) -> int:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        loop.add_signal_handler(signum, main.cancel)
    loop.set_exception_handler(_quiet_about_cancelled_calls)
    backend = await asyncio.to_thread(Backend.from_env(force_sqlite=args.sqlite).prepare)
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    outcomes: list[Outcome] = []
    print(f"fault suite: {len(chosen)} scenarios, {backend.name} database", flush=True)
    print(row(COLUMNS, WIDTHS), flush=True)
    print("-+-".join("-" * w for w in WIDTHS), flush=True)
    started = time.monotonic()
    try:
        for number, scenario in enumerate(chosen):
            outcome = await run_scenario(
                scenario, backend, children, root, args.referrals, args.seed + number
            )
            outcomes.append(outcome)
            print(row(cells(outcome), WIDTHS), flush=True)
    finally:
        await asyncio.to_thread(backend.drop)
    in_fault = [s for o in outcomes for s in o.updates_in_fault]
    every = [s for o in outcomes for s in o.updates]
    print(
        f"staff updates, all scenarios: {len(in_fault)} in a fault, p50 "
        f"{latency(in_fault, 0.50)} s, p99 {latency(in_fault, 0.99)} s; {len(every)} in all, "
        f"p50 {latency(every, 0.50)} s, p99 {latency(every, 0.99)} s",
        flush=True,
    )
    problems = [(o.name, p) for o in outcomes for p in o.problems[:PROBLEMS_SHOWN]]
    if problems:
        print("\nfindings:")
        for name, problem in problems:
            print(f"  {name}: {problem}")
    lost = sum(o.lost for o in outcomes)
    duplicated = sum(o.duplicated for o in outcomes)
    crashed = sum(1 for o in outcomes if o.crashed)
    print(
        f"\nwall time {time.monotonic() - started:.0f}s"
        + (f", {crashed} crashed" if crashed else "")
    )
    referrals = sum(o.referrals for o in outcomes)
    print(
        f"faults: {len(outcomes)} scenarios, {referrals} referrals, {lost} lost, "
        f"{duplicated} duplicated",
        flush=True,
    )
    return 0 if lost == 0 and duplicated == 0 and crashed == 0 else 1


def remove_left_behind() -> None:
    """Work directories of runs killed too hard to clean up (their process is gone)."""
    for path in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = path.name.removeprefix(WORKDIR_PREFIX).partition("-")[0]
        if path.is_dir() and pid.isdigit() and not process_running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.referrals < 1:
        print("--referrals must be at least 1", file=sys.stderr)
        return 2
    remove_left_behind()
    # One key ring for the suite and every worker it starts, as a deployment configures it;
    # the driver signs staff actions as the web desk does, with a key the workers trust.
    os.environ.setdefault(KEYS_ENV, new_key_entry())
    signing = SigningKey.parse(
        os.environ.setdefault(SIGNING_KEY_ENV, SigningKey.new("faults", "desk").text())
    )
    os.environ.setdefault(TRUSTED_KEYS_ENV, signing.trusted_entry())
    root = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    children = Children()

    def clean_up() -> None:
        children.kill_all()
        if args.keep:
            print(f"work directory kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(clean_up)  # also when something below raises past us
    try:
        return asyncio.run(run(args, root, children))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nfaults: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        clean_up()
        atexit.unregister(clean_up)


if __name__ == "__main__":
    sys.exit(main())
