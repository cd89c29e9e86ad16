"""Erasure and retention: a closed referral's personal data leaves Temporal and the database
(a pseudonym stands in), what accounting needs stays, and the daily retention run does it
by itself. On the dev server, with the CLI as staff run it."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session
from temporalio.client import (
    Schedule,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleSpec,
)

from activities.db import WebhookAttemptRow, make_engine
from activities.erasure import erase_referral
from activities.queries import load_referral
from activities.schema import upgrade
from core.links import status_token
from devstack.factories import submission, submission_data
from devstack.settings import SETTINGS, settings_with
from starter.consent import consent_statement
from starter.intake import submit_referral
from starter.web import create_app
from tests.activities.test_system_of_record import DELETION_SECONDS, KEY, gone
from tests.activities.test_webhooks import (  # noqa: F401 - receiver, webhooks_from: fixtures
    Endpoint,
    Receiver,
    WebhooksFrom,
    deliveries,
    new_secret,
    receiver,
    webhooks_from,
    write_program,
)
from tests.cli.test_cli import VIA
from tests.conftest import Cli, Live, eventually, in_process
from tests.desk import act_by_id
from worker import build_worker
from workflows.models.program import ProgramRules, RetentionRules
from workflows.models.referral import RetentionReport, Stage
from workflows.models.values import Action
from workflows.retention import RetentionWorkflow

PERSONAL = submission_data()
SECRETS = [
    PERSONAL["referrer"]["name"],
    PERSONAL["referrer"]["email"],
    PERSONAL["referrer"]["phone"],
    PERSONAL["referrer"]["company"],
    PERSONAL["contact"]["name"],
    PERSONAL["contact"]["email"],
    PERSONAL["contact"]["phone"],
    PERSONAL["opportunity"]["notes"],
]


async def submit(cli: Cli, tmp_path: Path, **changes: Any) -> str:
    site = f"https://erase-{uuid.uuid4().hex[:8]}.example"
    path = tmp_path / f"{uuid.uuid4().hex}.json"
    data = submission_data(**{"prospect.website": site, **changes})
    path.write_text(json.dumps(data), encoding="utf-8")
    done = await cli("submit", str(path))
    assert done.code == 0, done
    return done.out.strip()


def rows_about(live: Live, referral_id: str) -> str:
    """Every row the database keeps about the referral, as text."""
    found = []
    with live.engine.connect() as connection:
        for table, column in [
            ("referral", "referral_id"),
            ("referral_event", "referral_id"),
            ("commission", "referral_id"),
            ("commission_event", "referral_id"),
        ]:
            rows = connection.execute(
                text(f"SELECT * FROM {table} WHERE {column} = :id"), {"id": referral_id}
            )
            found += [str(tuple(row)) for row in rows]
        rows = connection.execute(
            text("SELECT * FROM sent_email WHERE key LIKE :prefix"), {"prefix": f"{referral_id}/%"}
        )
        found += [str(tuple(row)) for row in rows]
    return "\n".join(found)


async def test_a_closed_referral_is_erased_and_accounting_keeps_its_figures(
    cli: Cli, live: Live, tmp_path: Path
) -> None:
    rid = await submit(cli, tmp_path)
    for command, *options in [
        ("contacted", "--note", f"phoned {PERSONAL['referrer']['name']}"),
        ("accept",),
        ("approve",),
        ("won", "--amount", "180000", "--currency", "EUR"),
        ("payment", "--amount", "180000", "--reference", "INV-77"),
        ("payout", "--reference", "VIR-77"),
    ]:
        assert (await cli(command, rid, *options)).code == 0
    before = json.loads((await cli("show", rid, "--json")).out)
    assert before["consent"]["statement"] == consent_statement("fr")[0]
    assert before["consent"]["accepted_at"] == before["submitted_at"]
    await live.client.get_workflow_handle(rid).result()
    assert any(secret in rows_about(live, rid) for secret in SECRETS)  # there to be erased

    done = await cli("--actor", "dpo-marc", "erase", rid, "--reason", "GDPR request 2026-41")
    assert done.code == 0, done
    assert f"{rid}: personal data erased; 1 workflow run deleted from Temporal" in done.out

    after = json.loads((await cli("show", rid, "--json")).out)
    stored = rows_about(live, rid)
    assert [secret for secret in SECRETS if secret in stored + json.dumps(after)] == []
    assert after["referrer"]["name"] == f"erased-{rid.lower()}"
    assert after["erased"]["by"] == f"dpo-marc {VIA}"
    assert after["erased"]["reason"] == "GDPR request 2026-41"
    # What accounting needs is intact.
    for key in ("stage", "submitted_at", "closed_at", "commission", "payments", "prospect"):
        assert after[key] == before[key], key
    assert [h["action"] for h in after["history"]] == [h["action"] for h in before["history"]] + [
        "erase"
    ]
    assert all(h["note"] is None for h in after["history"][:-1])
    assert after["history"][-1]["actor"] == f"dpo-marc {VIA}"
    ledger = json.loads((await cli("commissions", "--json")).out)
    [row] = [r for r in ledger if r["referral_id"] == rid]
    assert row["amount"] == "18000.00" and row["status"] == "paid"
    assert row["referrer_email"] == f"erased-{rid.lower()}@erased.example"
    shown = (await cli("show", rid)).out
    assert "ERASED" in shown and "GDPR request 2026-41" in shown

    app = create_app(engine=live.engine, client=live.client, key=KEY)
    async with in_process(app, base_url="http://test") as web:
        page = await web.get(f"/status/{status_token(rid, KEY)}")
    assert page.status_code == 200 and 'id="erased"' in page.text
    assert "données personnelles de cette recommandation ont été effacées" in page.text
    assert [secret for secret in SECRETS if secret in page.text] == []

    again = await cli("erase", rid, "--reason", "twice")
    assert again.code == 0 and "already erased" in again.out

    async def deleted() -> bool:
        return await gone(live.client, rid)

    await eventually(deleted, DELETION_SECONDS)  # Temporal forgets it too


async def test_an_open_referral_is_not_erased(cli: Cli, tmp_path: Path) -> None:
    rid = await submit(cli, tmp_path)
    done = await cli("erase", rid, "--reason", "asked")
    assert done.code == 1
    assert done.err.strip() == f"referrals: {rid} is open (submitted): cancel it before erasing it"
    usage = await cli("erase", "--reason", "asked")
    assert usage.code == 2 and "a referral id or --referrer" in usage.err


async def test_erasing_a_referrer_erases_the_closed_and_names_the_open(
    cli: Cli, live: Live, tmp_path: Path
) -> None:
    email = f"someone-{uuid.uuid4().hex[:6]}@conseil-martin.example"
    closed = await submit(cli, tmp_path, **{"referrer.email": email})
    still_open = await submit(cli, tmp_path, **{"referrer.email": email})
    assert (await cli("decline", closed, "--reason", "not a fit")).code == 0
    await live.client.get_workflow_handle(closed).result()

    done = await cli("erase", "--referrer", email.upper(), "--reason", "asked by phone")
    assert done.code == 1
    assert f"{closed}: personal data erased" in done.out
    assert done.err.strip() == (
        f"referrals: not erased, still open: {still_open}: cancel them, then erase again"
    )
    assert json.loads((await cli("show", closed, "--json")).out)["erased"] is not None
    assert json.loads((await cli("show", still_open, "--json")).out)["erased"] is None


async def test_the_retention_schedule_erases_what_has_expired(
    live: Live, rules: ProgramRules, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention 0: every closed referral is due, the open one is not. A database and task
    queue of its own keep the rest of the session's referrals out of it."""
    queue = f"retention-{uuid.uuid4().hex[:6]}"
    engine = make_engine(f"sqlite:///{tmp_path / 'retention.db'}")
    upgrade(engine)
    now = rules.model_copy(update={"retention": RetentionRules(personal_data_days=0)})
    settings = settings_with(live.sink, task_queue=queue)
    async with build_worker(live.client, engine, settings, rules=now):
        ids = [
            await submit_referral(
                live.client,
                engine,
                rules,
                submission(**{"prospect.website": f"https://keep-{uuid.uuid4().hex[:8]}.fr"}),
                settings,
            )
            for _ in range(2)
        ]
        closed, still_open = (live.client.get_workflow_handle(rid) for rid in ids)
        await closed.execute_update(
            "act", {"action": "cancel", "actor": "desk", "reason": "duplicate"}, result_type=None
        )
        await closed.result()

        schedule_id = f"retention-test-{uuid.uuid4().hex[:6]}"
        schedule = await live.client.create_schedule(
            schedule_id,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    RetentionWorkflow.run, id=f"{schedule_id}-run", task_queue=queue
                ),
                spec=ScheduleSpec(),
            ),
        )
        try:
            await schedule.trigger()

            async def ran() -> bool:
                actions = (await schedule.describe()).info.recent_actions
                return bool(actions)

            await eventually(ran, 30)
            started = (await schedule.describe()).info.recent_actions[0].action
            assert isinstance(started, ScheduleActionExecutionStartWorkflow)
            run = live.client.get_workflow_handle(
                started.workflow_id, run_id=started.first_execution_run_id
            )
            result = await asyncio.wait_for(run.result(), 60)
        finally:
            await schedule.delete()
    report = RetentionReport.model_validate(result)
    assert report.retention_days == 0
    assert [line.split(":")[0] for line in report.erased] == [closed.id]
    erased, untouched = (load_referral(engine, rid) for rid in ids)
    assert erased is not None and erased.erased is not None and erased.erased.by == "system"
    assert erased.stage is Stage.CANCELLED
    assert untouched is not None and untouched.erased is None
    assert untouched.referrer.email == PERSONAL["referrer"]["email"]
    await still_open.terminate(reason="test over")


