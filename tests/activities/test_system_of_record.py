"""The database is the system of record: referrals outlive their workflows, and
`referrals reconcile` repairs what Temporal left behind. On the dev server, with the CLI
as staff run it."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session
from temporalio import workflow
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import PatchActivationInput, Worker

import activities.reconcile
from activities.db import CommissionRow, ProspectClaim
from activities.queries import load_referral
from activities.reconcile import reconcile
from activities.records import save_referral
from core.links import status_token
from devstack.factories import referral_input, submission, submission_data
from devstack.settings import BIN, SETTINGS, settings_with
from starter.domains import registrable_domain
from starter.intake import submit_referral
from starter.web import create_app
from tests.conftest import Cli, Live, eventually, in_process
from tests.desk import act_by_id
from worker import build_worker
from workflows.features import RELEASES
from workflows.models.program import ProgramRules
from workflows.models.referral import (
    ReferralInput,
    ReferralRecord,
    ReferralState,
    StaffAction,
    Stage,
)
from workflows.models.values import Action
from workflows.referral import ReferralWorkflow
from workflows.transitions import initial_state

NEWEST_RELEASE = RELEASES[0][0]

KEY = "test-secret"
# The dev server forgets a deleted closed workflow some 35 s after the request.
DELETION_SECONDS = 90


def write_submission(tmp_path: Path) -> Path:
    data = submission_data(**{"prospect.website": f"https://sor-{uuid.uuid4().hex[:8]}.example"})
    path = tmp_path / f"{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


async def submit(cli: Cli, tmp_path: Path) -> str:
    done = await cli("submit", str(write_submission(tmp_path)))
    assert done.code == 0, done
    return done.out.strip()


async def shown(cli: Cli, referral_id: str) -> dict[str, Any]:
    done = await cli("show", referral_id, "--json")
    assert done.code == 0, done
    result: dict[str, Any] = json.loads(done.out)
    return result


async def gone(client: Client, referral_id: str) -> bool:
    try:
        await client.get_workflow_handle(referral_id).describe()
    except RPCError as error:
        return error.status == RPCStatusCode.NOT_FOUND
    return False


async def test_a_deleted_workflow_is_still_shown_listed_and_linked(
    cli: Cli, live: Live, tmp_path: Path
) -> None:
    rid = await submit(cli, tmp_path)
    steps = [
        ("contacted", ["--note", "phoned Claire"], "contacted"),
        ("accept", [], "qualifying"),
        ("approve", [], "approved"),
        ("won", ["--amount", "180000", "--currency", "EUR"], "won"),
        ("payment", ["--amount", "180000", "--reference", "INV-1"], "commission_payable"),
        ("payout", ["--reference", "VIR-1"], "commission_paid"),
    ]
    for command, options, stage in steps:
        done = await cli(command, rid, *options)
        assert done.code == 0, done
        # Staff read their own writes: the database already says so, no waiting.
        assert (await shown(cli, rid))["stage"] == stage
    before = await shown(cli, rid)

    deleted = await asyncio.create_subprocess_exec(
        str(BIN / "temporal"),
        "workflow",
        "delete",
        "--workflow-id",
        rid,
        "--address",
        live.address,
        "--yes",
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await deleted.wait() == 0

    async def deleted_from_temporal() -> bool:
        return await gone(live.client, rid)

    await eventually(deleted_from_temporal, DELETION_SECONDS)

    after = await shown(cli, rid)
    assert after == before
    assert [h["action"] for h in after["history"]] == [
        "submitted",
        "contacted",
        "accept",
        "approve",
        "won",
        "payment",
        "payout",
    ]
    assert after["history"][1]["note"] == "phoned Claire"
    assert after["commission"]["status"] == "paid" and after["closed_at"]
    text = (await cli("show", rid)).out
    assert "stage: commission_paid" in text and "WORKFLOW" not in text
    listed = json.loads((await cli("list", "--json")).out)
    assert [r["stage"] for r in listed if r["referral_id"] == rid] == ["commission_paid"]
    paid = json.loads((await cli("commissions", "--status", "paid", "--json")).out)
    assert rid in [row["referral_id"] for row in paid]

    app = create_app(engine=live.engine, client=live.client, key=KEY)
    async with in_process(app, base_url="http://test") as web:
        page = await web.get(f"/status/{status_token(rid, KEY)}")
    assert page.status_code == 200
    assert 'data-stage="commission_paid"' in page.text


async def test_reconcile_repairs_what_temporal_left_behind(
    cli: Cli, live: Live, tmp_path: Path, rules: ProgramRules
) -> None:
    # 1. A referral whose workflow an operator terminated after the deal was won.
    terminated = await submit(cli, tmp_path)
    for command, *options in [
        ("contacted",),
        ("accept",),
        ("approve",),
        ("won", "--amount", "50000", "--currency", "EUR"),
    ]:
        assert (await cli(command, terminated, *options)).code == 0
    await live.client.get_workflow_handle(terminated).terminate(reason="operator")
    text = (await cli("show", terminated)).out
    assert "WORKFLOW     terminated in Temporal: run `referrals reconcile`" in text
    assert (await shown(cli, terminated))["workflow"] == "terminated in Temporal"

    # 2. A referral recorded by an intake that died before its workflow started.
    never = referral_input(rules, referral_id=f"R-NEVER{uuid.uuid4().hex[:5].upper()}")
    first = initial_state(never)
    first.submitted_at = datetime.now(UTC) - timedelta(minutes=10)
    save_referral(
        live.engine,
        ReferralRecord(state=first.model_copy(update={"history": []}), events=first.history),
    )

    # 3. A claim whose referral is gone.
    stale = f"stale-{uuid.uuid4().hex[:8]}.example"
    with Session(live.engine) as session:
        session.add(
            ProspectClaim(
                domain=stale,
                referral_id="R-GONE000000",
                claimed_at=datetime.now(UTC) - timedelta(hours=1),
            )
        )
        session.commit()

    # 4. A referral started by release 0.1.0 (no database row, no patches), still running.
    queue = f"legacy-{uuid.uuid4().hex[:6]}"
    legacy = referral_input(
        rules, f"R-LEGACY{uuid.uuid4().hex[:4].upper()}", received_at=datetime.now(UTC)
    )
    old = build_worker(
        live.client,
        live.engine,
        settings_with(live.sink),
        queue=queue,
        patch_activation_callback=lambda _: False,
    )
    # Received now: with an older receipt its contact timers would fire before the decline.
    closed_legacy = referral_input(
        rules, f"R-CLOSED{uuid.uuid4().hex[:4].upper()}", received_at=datetime.now(UTC)
    )
    async with old:
        await live.client.start_workflow(
            ReferralWorkflow.run, legacy, id=legacy.referral_id, task_queue=queue
        )
        done = await live.client.start_workflow(
            ReferralWorkflow.run, closed_legacy, id=closed_legacy.referral_id, task_queue=queue
        )
        await done.execute_update(
            "act", StaffAction(action=Action.DECLINE, actor="desk-anna", reason="no fit")
        )
        await done.result()

        async def legacy_started() -> bool:
            state = await live.client.get_workflow_handle(legacy.referral_id).query(
                "state", result_type=ReferralState
            )
            return state.stage is Stage.SUBMITTED

        await eventually(legacy_started)
    assert load_referral(live.engine, legacy.referral_id) is None

    async def legacy_listed() -> bool:
        query = f"WorkflowId = '{legacy.referral_id}' AND ExecutionStatus = 'Running'"
        return [wf.id async for wf in live.client.list_workflows(query)] == [legacy.referral_id]

    await eventually(legacy_listed, 30)

    current = build_worker(live.client, live.engine, settings_with(live.sink), queue=queue)
    async with current:
        report = await cli("reconcile")
        assert report.code == 0, report
        lines = report.out.splitlines()
        assert any(
            line.startswith(
                f"{terminated}: workflow terminated in Temporal while the referral "
                "was won; marked cancelled; commission void"
            )
            for line in lines
        ), lines
        assert any(line.startswith(f"{never.referral_id}: workflow not found") for line in lines)
        assert f"{stale}: released the claim of R-GONE000000 (not running)" in lines
        assert f"{legacy.referral_id}: started before the system of record; upgrade requested" in (
            lines
        )
        assert (
            f"{closed_legacy.referral_id}: closed before the system of record; recorded (declined)"
            in lines
        )

        async def legacy_recorded() -> bool:
            return load_referral(live.engine, legacy.referral_id) is not None

        await eventually(legacy_recorded, 30)
        description = await live.client.get_workflow_handle(legacy.referral_id).describe()
        assert description.status is WorkflowExecutionStatus.RUNNING
        await live.client.get_workflow_handle(legacy.referral_id).terminate(reason="test over")

    cancelled = await shown(cli, terminated)
    assert cancelled["stage"] == "cancelled" and cancelled["commission"]["status"] == "void"
    assert cancelled["history"][-1]["actor"] == "system"
    assert cancelled["workflow"] is None  # closed: nothing left to check
    with Session(live.engine) as session:
        row = session.get(CommissionRow, terminated)
        assert row is not None and row.status == "void"
        assert session.get(ProspectClaim, stale) is None
    declined = load_referral(live.engine, closed_legacy.referral_id)
    assert declined is not None and [h.action for h in declined.history] == ["submitted", "decline"]
    never_state = load_referral(live.engine, never.referral_id)
    assert never_state is not None and never_state.stage is Stage.CANCELLED


@workflow.defn(name="ReferralWorkflow", sandboxed=False)
class Impostor:
    """Code that once ran under the referral workflow's name and did something else."""

    @workflow.run
    async def run(self, input: ReferralInput) -> None:
        await workflow.sleep(timedelta(days=1))


