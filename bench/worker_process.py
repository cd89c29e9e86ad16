"""One real referral worker in its own process, for the bench: its RSS is the worker's own.

    python -m bench.worker_process --address HOST:PORT --database URL --smtp-port PORT \
        --queue QUEUE [--namespace default] [--smtp-host 127.0.0.1] [--max-cached N] [--bare]

Connects with core.temporal.data_converter() (REFERRALS_ENCRYPTION_KEYS must be the same in
every process: bench/workers.py sets it once in the parent before spawning), opens the
database, builds the worker with worker.build_worker(..., max_cached_workflows=N) and polls
until SIGTERM or SIGINT. Prints READY (with the pid) once it polls; SIGUSR1 runs a full
garbage collection and prints GC_DONE, so the parent can read an RSS after gc. `--bare` runs
the baseline's worker instead (bench/bare.py), so both are measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from activities.schema import open_database
from bench.bare import BareLifecycle, bare_noop
from core.program import load_program
from core.settings import Settings, SmtpSettings
from core.temporal import data_converter, payload_codec
from worker import ACTIVITY_THREADS, build_worker, workflow_runner

READY = "bench worker ready"
GC_DONE = "bench worker gc done"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--database", required=True, help="SQLAlchemy URL, at the current schema")
    parser.add_argument("--smtp-host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--max-cached", type=int, default=1000, help="max_cached_workflows")
    parser.add_argument("--program", default=None, help="program.yaml (retention period only)")
    parser.add_argument(
        "--bare", action="store_true", help="the baseline's worker (bench/bare.py), no database"
    )
    return parser.parse_args(argv)


def bare_worker(client: Client, queue: str, max_cached: int) -> Worker:
    """The baseline's worker: like the project's (same workflow runner, same activity threads)."""
    return Worker(
        client,
        task_queue=queue,
        workflows=[BareLifecycle],
        activities=[bare_noop],
        workflow_runner=workflow_runner(),
        activity_executor=ThreadPoolExecutor(max_workers=ACTIVITY_THREADS),
        max_concurrent_activities=ACTIVITY_THREADS,
        max_cached_workflows=max_cached,
    )


async def serve(args: argparse.Namespace) -> None:
    settings = dataclasses.replace(
        Settings.from_env(),  # the payload key and secret the bench shares with its workers
        smtp=SmtpSettings(args.smtp_host, args.smtp_port),
        task_queue=args.queue,
        program_path=Path(args.program) if args.program else Path("program.yaml"),
    )
    client = await Client.connect(
        args.address,
        namespace=args.namespace,
        data_converter=data_converter(payload_codec(settings)),
    )
    engine = None if args.bare else open_database(args.database)
    if engine is None:
        worker = bare_worker(client, args.queue, args.max_cached)
    else:
        worker = build_worker(
            client,
            engine,
            settings,
            rules=load_program(settings.program_path),
            max_cached_workflows=args.max_cached,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def collect() -> None:
        gc.collect()
        print(GC_DONE, flush=True)

    loop.add_signal_handler(signal.SIGUSR1, collect)
    async with worker:
        print(f"{READY} pid={os.getpid()} queue={args.queue}", flush=True)
        await stop.wait()
    if engine is not None:
        engine.dispose()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
