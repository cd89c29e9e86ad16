"""`referrals temporal setup` against a bare dev server (no search attributes, 1-day
retention), as a new cluster comes: it makes the namespace as the program needs it, says what
it changed, changes nothing the second time, and follows program.yaml's time zone; a worker
refuses the namespace until it has run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
import yaml

from activities.db import make_engine
from activities.schema import upgrade
from devstack.servers import REFERRALS, dev_server
from devstack.settings import ROOT

SETUP_LINES = 1 + 6 + 3  # the namespace, six search attributes, three Schedules


@pytest_asyncio.fixture
async def bare_server() -> AsyncIterator[str]:
    async with dev_server(search_attributes=False) as env:
        yield env.client.service_client.config.target_host


def referrals(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REFERRALS, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


async def test_setup_provisions_a_bare_namespace_and_the_worker_checks_it(
    bare_server: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'referrals.db'}"
    upgrade(make_engine(url))
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": bare_server,
        "REFERRALS_DATABASE_URL": url,
        "REFERRALS_PROGRAM": str(ROOT / "program.yaml"),
        "REFERRALS_TASK_QUEUE": "provisioned",
    }

    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused
    [line] = refused.stderr.strip().splitlines()
    assert "lacks the search attributes ReferralStage (Keyword)" in line
    assert "ProtectedUntil (Datetime)" in line and "run `referrals temporal setup`" in line

    first = await asyncio.to_thread(referrals, "temporal", "setup", "--retention", "7", env=env)
    assert first.returncode == 0, first.stderr
    said = first.stdout.splitlines()
    assert len(said) == SETUP_LINES, said
    assert said[0] == "namespace default: retention changed from 1 to 7 days"
    assert "search attribute ContactSlaBreached (Bool): added" in said
    assert "schedule referrals-reconcile: created (30 3 * * * Europe/Paris; queue provisioned; " \
        "catch-up 6:00:00)" in said  # fmt: skip

    again = await asyncio.to_thread(referrals, "temporal", "setup", "--retention", "7", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == "namespace default: exists, closed workflows kept 7 days"
    assert all(("exists" in line or "unchanged" in line) for line in again.stdout.splitlines())

    # program.yaml's time zone changed: the Schedules follow it.
    rules = yaml.safe_load((ROOT / "program.yaml").read_text(encoding="utf-8"))
    rules["calendar"]["timezone"] = "Europe/Brussels"
    moved = tmp_path / "program.yaml"
    moved.write_text(yaml.safe_dump(rules, allow_unicode=True), encoding="utf-8")
    updated = await asyncio.to_thread(
        referrals, "temporal", "setup", env={**env, "REFERRALS_PROGRAM": str(moved)}
    )
    assert updated.returncode == 0, updated.stderr
    assert (
        "schedule referrals-retention: updated from 30 4 * * * Europe/Paris; queue provisioned; "
        "catch-up 6:00:00 to 30 4 * * * Europe/Brussels; queue provisioned; catch-up 6:00:00"
    ) in updated.stdout.splitlines()

    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        seen = b""
        while b"worker polling" not in seen:
            output = await asyncio.wait_for(worker.stdout.readline(), 60)
            assert output, seen.decode()
            seen += output
    finally:
        worker.terminate()
        await worker.wait()


async def test_setup_registers_a_missing_namespace(bare_server: str) -> None:
    env = {**os.environ, "TEMPORAL_ADDRESS": bare_server, "TEMPORAL_NAMESPACE": "referrals-new"}
    done = await asyncio.to_thread(referrals, "temporal", "setup", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "namespace referrals-new: registered, closed workflows kept 30 days"
    assert len(lines) == SETUP_LINES