async def test_replay_check_passes_when_running_referrals_replay(cli: Cli, tmp_path: Path) -> None:
    await submit(cli, tmp_path)
    done = await cli("replay-check")
    assert done.code == 0, done
    assert "running referrals replay on this code" in done.out


async def test_replay_check_names_a_referral_this_code_would_break(
    cli: Cli, live: Live, rules: ProgramRules
) -> None:
    given = referral_input(
        rules, f"R-IMPOSTOR{uuid.uuid4().hex[:3].upper()}", received_at=datetime.now(UTC)
    )
    queue = f"impostor-{uuid.uuid4().hex[:6]}"
    async with Worker(live.client, task_queue=queue, workflows=[Impostor]):
        handle = await live.client.start_workflow(
            Impostor.run, given, id=given.referral_id, task_queue=queue
        )

        async def timer_started() -> bool:
            events = [e async for e in handle.fetch_history_events()]
            return any(e.HasField("timer_started_event_attributes") for e in events)

        await eventually(timer_started)

    async def listed() -> bool:
        query = f"WorkflowId = '{given.referral_id}' AND ExecutionStatus = 'Running'"
        return [wf.id async for wf in live.client.list_workflows(query)] == [given.referral_id]

    await eventually(listed, 30)
    try:
        done = await cli("replay-check")
    finally:
        await handle.terminate(reason="test over")
    assert done.code == 1, done
    lines = done.err.strip().splitlines()
    assert len(lines) == 1 and f"{given.referral_id} would break on this code" in lines[0]


