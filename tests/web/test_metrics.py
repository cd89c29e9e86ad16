"""Prometheus metrics: the worker's (Temporal's own and the program's) on REFERRALS_METRICS_PORT,
the web app's requests on REFERRALS_WEB_METRICS_PORT; no label carries a secret or a person."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import text
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.db import make_engine
from activities.metrics import ActivityMetrics
from activities.schema import upgrade
from core.metrics import MetricsEndpoint, MetricsSettingError, worker_runtime
from core.settings import Settings, SettingsError
from devstack.factories import submission
from devstack.ports import free_port
from devstack.servers import referrals_web
from devstack.settings import ROOT, converter, settings_with
from starter.dev import DevStack, MetricsSettings, metrics_ports
from starter.intake import submit_referral
from tests.conftest import eventually
from workflows.models.program import ProgramRules
from workflows.models.referral import Stage

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$", re.MULTILINE)


def samples(exposition: str, name: str, **labels: str) -> list[float]:
    """The values of `name`'s series whose labels include `labels`."""
    found = []
    for metric, label_text, value in SAMPLE.findall(exposition):
        if metric != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', label_text or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(value))
    return found


def total(exposition: str, name: str, **labels: str) -> float:
    return sum(samples(exposition, name, **labels))


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(url)
    assert response.status_code == 200
    return response.text


class FlakyServer:
    """A mail relay that asks the first message to come back later (451), then accepts all."""

    def __init__(self) -> None:
        self.refused = 0
        self.accepted: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not self.refused:
            self.refused += 1
            return "451 4.3.0 busy, try again later"
        self.accepted.append(envelope.original_content or b"")
        return "250 accepted"


def test_metrics_settings() -> None:
    assert Settings.from_env({}).worker_metrics is None
    assert Settings.from_env({"REFERRALS_METRICS_PORT": "off"}).worker_metrics is None
    endpoint = Settings.from_env({"REFERRALS_METRICS_PORT": "9464"}).worker_metrics
    assert endpoint is not None and endpoint.url == "http://127.0.0.1:9464/metrics"
    with pytest.raises(SettingsError, match="REFERRALS_METRICS_PORT"):
        Settings.from_env({"REFERRALS_METRICS_PORT": "ninety"})