async def test_erasure_reaches_refunds_webhooks_and_email_files(
    live: Live,
    rules: ProgramRules,
    program_file: Path,
    receiver: Receiver,  # noqa: F811 - the fixture of tests/activities/test_webhooks.py
    tmp_path: Path,
    webhooks_from: WebhooksFrom,  # noqa: F811 - the fixture of tests/activities/test_webhooks.py
) -> None:
    """Beyond the referral's own rows: a refund's reason, what a webhook endpoint answered,
    the delivery workflows, the dev stack's email files; and the endpoints are told."""
    secret = new_secret()
    receiver.endpoints = {"/crm": Endpoint(secret)}
    crm = {
        "url": receiver.url("/crm"),
        "secret": secret,
        "events": ["referral.submitted", "referral.erased"],
        "include_personal_data": True,
    }
    webhooks_from(write_program(tmp_path / "program.yaml", [crm], program_file))
    name = PERSONAL["referrer"]["name"]
    rid = await submit_referral(
        live.client,
        live.engine,
        rules,
        submission(**{"prospect.website": f"https://erase-{uuid.uuid4().hex[:8]}.example"}),
        SETTINGS,
    )
    refund_reason = f"credit note agreed with {name}"
    steps: list[tuple[Action, dict[str, Any]]] = [
        (Action.CONTACTED, {}),
        (Action.ACCEPT, {}),
        (Action.APPROVE, {}),
        (Action.WON, {"amount": Decimal("180000"), "currency": "EUR"}),
        (Action.PAYMENT, {"amount": Decimal("180000"), "reference": "INV-9"}),
        (Action.REFUND, {"amount": Decimal("1000"), "reference": "AV-9", "reason": refund_reason}),
        (Action.PAYOUT, {"reference": "VIR-9"}),
    ]
    for action, extra in steps:
        await act_by_id(live.client, rid, action, **extra)
    await live.client.get_workflow_handle(rid).result()

    async def submitted_delivered() -> bool:
        return [d.status for d in deliveries(live.engine, rid)] == ["delivered"]

    await eventually(submitted_delivered)
    [first] = deliveries(live.engine, rid)
    with Session(live.engine) as session:  # an endpoint that echoed the message back
        session.add(
            WebhookAttemptRow(
                delivery_id=first.id, number=99, at=first.created_at, status_code=500,
                error=f"500 Internal Server Error: could not store {name}", duration_ms=3,
            )
        )  # fmt: skip
        session.commit()
    mail_files = [
        path
        for path in (live.sink.maildir / "new").iterdir()
        if f"X-Referral-Id: {rid}".encode() in path.read_bytes()
    ]
    assert mail_files

    line = await erase_referral(
        live.client, live.engine, rid, by="dpo-marc", reason="GDPR request",
        task_queue=SETTINGS.task_queue, maildir=live.sink.maildir,
    )  # fmt: skip
    assert "1 webhook endpoint(s) told" in line
    assert f"{len(mail_files)} email file(s) deleted" in line

    state = load_referral(live.engine, rid)
    assert state is not None and [r.reason for r in state.refunds] == ["erased"]
    with live.engine.connect() as connection:
        stored = " ".join(
            str(tuple(row))
            for table, where in [
                ("referral", "referral_id = :id"),
                ("referral_event", "referral_id = :id"),
                ("commission_line", "referral_id = :id"),
                ("webhook_delivery", "referral_id = :id"),
                (
                    "webhook_attempt",
                    "delivery_id IN (SELECT id FROM webhook_delivery WHERE referral_id = :id)",
                ),
            ]
            for row in connection.execute(text(f"SELECT * FROM {table} WHERE {where}"), {"id": rid})
        )
    assert refund_reason not in stored and name not in stored
    assert not any(path.exists() for path in mail_files)

    async def told() -> bool:
        return any(r.message["type"] == "referral.erased" for r in receiver.at("/crm", rid))

    await eventually(told)
    [erased] = [r for r in receiver.at("/crm", rid) if r.message["type"] == "referral.erased"]
    assert erased.verified and name not in erased.body.decode()
    assert erased.message["data"]["referrer"]["name"] == f"erased-{rid.lower()}"

    async def deliveries_deleted() -> bool:
        return await gone(live.client, f"webhook-{first.id}")

    await eventually(deliveries_deleted, DELETION_SECONDS)
