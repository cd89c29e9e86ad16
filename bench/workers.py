"""The real worker in separate processes, for measurements that need its own process (RSS) or
more than one worker (throughput with 1 and 2 workers on one task queue).

    WorkerProcess(address, database_url, smtp_port, queue, workdir, max_cached=1000,
                  namespace="default")
        await start() / stop() / kill(); pid; rss_kib(); cpu_seconds(); await collect_garbage()
    rss_kib(pid) -> int                       VmRSS of a process, from /proc/<pid>/status
    async with worker_processes(count, address, database_url, smtp_port, queue, workdir,
                                max_cached=1000) as workers: ...
    await throughput_by_workers(client, engine, database_url, smtp_port, rules, count, workdir,
                                namespace="default") -> {"1": lifecycles/s, "2": lifecycles/s}

Every process shares the payload key and secret of tests/conftest.py, which puts them in the
environment the workers inherit.
The workers' logs go to `workdir/worker-<queue>-<n>.log`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy.engine import Engine
from temporalio.client import Client

from bench.lifecycle import walk_referrals
from bench.worker_process import GC_DONE, READY
from faults.stack import ROOT, Children, StackError, wait_for
from workflows.models.program import ProgramRules

START_SECONDS = 60.0
STOP_SECONDS = 90.0  # graceful shutdown lets in-flight activities finish (worker.py: 75 s)


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(address: str) -> int:
    """The pid of the dev server listening on `address` (`temporal server start-dev`)."""
    port = address.rpartition(":")[2]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start-dev" in args and port.encode() in args:
            return int(proc.name)
    raise RuntimeError(f"no dev server on {address}")


class WorkerProcess:
    """`python -m bench.worker_process`: one real worker, in its own process and session."""

    def __init__(
        self,
        address: str,
        database_url: str,
        smtp_port: int,
        queue: str,
        workdir: Path,
        max_cached: int = 1000,
        namespace: str = "default",
        name: str = "worker",
        children: Children | None = None,
        bare: bool = False,
    ) -> None:
        """`bare`: the baseline's worker (bench/bare.py) instead of the project's."""
        self.command = [
            sys.executable,
            "-m",
            "bench.worker_process",
            "--address",
            address,
            "--namespace",
            namespace,
            "--database",
            database_url,
            "--smtp-port",
            str(smtp_port),
            "--queue",
            queue,
            "--max-cached",
            str(max_cached),
            *(["--bare"] if bare else []),
        ]
        self.log = workdir / f"{name}-{queue}.log"
        self._children = children or Children()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def _log_after(self, offset: int) -> bytes:
        with self.log.open("rb") as log:
            log.seek(offset)
            return log.read()

    async def _wait_line(self, line: str, offset: int, what: str) -> None:
        process = self._process
        assert process is not None

        def seen() -> bool:
            if process.poll() is not None:
                tail = self._log_after(offset).decode(errors="replace")[-2000:]
                raise StackError(f"the bench worker exited ({process.returncode}):\n{tail}")
            return line.encode() in self._log_after(offset)

        await wait_for(seen, what, START_SECONDS, 0.1)

    async def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = self._children.spawn(self.command, self.log, env, cwd=ROOT)
        await self._wait_line(READY, offset, f"the bench worker to poll ({self.log})")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    async def collect_garbage(self) -> None:
        """gc.collect() in the worker (SIGUSR1), awaited."""
        offset = self.log.stat().st_size
        os.kill(self.pid, signal.SIGUSR1)
        await self._wait_line(GC_DONE, offset, "the bench worker's gc")

    async def settle(self, quiet_cpu: float = 0.05, interval: float = 1.0) -> None:
        """Until the worker uses under `quiet_cpu` of a core over `interval`, then gc."""
        before = self.cpu_seconds()
        while True:
            await asyncio.sleep(interval)
            now = self.cpu_seconds()
            if now - before < quiet_cpu * interval:
                break
            before = now
        await self.collect_garbage()
        await asyncio.sleep(0.5)

    async def _end(self, signum: int, seconds: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signum)
        try:
            await asyncio.to_thread(process.wait, seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, seconds)

    async def stop(self) -> None:
        """SIGTERM: in-flight activities finish, then the process exits."""
        await self._end(signal.SIGTERM, STOP_SECONDS)

    async def kill(self) -> None:
        await self._end(signal.SIGKILL, STOP_SECONDS)


@asynccontextmanager
async def worker_processes(
    count: int,
    address: str,
    database_url: str,
    smtp_port: int,
    queue: str,
    workdir: Path,
    max_cached: int = 1000,
    namespace: str = "default",
    bare: bool = False,
) -> AsyncIterator[list[WorkerProcess]]:
    """`count` bench workers polling `queue`, started together, stopped (SIGTERM) on exit;
    `bare`: the baseline's."""
    children = Children()
    workers = [
        WorkerProcess(
            address,
            database_url,
            smtp_port,
            queue,
            workdir,
            max_cached,
            namespace,
            name=f"worker{n + 1}",
            children=children,
            bare=bare,
        )
        for n in range(count)
    ]
    try:
        await asyncio.gather(*(w.start() for w in workers))
        yield workers
    finally:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        children.kill_all()


async def throughput_by_workers(
    client: Client,
    engine: Engine,
    database_url: str,
    smtp_port: int,
    rules: ProgramRules,
    count: int,
    workdir: Path,
    namespace: str = "default",
) -> dict[str, float]:
    """Lifecycles/s (bench.lifecycle.walk_referrals: `count` referrals at once, submission to
    paid) with 1 and with 2 worker processes on one task queue each (a fresh queue per
    measurement). `rules` as for walk_referrals (clawback days 0, so payout closes)."""
    address = client.service_client.config.target_host
    results: dict[str, float] = {}
    for workers in (1, 2):
        queue = f"bench-workers{workers}-{uuid.uuid4().hex[:6]}"
        async with worker_processes(
            workers, address, database_url, smtp_port, queue, workdir, namespace=namespace
        ):
            await walk_referrals(client, engine, rules, 2 * workers, queue)  # warm every worker
            run = await walk_referrals(client, engine, rules, count, queue)
        results[str(workers)] = round(run.per_second, 2)
    return results
