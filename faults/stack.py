"""The real processes under test: the Temporal dev server and the worker.

Both run as separate processes because the faults are process faults: a SIGKILLed worker
must lose its in-memory state and in-flight activities, and a stopped server must drop
every connection. Each child is its own session (so the harness signals it alone) and gets
SIGKILL if the harness dies, so even a killed suite leaves nothing running.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

from core.encryption import KEYS_ENV, KeyRing
from core.provisioning import type_name
from core.temporal import EncryptionCodec, data_converter
from devstack.ports import free_port
from workflows.policies import SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
# The checkout whose worker runs (default: this one). Pointing it at a patched copy shows
# whether a fix makes a finding go away, with the suite's own checks unchanged.
PRODUCT = Path(os.environ.get("FAULTS_PRODUCT_DIR") or ROOT).resolve()
BIN = Path(sys.executable).parent
NAMESPACE = "default"
TASK_QUEUE = "referrals"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# Making a version current: its workers must have polled every task queue first.
CURRENT_VERSION_TIMEOUT = 90.0
_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """A process did not start or stop as expected; the message says which and why."""


# Looked up once here: between fork and exec the child must not load libraries (the other
# threads of the harness may have held the loader's lock when it forked).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """Runs in the child before exec: no orphan survives a harness killed with SIGKILL."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Children:
    """Every process the suite started, so one call (or the exit path) ends them all."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, command: list[str], log: Path, env: Mapping[str, str], cwd: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(command)}\n".encode())
            out.flush()
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._processes.append(process)
        return process

    def kill_all(self) -> None:
        for process in self._processes:
            _kill_group(process)
        for process in self._processes:
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self._processes.clear()


def _kill_group(process: subprocess.Popen[bytes], signum: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass


async def _stop(process: subprocess.Popen[bytes], signum: int, seconds: float) -> None:
    """Signal, wait, and SIGKILL what is still there after `seconds`."""
    _kill_group(process, signum)
    try:
        await asyncio.to_thread(process.wait, seconds)
    except subprocess.TimeoutExpired:
        _kill_group(process, signal.SIGKILL)
        await asyncio.to_thread(process.wait, STOP_TIMEOUT)


async def wait_for(
    check: Callable[[], object], what: str, seconds: float, interval: float = 0.1
) -> None:
    """Poll `check` (sync or async) until truthy; StackError naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {seconds:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


_RUNTIME: Runtime | None = None


def _quiet_runtime() -> Runtime:
    """The suite's own client retries through outages on purpose; the SDK core warning
    about every retry would bury the table."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = Runtime(
            telemetry=TelemetryConfig(
                logging=LoggingConfig(
                    filter=TelemetryFilter(core_level="ERROR", other_level="ERROR")
                )
            )
        )
    return _RUNTIME


async def connect(address: str) -> Client:
    return await Client.connect(
        address,
        namespace=NAMESPACE,
        data_converter=data_converter(
            EncryptionCodec(KeyRing.parse(os.environ[KEYS_ENV], KEYS_ENV))
        ),
        runtime=_quiet_runtime(),
    )


class TemporalServer:
    """`temporal server start-dev` on a fixed port and database file, so a restart brings
    back the same server with everything it had persisted."""

    def __init__(self, children: Children, workdir: Path) -> None:
        self._children = children
        self.port = free_port()
        self.ui_port = free_port()
        self.db_file = workdir / "temporal.db"
        self.log = workdir / "temporal.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [
            str(BIN / "temporal"),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ui-port",
            str(self.ui_port),
            "--db-filename",
            str(self.db_file),
            "--namespace",
            NAMESPACE,
            "--log-level",
            "error",
            "--headless",
        ]
        # The workflow upserts these, so the server must know them (as `temporal setup` does).
        for key in SEARCH_ATTRIBUTES:
            command += ["--search-attribute", f"{key.name}={type_name(key)}"]
        return command

    async def start(self) -> None:
        process = self._children.spawn(self.command(), self.log, os.environ)
        self._process = process

        async def answers() -> bool:
            if process.poll() is not None:
                raise StackError(
                    f"the Temporal dev server exited with status {process.returncode} "
                    f"(log: {self.log})"
                )
            try:
                client = await connect(self.address)
                await client.workflow_service.describe_namespace(
                    DescribeNamespaceRequest(namespace=NAMESPACE)
                )
            except Exception:
                return False
            return True

        await wait_for(answers, f"the Temporal dev server on {self.address}", START_TIMEOUT, 0.2)

    async def stop(self) -> None:
        """A clean stop (SIGTERM), as an operator restarting the server would do."""
        if self._process is not None:
            await _stop(self._process, signal.SIGTERM, STOP_TIMEOUT)
            self._process = None

    async def make_current(
        self, client: Client, deployment: str, build_id: str, task_queues: list[str]
    ) -> None:
        """The operator's step of a rollout (docs/rollout.md), with the `temporal` CLI: refused
        until the version's workers have polled each of the deployment's task queues. Done
        once each of `task_queues` (workflow and activity tasks) routes to it, as matching
        says: the deployment's own `routing_config_update_state` can stay IN_PROGRESS after
        the routing has changed (seen with dev server 1.32, cf. temporalio/temporal#11842)."""
        command = [
            str(BIN / "temporal"), "worker", "deployment", "set-current-version",
            "--deployment-name", deployment, "--build-id", build_id,
            "--address", self.address, "--namespace", NAMESPACE, "--yes",
        ]  # fmt: skip
        refusals: list[str] = []

        async def made() -> bool:
            done = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, text=True, timeout=60
            )
            refusals.append(done.stderr.strip())
            return done.returncode == 0

        async def routed() -> bool:
            for name in task_queues:
                for kind in (
                    TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                    TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
                ):
                    described = await client.workflow_service.describe_task_queue(
                        DescribeTaskQueueRequest(
                            namespace=NAMESPACE,
                            task_queue=TaskQueue(name=name),
                            task_queue_type=kind,
                        )
                    )
                    current = described.versioning_info.current_deployment_version
                    if (current.deployment_name, current.build_id) != (deployment, build_id):
                        return False
            return True

        what = f"version {build_id} of {deployment!r} to become current"
        try:
            await wait_for(made, what, CURRENT_VERSION_TIMEOUT, 1.0)
        except StackError as error:
            raise StackError(f"{error}; the CLI said: {refusals[-1]}") from None
        await wait_for(
            routed, f"{', '.join(task_queues)} to route to {build_id}", CURRENT_VERSION_TIMEOUT, 0.5
        )


class Worker:
    """`python -m worker`, configured only through its environment, as in production.
    `module`: another entry point that runs the same worker (faults.previous_release)."""

    READY = b"worker polling task queue"

    def __init__(
        self,
        children: Children,
        workdir: Path,
        env: Mapping[str, str],
        name: str = "worker",
        module: str = "worker",
    ) -> None:
        self._children = children
        self._env = {**os.environ, **env}
        self.name = name
        self.module = module
        self.log = workdir / f"{name}.log"
        self.starts = 0
        self.kills = 0
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        process = self._children.spawn(
            [sys.executable, "-m", self.module], self.log, self._env, cwd=PRODUCT
        )
        self._process = process
        self.starts += 1

        def ready() -> bool:
            if process.poll() is not None:
                tail = self.log.read_bytes()[offset:].decode(errors="replace").strip()[-2000:]
                raise StackError(f"the worker exited with status {process.returncode}:\n{tail}")
            with self.log.open("rb") as log:
                log.seek(offset)
                return self.READY in log.read()

        await wait_for(ready, "the worker to poll its task queue", START_TIMEOUT, 0.1)

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_text(self, since: int = 0) -> str:
        """What the worker logged from byte `since` on (its activity failures, crashes)."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def kill(self) -> None:
        """SIGKILL: no draining, in-flight activities are lost with the process."""
        if self._process is not None:
            await _stop(self._process, signal.SIGKILL, STOP_TIMEOUT)
            self._process = None
            self.kills += 1

    async def stop(self, seconds: float = STOP_TIMEOUT) -> bool:
        """SIGTERM, and SIGKILL after `seconds`. True if it stopped before that."""
        if self._process is None:
            return True
        process, self._process = self._process, None
        await _stop(process, signal.SIGTERM, seconds)
        return process.returncode != -signal.SIGKILL

    def check_alive(self) -> None:
        """A worker that died on its own is a finding, not something to restart quietly."""
        if self._process is not None and self._process.poll() is not None:
            raise StackError(
                f"the worker died on its own (status {self._process.returncode}; log: {self.log})"
            )
