"""What every bench phase runs on: a dev server with the contract's search attributes, a
SQLite database at the current schema, and an SMTP sink in its own process, as a relay is
in production (its work shares no interpreter with the worker measured). The program's
clawback window is 0 days, so a payout closes its referral and a lifecycle is timed to its
end. Every process the bench starts shares the payload key and secret of tests/conftest.py."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.db import make_engine
from activities.schema import upgrade
from core.program import load_program
from devstack.ports import free_port
from devstack.settings import SEARCH_ATTRIBUTES, converter
from workflows.models.program import ClawbackRules, ProgramRules


@dataclass(frozen=True)
class Stack:
    client: Client
    rules: ProgramRules
    work: Path
    database_url: str
    engine: Engine
    smtp_port: int

    @property
    def address(self) -> str:
        return self.client.service_client.config.target_host

    @property
    def maildir(self) -> Path:
        return self.work / "mail"


def start_sink_process(port: int, maildir: Path) -> subprocess.Popen[bytes]:
    sink = subprocess.Popen(
        [sys.executable, "-m", "starter.mail_sink", "--port", str(port), "--maildir", maildir],
        stdout=subprocess.PIPE,
    )
    assert sink.stdout is not None
    sink.stdout.readline()  # "mail sink on …": listening
    return sink


@asynccontextmanager
async def bench_stack(prefix: str) -> AsyncIterator[Stack]:
    """The stack, in a new scratch folder named `prefix…`, which stays after it stops."""
    rules = load_program("program.yaml").model_copy(update={"clawback": ClawbackRules(days=0)})
    work = Path(tempfile.mkdtemp(prefix=prefix))
    database_url = f"sqlite:///{work / 'bench.db'}"
    engine = make_engine(database_url)
    upgrade(engine)
    port = free_port()
    sink = start_sink_process(port, work / "mail")
    try:
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
            search_attributes=SEARCH_ATTRIBUTES,
            data_converter=converter(),
        )
        try:
            yield Stack(env.client, rules, work, database_url, engine, port)
        finally:
            await env.shutdown()
    finally:
        sink.terminate()
        sink.wait()