async def test_the_worker_serves_temporal_and_program_metrics(
    dev_env: WorkflowEnvironment,
    rules: ProgramRules,
    program_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`python -m worker` with REFERRALS_METRICS_PORT: a referral's first emails (one refused
    once by the relay) and its stage show up, with Temporal's own metrics."""
    database_url = f"sqlite:///{tmp_path / 'referrals.db'}"
    engine = make_engine(database_url)
    upgrade(engine)
    relay = FlakyServer()
    smtp_port = free_port()
    controller = Controller(relay, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        cwd=ROOT,
        env={
            **os.environ,
            "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
            "TEMPORAL_NAMESPACE": dev_env.client.namespace,
            "REFERRALS_TASK_QUEUE": queue,
            "REFERRALS_DATABASE_URL": database_url,
            "REFERRALS_PROGRAM": str(program_file),
            "REFERRALS_SMTP_HOST": "127.0.0.1",
            "REFERRALS_SMTP_PORT": str(smtp_port),
            "REFERRALS_METRICS_PORT": str(port),
            "REFERRALS_METRICS_REFRESH_S": "0.3",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert worker.stdout is not None
        said = b""
        while b"worker polling" not in said:
            line = await asyncio.wait_for(worker.stdout.readline(), 30)
            assert line, "the worker exited before polling"
            said += line
        assert f"metrics on {url}".encode() in said

        site = f"https://metrics-{uuid.uuid4().hex[:8]}.example/"
        referral_id = await submit_referral(
            dev_env.client,
            engine,
            rules,
            submission(**{"prospect.website": site}),
            settings_with(task_queue=queue),
        )
        exposition = ""

        async def emails_sent_and_staged() -> bool:
            nonlocal exposition
            exposition = await scrape(url)
            return (
                total(exposition, "referrals_emails_sent_total") >= 2  # referrer's, desk's
                and samples(exposition, "referrals_by_stage", stage="submitted") == [1]
            )

        await eventually(emails_sent_and_staged, 30)
        assert relay.refused == 1 and len(relay.accepted) >= 2
        assert total(exposition, "referrals_emails_sent_total", template="referrer_submitted") == 1
        assert total(exposition, "referrals_emails_failed_total") == 1
        assert total(exposition, "referrals_activity_failures_total", activity="send_email") == 1
        assert total(exposition, "referrals_ledger_retries_total") == 0
        for stage in Stage:  # every stage has its series, 0 included
            expected = 1 if stage is Stage.SUBMITTED else 0
            assert samples(exposition, "referrals_by_stage", stage=stage.value) == [expected]
        assert samples(exposition, "referrals_contact_sla_breached") == [0]
        # Temporal's own, under their default names, on the same endpoint.
        for name in (
            "temporal_workflow_task_execution_latency_count",
            "temporal_activity_execution_latency_count",
            "temporal_request",
        ):
            assert total(exposition, name) > 0, name
        # Nothing about the referral or its people in any label.
        for secret in (referral_id, site.split("/")[2], "@"):
            assert secret not in exposition

        # The gauges read the system of record: the contact promise, and closed referrals.
        with engine.begin() as connection:
            connection.execute(text("UPDATE referral SET contact_sla_breached = :t"), {"t": True})

        async def breached() -> bool:
            nonlocal exposition
            exposition = await scrape(url)
            return samples(exposition, "referrals_contact_sla_breached") == [1]

        await eventually(breached, 10)
        assert samples(exposition, "referrals_contact_overdue") == [1]
        assert samples(exposition, "referrals_contact_sla_breached_ever") == [1]
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE referral SET stage = 'cancelled', closed_at = :at"),
                {"at": datetime.now(UTC)},
            )

        async def closed() -> bool:
            nonlocal exposition
            exposition = await scrape(url)
            return samples(exposition, "referrals_by_stage", stage="cancelled") == [1]

        await eventually(closed, 10)
        assert samples(exposition, "referrals_by_stage", stage="submitted") == [0]
        assert samples(exposition, "referrals_contact_sla_breached") == [0]
        assert samples(exposition, "referrals_contact_overdue") == [0]
        assert samples(exposition, "referrals_contact_sla_breached_ever") == [1]
        refreshed = samples(exposition, "referrals_metrics_refreshed_timestamp_seconds")
        assert refreshed and abs(refreshed[0] - datetime.now(UTC).timestamp()) < 30
    finally:
        if worker.returncode is None:
            worker.terminate()
            await asyncio.wait_for(worker.wait(), 90)
        controller.stop()
        engine.dispose()


# --- the interceptor, in this process: a runtime binds its port for the process's life ------


@dataclass
class Mail:
    template: str
    to: str


@dataclass
class Attempts:
    commission: int = 0


ATTEMPTS = Attempts()


@activity.defn(name="record_commission")
def flaky_commission(referral_id: str) -> bool:
    ATTEMPTS.commission += 1
    if ATTEMPTS.commission < 3:
        raise RuntimeError("database is locked")
    return True


@activity.defn(name="send_email")
def refused_email(mail: Mail) -> str:
    raise ApplicationError("recipient refused", non_retryable=True)


@workflow.defn(name="MetricsProbe", sandboxed=False)
class MetricsProbe:
    @workflow.run
    async def run(self, referral_id: str) -> None:
        retry = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=5)
        await workflow.execute_activity(
            "record_commission",
            referral_id,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=retry,
        )
        for template in ("referrer_won", "Not a template {x}"):
            try:
                await workflow.execute_activity(
                    "send_email",
                    Mail(template=template, to="claire@fromagerie.example"),
                    start_to_close_timeout=timedelta(seconds=10),
                    retry_policy=retry,
                )
            except ActivityError:
                pass


