"""`referrals dev` (what `make run` runs): comes up, sends mail, stops on Ctrl-C, keeps data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.request import urlopen

import yaml

from devstack.ports import free_port
from devstack.servers import REFERRALS
from devstack.settings import BIN, ROOT
from starter.dev import keep_private


def start_stack(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [REFERRALS, "dev", "--config", str(config)],
        cwd=config.parent,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while b"Referral Desk is running" not in log.read_bytes():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.3)
    return process


def stop_stack(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does to the foreground group
    assert process.wait(timeout=60) == 0


def referrals(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [REFERRALS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def temporal(*args: str) -> str:
    done = subprocess.run(
        [str(BIN / "temporal"), *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def stack_on_free_ports(tmp_path: Path) -> tuple[Path, dict[str, int], dict[str, str]]:
    """temporal-dev.yaml with every port free, and an environment that configures nothing
    else: keys, secret and databases are the stack's own defaults under `tmp_path`."""
    ports = {name: free_port() for name in ("temporal", "ui", "smtp", "web", "codec")}
    stack = yaml.safe_load((ROOT / "temporal-dev.yaml").read_text())
    stack["temporal"].update(port=ports["temporal"], ui_port=ports["ui"])
    stack["mail_sink"]["port"] = ports["smtp"]
    stack["web"]["port"] = ports["web"]
    stack["codec_server"]["port"] = ports["codec"]
    config = tmp_path / "temporal-dev.yaml"
    config.write_text(yaml.safe_dump(stack))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "REFERRALS_"))},
        "REFERRALS_PROGRAM": str(ROOT / "program.yaml"),
    }
    return config, ports, env


def test_dev_stack_runs_stops_and_keeps_referrals(tmp_path: Path) -> None:
    config, ports, env = stack_on_free_ports(tmp_path)
    client_env = {**env, "TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}"}
    process = start_stack(config, env, tmp_path / "first-run.log")
    try:
        referral_id = referrals(
            client_env, tmp_path, "submit", str(ROOT / "examples" / "referral.json")
        ).strip()
        maildir = tmp_path / ".data" / "mail" / "new"
        deadline = time.monotonic() + 30
        while len(list(maildir.glob("*"))) < 2:  # the referrer's receipt and the desk's notice
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert referral_id.encode() in b"".join(p.read_bytes() for p in maildir.iterdir())
        web = f"http://127.0.0.1:{ports['web']}"
        with urlopen(f"{web}/", timeout=10) as page:
            assert "referrer.email" in page.read().decode()
        with urlopen(f"{web}/dev/mail", timeout=10) as page:
            assert referral_id in page.read().decode()
        address = ["--address", f"127.0.0.1:{ports['temporal']}"]
        namespace = temporal("operator", "namespace", "describe", "-n", "default", *address)
        assert "720h0m0s" in namespace  # 30 days, set by the stack
        # The worker registered the nightly reconciliation; run it now rather than at 03:30.
        temporal("schedule", "trigger", "--schedule-id", "referrals-reconcile", *address)
        query = "WorkflowType = 'ReconcileWorkflow' AND ExecutionStatus = 'Completed'"
        deadline = time.monotonic() + 30
        while "ReconcileWorkflow" not in temporal("workflow", "list", "--query", query, *address):
            assert time.monotonic() < deadline, "the scheduled reconciliation did not complete"
            time.sleep(0.5)
    finally:
        stop_stack(process)
    assert not any(listening(port) for port in ports.values())
    data = tmp_path / ".data"  # personal data, keys and sign-in links: this user's only
    opened = {p: oct(p.stat().st_mode & 0o777) for p in [data, *data.rglob("*")]}
    assert len(opened) > 5 and all(mode in ("0o700", "0o600") for mode in opened.values()), opened

    process = start_stack(config, env, tmp_path / "second-run.log")
    try:
        shown = referrals(client_env, tmp_path, "show", referral_id)
        assert "stage: submitted" in shown
        listed = referrals(client_env, tmp_path, "list", "--stage", "submitted")
        assert referral_id in listed
    finally:
        stop_stack(process)


def test_the_stack_makes_an_older_checkouts_data_private(tmp_path: Path) -> None:
    data = tmp_path / ".data"
    (data / "mail" / "new").mkdir(parents=True, mode=0o755)
    for name in ("referrals.db", "referrals.db-wal", "mail/new/1.eml"):
        (data / name).write_text("personal data")
        (data / name).chmod(0o644)
    umask = os.umask(0o022)
    try:
        keep_private(data)
        (data / "created-after").write_text("")
        assert os.umask(0o022) == 0o077  # what the stack's processes inherit
    finally:
        os.umask(umask)
    modes = {p.relative_to(data).as_posix(): p.stat().st_mode & 0o777 for p in data.rglob("*")}
    assert data.stat().st_mode & 0o777 == 0o700
    assert modes == {
        "mail": 0o700,
        "mail/new": 0o700,
        "mail/new/1.eml": 0o600,
        "referrals.db": 0o600,
        "referrals.db-wal": 0o600,
        "created-after": 0o600,
    }


def test_ports_are_never_handed_out_twice_nor_ones_the_system_picks() -> None:
    """The system hands out ephemeral ports to whoever binds port 0 (a Temporal dev server's
    own services, as it starts): a port reserved for a server not started yet is below them."""
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    assert all(port < int(ephemeral[0]) for port in ports)
    for port in ports[:20]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))  # free when handed out
