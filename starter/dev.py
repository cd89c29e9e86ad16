"""`referrals dev`: the whole local stack in one command, stopped together by Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict

from activities.db import make_engine
from activities.schema import upgrade
from core.metrics import HOST_ENV, PORT_ENV
from core.program import ProgramError, load_program
from core.provisioning import setup
from core.settings import (
    DEV_DATA,
    DEV_DATABASE,
    Settings,
    SettingsError,
    create_dev_files,
    parse_port,
)
from core.temporal import connect_for_operations
from worker import GRACEFUL_SHUTDOWN
from workflows.models.program import ProgramRules

BIN = Path(sys.executable).parent
WEB_PORT_ENV = "REFERRALS_WEB_METRICS_PORT"
STOP_TIMEOUT = GRACEFUL_SHUTDOWN + timedelta(seconds=15)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TemporalSettings(Strict):
    ip: str = "127.0.0.1"
    port: int = 7233
    ui_port: int = 8233
    namespace: str = "default"
    db_filename: Path = Path(".data/temporal.db")
    log_level: Literal["debug", "info", "warn", "error"] = "warn"
    # How long Temporal keeps a closed referral's workflow. Staff and referrers read the
    # database, so this only bounds how long operators can inspect a closed run in the UI.
    retention_days: int = 30


class MailSinkSettings(Strict):
    host: str = "127.0.0.1"
    port: int = 1025
    maildir: Path = Path(".data/mail")


class WebSettings(Strict):
    host: str = "127.0.0.1"
    port: int = 8000


class CodecServerSettings(Strict):
    host: str = "127.0.0.1"
    port: int = 8081


class MetricsSettings(Strict):
    """Prometheus metrics: the worker's (Temporal's and the program's) and the web app's."""

    host: str = "127.0.0.1"
    worker_port: int = 9464
    web_port: int = 9465


class DevStack(Strict):
    temporal: TemporalSettings = TemporalSettings()
    mail_sink: MailSinkSettings = MailSinkSettings()
    web: WebSettings = WebSettings()
    codec_server: CodecServerSettings = CodecServerSettings()
    metrics: MetricsSettings = MetricsSettings()


def load_stack(path: Path = Path("temporal-dev.yaml")) -> DevStack:
    return DevStack.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def _listening(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def _wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not _listening(host, port):
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {host}:{port} after {seconds:.0f}s")
        time.sleep(0.2)


def server_command(stack: DevStack) -> list[str]:
    t = stack.temporal
    command = [
        str(BIN / "temporal"),
        "server",
        "start-dev",
        "--ip",
        t.ip,
        "--port",
        str(t.port),
        "--ui-port",
        str(t.ui_port),
        "--db-filename",
        str(t.db_filename),
        "--namespace",
        t.namespace,
        "--log-level",
        t.log_level,
        "--ui-disable-news-fetch",
        "--ui-codec-endpoint",
        f"http://{stack.codec_server.host}:{stack.codec_server.port}",
    ]
    return command


def set_retention(stack: DevStack) -> None:
    """The dev server's namespace keeps closed workflows 24 hours unless told otherwise."""
    t = stack.temporal
    command = [
        str(BIN / "temporal"),
        "operator",
        "namespace",
        "update",
        "--namespace",
        t.namespace,
        "--retention",
        f"{t.retention_days * 24}h",
        "--address",
        f"{t.ip}:{t.port}",
    ]
    for _ in range(20):  # the namespace exists a moment after the port opens
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"could not set the namespace retention: {done.stderr.strip()}")


async def _provision(settings: Settings, t: TemporalSettings, rules: ProgramRules) -> list[str]:
    local = replace(
        settings, temporal={"target_host": f"{t.ip}:{t.port}", "namespace": t.namespace}
    )
    return await setup(await connect_for_operations(local), rules, settings.task_queue, None)


def metrics_ports(stack: DevStack) -> tuple[str, dict[str, str]]:
    """The metrics host, and REFERRALS_METRICS_PORT / REFERRALS_WEB_METRICS_PORT for the worker
    and the web app: the environment's, else the stack's; "off" for a port already in use
    (metrics are worth a warning, not a stack that will not start)."""
    host = os.environ.get(HOST_ENV) or stack.metrics.host
    ports: dict[str, str] = {}
    for variable, default, what in [
        (PORT_ENV, stack.metrics.worker_port, "worker"),
        (WEB_PORT_ENV, stack.metrics.web_port, "web app"),
    ]:
        port = parse_port(os.environ.get(variable, str(default)), variable)
        if port is not None and _listening(host, port):
            print(
                f"referrals dev: {host}:{port} is in use: the {what} runs without metrics",
                file=sys.stderr,
            )
            port = None
        ports[variable] = "off" if port is None else str(port)
    return host, ports


def _metrics_url(host: str, port: str) -> str:
    return "off" if port == "off" else f"http://{host}:{port}/metrics"


def keep_private(data: Path) -> None:
    """The stack's data (referrers' personal data, unexpired sign-in links in the mail files,
    the keys) readable by this user only: what exists made so (a checkout from before this
    rule), and what the stack and its processes create from now on made so by the umask."""
    os.umask(0o077)
    data.mkdir(parents=True, exist_ok=True)
    for path in [data, *data.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() else 0o600)