async def test_reconcile_closes_a_paid_referral_as_paid(
    live: Live, shipped_rules: ProgramRules
) -> None:
    """A referral at commission_paid, in its clawback window, whose workflow was deleted:
    the commission was paid, so it closes as paid (the window ended early, the reason in its
    history) and keeps counting as won and paid, never as cancelled."""
    site = f"https://www.paid-{uuid.uuid4().hex[:8]}.example/"
    referral_id = await submit_referral(
        live.client,
        live.engine,
        shipped_rules,  # a 90-day clawback window: the workflow waits in commission_paid
        submission(**{"prospect.website": site}),
        SETTINGS,
        received_at=datetime.now(UTC) - timedelta(hours=1),  # older than reconcile's grace
    )
    steps: list[tuple[Action, dict[str, Any]]] = [
        (Action.CONTACTED, {}),
        (Action.ACCEPT, {}),
        (Action.APPROVE, {}),
        (Action.WON, {"amount": Decimal("100000"), "currency": "EUR"}),
        (Action.PAYMENT, {"amount": Decimal("100000"), "reference": "INV-PAID"}),
        (Action.PAYOUT, {"reference": "VIR-PAID"}),
    ]
    for action, values in steps:
        await act_by_id(live.client, referral_id, action, **values)
    await live.client.workflow_service.delete_workflow_execution(
        DeleteWorkflowExecutionRequest(
            namespace=live.client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=referral_id),
        )
    )

    async def deleted() -> bool:
        try:
            await live.client.get_workflow_handle(referral_id).describe()
        except RPCError as error:
            return error.status == RPCStatusCode.NOT_FOUND
        return False

    await eventually(deleted, 30)
    report = await reconcile(live.client, live.engine, SETTINGS.task_queue)

    state = load_referral(live.engine, referral_id)
    assert state is not None and state.stage is Stage.COMMISSION_PAID
    assert state.closed_at is not None and state.clawback_closed
    last = state.history[-1]
    assert (last.action, last.actor) == ("clawback_window_closed", "system")
    assert "workflow not found" in (last.note or "") and "stays paid" in (last.note or "")
    assert any(line.startswith(f"{referral_id}: ") for line in report.fixed)
    with Session(live.engine) as session:
        commission = session.get(CommissionRow, referral_id)
        assert commission is not None and commission.status == "paid"
        assert session.get(ProspectClaim, registrable_domain(site)) is None


