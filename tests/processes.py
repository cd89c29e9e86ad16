"""The program's processes as a deployment runs them, for the tests that need several at once
(a key rotation, the production-like topology): each from its command and an environment of
its own, ready once its probe says so, stopped with SIGTERM as an orchestrator stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devstack.ports import free_port
from devstack.servers import REFERRALS
from devstack.settings import ROOT


@dataclass
class Process:
    """One process: `web`, `worker` or `codec-server`, with `env` over the test run's own."""

    role: str
    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)  # its HTTP port, or its probes' (worker)
    _process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.role}-{self.port}.log"

    def command(self) -> list[str]:
        if self.role == "worker":
            return [sys.executable, "-m", "worker"]
        return [REFERRALS, self.role, "--host", "127.0.0.1", "--port", str(self.port)]

    async def start(self, seconds: float = 60) -> None:
        env = {**os.environ, **self.env}
        if self.role == "worker":
            env.update(REFERRALS_HEALTH_PORT=str(self.port), REFERRALS_HEALTH_HOST="127.0.0.1")
        probe = "/livez" if self.role == "codec-server" else "/readyz"
        with self.log.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(), env=env, cwd=ROOT, stdout=log, stderr=log
            )
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                if self._process.returncode is not None:
                    raise AssertionError(f"{self.role} exited:\n{self.log.read_text()}")
                try:
                    if (await http.get(self.url + probe)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (
                    f"{self.role} not ready:\n{self.log.read_text()}"
                )
                await asyncio.sleep(0.2)

    async def stop(self, seconds: float = 90) -> int:
        """SIGTERM, as an orchestrator stops a pod; the exit status."""
        process = self._process
        if process is None:
            return 0
        if process.returncode is not None:
            return process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), seconds)
        except TimeoutError:
            process.kill()
            return await process.wait()

    async def restart(self, **env: str) -> None:
        """Stopped, then started again with `env` changed: a rolling restart of one pod."""
        await self.stop()
        self.env.update(env)
        await self.start()