def run_dev(config: Path = Path("temporal-dev.yaml")) -> int:
    """The one process that creates the local stack's key, secret and database (.data/)."""
    stack = load_stack(config)
    try:
        settings = Settings.from_env()
        # A bad program.yaml stops here, before anything starts.
        rules = load_program(settings.program_path)
    except (SettingsError, ProgramError) as error:
        print(f"referrals dev: {error}", file=sys.stderr)
        return 1
    t, sink, web, codec = stack.temporal, stack.mail_sink, stack.web, stack.codec_server
    for host, port, what in [
        (t.ip, t.port, "Temporal"),
        (sink.host, sink.port, "mail sink"),
        (web.host, web.port, "web app"),
        (codec.host, codec.port, "codec server"),
    ]:
        if _listening(host, port):
            print(f"referrals dev: {host}:{port} ({what}) is already in use", file=sys.stderr)
            return 1
    try:
        metrics_host, metrics = metrics_ports(stack)
    except SettingsError as error:
        print(f"referrals dev: {error}", file=sys.stderr)
        return 1
    keep_private(DEV_DATA)
    t.db_filename.parent.mkdir(parents=True, exist_ok=True)
    create_dev_files()  # before several processes want them at once
    database = settings.database_url or f"sqlite:///{DEV_DATABASE.resolve()}"
    migrated_from, schema = upgrade(make_engine(database))
    if migrated_from != schema:
        print(f"database schema upgraded: {migrated_from or 'empty'} -> {schema}", flush=True)
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": f"{t.ip}:{t.port}",
        "TEMPORAL_NAMESPACE": t.namespace,
        "REFERRALS_SMTP_HOST": os.environ.get("REFERRALS_SMTP_HOST", sink.host),
        "REFERRALS_SMTP_PORT": os.environ.get("REFERRALS_SMTP_PORT", str(sink.port)),
        "REFERRALS_PUBLIC_URL": os.environ.get(
            "REFERRALS_PUBLIC_URL", f"http://{web.host}:{web.port}"
        ),
        "REFERRALS_DEV_MAILDIR": str(sink.maildir.resolve()),
        # Where the staff dashboard links each referral's workflow.
        "REFERRALS_TEMPORAL_UI_URL": os.environ.get(
            "REFERRALS_TEMPORAL_UI_URL", f"http://{t.ip}:{t.ui_port}"
        ),
        # The UI decodes payloads through the codec server, which answers only the UI.
        "REFERRALS_CODEC_ORIGINS": f"http://{t.ip}:{t.ui_port},http://localhost:{t.ui_port}",
        HOST_ENV: metrics_host,
        **metrics,
    }
    processes: list[subprocess.Popen[bytes]] = []
    names: dict[int, str] = {}

    def start(name: str, command: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, env=env, start_new_session=True)
        processes.append(process)
        names[process.pid] = name
        return process

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background, where it is ignored
    try:
        codec_server = start(
            "codec server",
            [sys.executable, "-m", "starter.cli", "codec-server", "--host", codec.host,
             "--port", str(codec.port)],
        )  # fmt: skip
        _wait_for_port(codec.host, codec.port, codec_server, 30)
        server = start("Temporal server", server_command(stack))
        _wait_for_port(t.ip, t.port, server, 60)
        set_retention(stack)
        # Search attributes and the nightly Schedules, as `referrals temporal setup` makes them.
        for line in asyncio.run(_provision(settings, t, rules)):
            print(f"temporal setup: {line}", flush=True)
        mail = start(
            "mail sink",
            [sys.executable, "-m", "starter.mail_sink", "--host", sink.host, "--port",
             str(sink.port), "--maildir", str(sink.maildir)]
        )  # fmt: skip
        _wait_for_port(sink.host, sink.port, mail, 30)
        start("worker", [sys.executable, "-m", "worker"])
        app = start(
            "web app",
            [
                sys.executable,
                "-m",
                "starter.cli",
                "web",
                "--host",
                web.host,
                "--port",
                str(web.port),
            ],
        )
        _wait_for_port(web.host, web.port, app, 60)
        print(
            f"""
Referral Desk is running ({rules.name}).
  Temporal server   {t.ip}:{t.port}  (namespace {t.namespace}, data in {t.db_filename},
                    closed referrals kept {t.retention_days} days; the database keeps them all)
  Temporal UI       http://{t.ip}:{t.ui_port}/namespaces/{t.namespace}/workflows
  Codec server      http://{codec.host}:{codec.port}  (payloads are encrypted; the UI decodes here)
  Worker            task queue {settings.task_queue}
  Mail sink         {sink.host}:{sink.port}, every email kept in {sink.maildir}/new
  Intake form       http://{web.host}:{web.port}/
  Referrer portal   http://{web.host}:{web.port}/me      (sign-in links arrive in the mailbox)
  Staff dashboard   http://{web.host}:{web.port}/staff   (for the addresses in staff.emails)
  Dev mailbox       http://{web.host}:{web.port}/dev/mail
  Worker metrics    {_metrics_url(metrics_host, metrics[PORT_ENV])}  (Temporal's and the program's)
  Web app metrics   {_metrics_url(metrics_host, metrics[WEB_PORT_ENV])}  (requests)
Try: referrals submit examples/referral.json   (Ctrl-C stops everything)
""",
            flush=True,
        )
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        failed = next(p for p in processes if p.poll() is not None)
        print(f"referrals dev: the {names[failed.pid]} stopped unexpectedly", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
        return 0
    except RuntimeError as error:
        print(f"referrals dev: {error}", file=sys.stderr)
        return 1
    finally:
        for process in reversed(processes):  # web app and worker first, Temporal server last
            if process.poll() is None:
                process.terminate()  # the worker lets in-flight activities finish
            try:
                process.wait(timeout=STOP_TIMEOUT.total_seconds())
            except subprocess.TimeoutExpired:
                process.kill()