async def test_activity_counters_on_the_runtime_endpoint(dev_env: WorkflowEnvironment) -> None:
    port = free_port()
    runtime = worker_runtime(MetricsEndpoint("127.0.0.1", port))
    with pytest.raises(MetricsSettingError):
        worker_runtime(MetricsEndpoint("127.0.0.1", port))  # taken: a clear error
    client = await Client.connect(
        dev_env.client.service_client.config.target_host,
        namespace=dev_env.client.namespace,
        data_converter=converter(),
        runtime=runtime,
    )
    queue = f"metrics-probe-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(2) as threads:
        async with Worker(
            client,
            task_queue=queue,
            workflows=[MetricsProbe],
            activities=[flaky_commission, refused_email],
            activity_executor=threads,
            workflow_runner=UnsandboxedWorkflowRunner(),
            interceptors=[ActivityMetrics()],
        ):
            await client.execute_workflow(
                MetricsProbe.run, "R-SECRET0001", id=f"probe-{uuid.uuid4()}", task_queue=queue
            )
    exposition = await scrape(f"http://127.0.0.1:{port}/metrics")
    assert ATTEMPTS.commission == 3
    assert total(exposition, "referrals_ledger_retries_total", activity="record_commission") == 2
    assert total(exposition, "referrals_activity_failures_total", activity="record_commission") == 2
    assert total(exposition, "referrals_emails_failed_total", template="referrer_won") == 1
    assert total(exposition, "referrals_emails_failed_total", template="other") == 1
    assert total(exposition, "referrals_emails_sent_total") == 0
    assert samples(
        exposition,
        "referrals_ledger_retries_total",
        task_queue=queue,
        activity_type="record_commission",
    )
    for secret in ("R-SECRET0001", "claire", "Not a template"):
        assert secret not in exposition


# --- the web app -----------------------------------------------------------------------------


async def test_the_web_app_counts_requests_by_route_template(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'referrals.db'}"
    engine = make_engine(database_url)
    upgrade(engine)
    engine.dispose()
    port = free_port()
    token = "c2VjcmV0LXRva2Vu.SECRETSIGNATURE"
    async with referrals_web(
        tmp_path,
        "/",
        REFERRALS_DATABASE_URL=database_url,
        REFERRALS_WEB_METRICS_PORT=str(port),
        REFERRALS_RATE_LIMIT="off",
    ) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            assert (await http.get(f"/status/{token}")).status_code == 404
            assert (await http.get("/no/such/page-SECRETPATH")).status_code == 404
            assert (await http.get("/static/site.css")).status_code == 200
            # The metrics are not on the public app.
            assert (await http.get("/metrics")).status_code == 404
        exposition = await scrape(f"http://127.0.0.1:{port}/metrics")
    assert "metrics on http://127.0.0.1:" in (tmp_path / "web.log").read_text()
    requests = "referrals_web_requests_total"
    assert total(exposition, requests, method="GET", route="/", status="200") >= 1
    assert total(exposition, requests, route="/status/{token}", status="404") == 1
    assert total(exposition, requests, route="unmatched", status="404") == 2  # + /metrics
    assert total(exposition, requests, route="/static/{path}", status="200") == 1
    assert (
        total(exposition, "referrals_web_request_duration_seconds_count", route="/status/{token}")
        == 1
    )
    assert total(exposition, "process_resident_memory_bytes") > 0
    for secret in ("SECRET", "c2VjcmV0", "site.css"):
        assert secret not in exposition


def test_the_dev_stack_runs_without_metrics_on_a_taken_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REFERRALS_METRICS_PORT", raising=False)
    monkeypatch.delenv("REFERRALS_WEB_METRICS_PORT", raising=False)
    monkeypatch.delenv("REFERRALS_METRICS_HOST", raising=False)
    web_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        stack = DevStack(metrics=MetricsSettings(worker_port=busy, web_port=web_port))
        host, ports = metrics_ports(stack)
    assert host == "127.0.0.1"
    assert ports == {"REFERRALS_METRICS_PORT": "off", "REFERRALS_WEB_METRICS_PORT": str(web_port)}
    assert f"127.0.0.1:{busy} is in use: the worker runs without metrics" in capsys.readouterr().err
    monkeypatch.setenv("REFERRALS_WEB_METRICS_PORT", "off")
    assert metrics_ports(stack)[1]["REFERRALS_WEB_METRICS_PORT"] == "off"