async def test_reconcile_carries_a_referral_started_before_the_newest_release_over(
    live: Live, rules: ProgramRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A referral started before release 0.8 (its run has no `release-0.8` marker) would take
    money signals until it closed; after the deploy, reconcile sends it `upgrade`, and it
    continues as new with every behaviour of the release, its state and history kept."""
    deployed = False

    def activation(patch: PatchActivationInput) -> bool:  # the deploy, on one worker
        return deployed or patch.patch_id != NEWEST_RELEASE

    queue = f"carry-{uuid.uuid4().hex[:6]}"
    settings = settings_with(live.sink, task_queue=queue)
    worker = build_worker(
        live.client, live.engine, settings, queue=queue, patch_activation_callback=activation
    )
    website = f"https://carry-{uuid.uuid4().hex[:8]}.example"
    async with worker:
        rid = await submit_referral(
            live.client, live.engine, rules, submission(**{"prospect.website": website}), settings
        )
        await act_by_id(live.client, rid, Action.CONTACTED)
        handle = live.client.get_workflow_handle(rid)
        first_run = (await handle.describe()).run_id

        async def listed_as_behind() -> bool:
            query = f"WorkflowId = '{rid}' AND TemporalChangeVersion = '{RELEASES[1][0]}'"
            return [wf.id async for wf in live.client.list_workflows(query)] == [rid]

        await eventually(listed_as_behind, 30)
        deployed = True
        monkeypatch.setattr(activities.reconcile, "GRACE", timedelta(0))
        report = await reconcile(live.client, live.engine, queue)
        assert f"{rid}: started before {NEWEST_RELEASE}; upgrade requested" in report.fixed

        async def carried_over() -> bool:
            return (await handle.describe()).run_id != first_run

        await eventually(carried_over, 30)
        won = StaffAction(action=Action.WON, actor="crm", amount=Decimal("5000"), currency="EUR")
        await handle.signal("action", won)

        async def refused() -> bool:
            state = await handle.query("state", result_type=ReferralState)
            return state.history[-1].outcome == "refused"

        await eventually(refused)
        state = await handle.query("state", result_type=ReferralState)
        assert state.stage is Stage.CONTACTED and state.commission is None
        assert [h.action for h in state.history] == ["submitted", "contacted", "won"]
        markers = {
            run: [
                json.loads(
                    event.marker_recorded_event_attributes.details["patch-data"].payloads[0].data
                )["id"]
                for event in (
                    await live.client.get_workflow_handle(rid, run_id=run).fetch_history()
                ).events
                if event.marker_recorded_event_attributes.marker_name == "core_patch"
            ]
            for run in (first_run, (await handle.describe()).run_id)
        }
        assert markers == {
            first_run: [RELEASES[1][0], "carry-over"],
            (await handle.describe()).run_id: [NEWEST_RELEASE],
        }
        await handle.terminate(reason="test over")
