"""Worker Versioning and patches on a dev server of each test's own (docs/rollout.md).

A rolling update: an unversioned worker (the release before versioning), then v1 and v2
workers of one Worker Deployment on one task queue, in this process. A version takes no task
until the operator makes it current with the `temporal` CLI; from then on new referrals run
only on it, and running ones (AUTO_UPGRADE) move to it at their next task, even while the
older workers still poll. And `referrals patches` names the patch ids no run still needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from sqlalchemy.engine import Engine
from temporalio.api.enums.v1 import EventType, TaskQueueType, WorkflowTaskFailedCause
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import PatchActivationInput

from activities.db import make_engine
from activities.queries import load_referral
from activities.schema import upgrade
from activities.webhooks import configure as configure_webhooks
from core.settings import Settings, WebhookRetry
from devstack.factories import referral_input
from devstack.servers import REFERRALS, MailSink, dev_server
from devstack.settings import BIN, ROOT, settings_with
from faults import previous_release
from tests.activities.test_webhooks import (  # noqa: F401 - receiver: a fixture
    Endpoint,
    Receiver,
    new_secret,
    receiver,
    write_program,
)
from tests.conftest import eventually
from tests.desk import act_by_id
from worker import build_webhook_worker, build_worker
from workflows.features import RELEASES, patch_markers
from workflows.models.program import ProgramRules
from workflows.models.referral import ActResult, StaffAction, Stage
from workflows.models.values import Action
from workflows.referral import ReferralWorkflow

RELEASE = RELEASES[0][0]  # the newest
RELEASE_IDS = [release for release, _ in RELEASES]


@pytest_asyncio.fixture
async def server() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server of this test's own: deployments and patch counts are namespace-wide."""
    async with dev_server() as env:
        yield env


@pytest.fixture
def database(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'referrals.db'}")
    upgrade(engine)
    return engine


async def start_referral(client: Client, rules: ProgramRules, queue: str) -> str:
    given = referral_input(
        rules, f"R-V{uuid.uuid4().hex[:10].upper()}", received_at=datetime.now(UTC)
    )
    await client.start_workflow(ReferralWorkflow.run, given, id=given.referral_id, task_queue=queue)
    return given.referral_id


async def builds(client: Client, referral_id: str) -> list[str]:
    """The build id of the worker that completed each workflow task, in order ('' for an
    unversioned worker), as the history records it."""
    history = await client.get_workflow_handle(referral_id).fetch_history()
    return [
        event.workflow_task_completed_event_attributes.deployment_version.build_id
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    ]


async def started(client: Client, referral_id: str) -> list[str]:
    """The builds once the run's first workflow task is done."""

    async def done() -> bool:
        return bool(await builds(client, referral_id))

    await eventually(done)
    return await builds(client, referral_id)


async def make_current(env: WorkflowEnvironment, settings: Settings, *queues: str) -> None:
    """The operator's step (docs/rollout.md), with the `temporal` CLI: possible once the
    version's workers have polled, done once the task queues (the settings' and `queues`)
    route by it, as matching says. Not the deployment's own `routing_config_update_state`:
    with dev server 1.32 it can stay IN_PROGRESS after the routing has changed (cf.
    temporalio/temporal#11842)."""
    address = env.client.service_client.config.target_host
    command = [
        str(BIN / "temporal"), "worker", "deployment", "set-current-version",
        "--deployment-name", settings.deployment_name, "--build-id", str(settings.build_id),
        "--address", address, "--yes",
    ]  # fmt: skip

    async def made() -> bool:
        done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
        # Refused until its workers have polled: the version or the deployment unknown (the
        # CLI says "no Worker Deployment found" for the latter), or some of the current
        # version's task queues not polled by it yet.
        waiting = ("not found", "no Worker Deployment found", "missing active task queues")
        assert done.returncode == 0 or any(w in done.stderr for w in waiting), done.stderr
        return done.returncode == 0

    async def routed() -> bool:
        for name in (settings.task_queue, *queues):
            for kind in (
                TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            ):
                described = await env.client.workflow_service.describe_task_queue(
                    DescribeTaskQueueRequest(
                        namespace=env.client.namespace,
                        task_queue=TaskQueue(name=name),
                        task_queue_type=kind,
                    )
                )
                current = described.versioning_info.current_deployment_version
                if current.build_id != settings.build_id:
                    return False
        return True

    await eventually(made)
    await eventually(routed)


async def test_a_version_takes_the_referrals_once_made_current(
    server: WorkflowEnvironment, database: Engine, mail_sink: MailSink, rules: ProgramRules
) -> None:
    client = server.client
    queue = f"versioned-{uuid.uuid4().hex[:8]}"
    unversioned = settings_with(mail_sink, task_queue=queue, deployment_name=queue)
    assert unversioned.build_id is None
    v1 = dataclasses.replace(unversioned, build_id="v1")
    v2 = dataclasses.replace(unversioned, build_id="v2")

    async with build_worker(client, database, unversioned):
        before = await start_referral(client, rules, queue)
        assert set(await started(client, before)) == {""}
        async with build_worker(client, database, v1):
            # Polling, not current: a first deployment's version takes nothing yet.
            waiting = await start_referral(client, rules, queue)
            assert set(await started(client, waiting)) == {""}
            await make_current(server, v1)
            on_v1 = await start_referral(client, rules, queue)
            assert set(await started(client, on_v1)) == {"v1"}
            # An unversioned run moves to the current version at its next task.
            await act_by_id(client, before, Action.CONTACTED)
            assert (await builds(client, before))[-1] == "v1"
            async with build_worker(client, database, v2):
                await make_current(server, v2)
                # v1 still polls, and has these runs cached: their next task is v2's.
                for referral_id in (before, waiting, on_v1):
                    await act_by_id(client, referral_id, Action.DECLINE, reason="no fit")
                    history = await builds(client, referral_id)
                    moved = history.index("v2")
                    assert set(history[moved:]) == {"v2"}, (referral_id, history)
                on_v2 = await start_referral(client, rules, queue)
                await act_by_id(client, on_v2, Action.CONTACTED)
                assert set(await builds(client, on_v2)) == {"v2"}


def patches_report(env: WorkflowEnvironment, workdir: Path) -> dict[str, list[str]]:
    """`referrals patches`: each id's running and closed counts and its verdict."""
    done = subprocess.run(
        [REFERRALS, "patches"],
        cwd=workdir,
        env={
            **os.environ,
            "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "REFERRALS_PROGRAM": str(ROOT / "program.yaml"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["patch", "id", "running", "closed"]
    return {patch_id: rest for patch_id, *rest in (row.split(maxsplit=3) for row in rows)}


def started_before(*missing: str) -> Callable[[PatchActivationInput], bool]:
    """A worker's patch activation: its new runs record every marker but `missing`, as runs
    started by an older release did."""

    def activate(patch: PatchActivationInput) -> bool:
        return patch.patch_id not in missing

    return activate


async def test_a_new_run_records_one_marker_and_patches_names_what_can_retire(
    server: WorkflowEnvironment,
    database: Engine,
    mail_sink: MailSink,
    rules: ProgramRules,
    tmp_path: Path,
) -> None:
    client = server.client
    queues = {name: f"{name}-{uuid.uuid4().hex[:6]}" for name in ("now", "0-6", "0-5")}
    settings = settings_with(mail_sink)
    now = build_worker(client, database, settings, queue=queues["now"])
    older = [
        build_worker(
            client, database, settings, queue=queues[name], patch_activation_callback=activation
        )
        for name, activation in (
            ("0-6", started_before(*RELEASE_IDS)),
            ("0-5", started_before(*RELEASE_IDS, "slim-payloads")),
        )
    ]
    async with now, older[0], older[1]:
        new = await start_referral(client, rules, queues["now"])
        like_0_6 = await start_referral(client, rules, queues["0-6"])
        like_0_5 = await start_referral(client, rules, queues["0-5"])
        for referral_id in (new, like_0_6, like_0_5):
            await started(client, referral_id)
        await act_by_id(client, like_0_6, Action.DECLINE, reason="no fit")
        await client.get_workflow_handle(like_0_6).result()

        history = await client.get_workflow_handle(new).fetch_history()
        [marker] = [
            event.marker_recorded_event_attributes
            for event in history.events
            if event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
        ]
        assert marker.marker_name == "core_patch"
        assert json.loads(marker.details["patch-data"].payloads[0].data)["id"] == RELEASE

        expected = {patch_id: ["0", "0", "retire it"] for patch_id in patch_markers()}
        expected["slim-payloads"] = ["1", "0", "in use"]  # like_0_5, running
        # Neither like_0_5 nor like_0_6 (closed) has a release's behaviours.
        for patch_id in (*RELEASE_IDS, "carry-over"):
            expected[patch_id] = ["1", "1", "in use"]

        async def reported() -> bool:
            return patches_report(server, tmp_path) == expected

        await eventually(reported, 30)


def test_the_worker_manifest_is_the_version_of_its_release() -> None:
    """The release is written in kustomization.yaml (the label, the images' tags, the name of
    its workers' Deployment) and in worker.yaml's REFERRALS_BUILD_ID: all the same, the
    project's version, so the workers' version is their image's tag."""
    k8s = ROOT / "deploy" / "k8s"
    release = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text(encoding="utf-8"))
    assert {image["newTag"] for image in kustomization["images"]} == {release}
    assert kustomization["labels"][0]["pairs"]["app.kubernetes.io/version"] == release
    [patch] = kustomization["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "referral-desk-worker"}
    assert {op["path"]: op["value"] for op in yaml.safe_load(patch["patch"])} == {
        "/metadata/name": f"referral-desk-worker-{release.replace('.', '-')}",
        "/spec/selector/matchLabels/app.kubernetes.io~1version": release,
        "/spec/template/metadata/labels/app.kubernetes.io~1version": release,
    }
    [deployment, _] = yaml.safe_load_all((k8s / "worker.yaml").read_text(encoding="utf-8"))
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    environment = {variable["name"]: variable["value"] for variable in container["env"]}
    assert container["image"] == f"referral-desk-worker:{release}"
    assert environment["REFERRALS_BUILD_ID"] == release
    assert environment["REFERRALS_DEPLOYMENT_NAME"] == "referrals"


async def test_a_webhook_delivery_ends_on_the_version_that_started_it(
    server: WorkflowEnvironment,
    database: Engine,
    mail_sink: MailSink,
    rules: ProgramRules,
    program_file: Path,
    receiver: Receiver,  # noqa: F811 - the fixture of tests/activities/test_webhooks.py
    tmp_path: Path,
) -> None:
    """Deliveries are PINNED: one still retrying when v2 becomes current finishes on v1 (its
    short run never meets code it did not start on), while its referral moves to v2."""
    client = server.client
    queue = f"pinned-{uuid.uuid4().hex[:8]}"
    secret = new_secret()
    receiver.endpoints = {"/crm": Endpoint(secret, down=True)}
    hook = {"url": receiver.url("/crm"), "secret": secret, "events": ["referral.submitted"]}
    v1 = settings_with(
        mail_sink,
        task_queue=queue,
        deployment_name=queue,
        build_id="v1",
        program_path=write_program(tmp_path / "program.yaml", [hook], program_file),
        webhook_retry=WebhookRetry(initial_interval_s=2, maximum_interval_s=2),
    )
    v2 = dataclasses.replace(v1, build_id="v2")
    try:
        async with build_worker(client, database, v1), build_webhook_worker(client, database, v1):
            await make_current(server, v1, f"{queue}-webhooks")
            referral_id = await start_referral(client, rules, queue)

            async def delivering() -> bool:
                return any(r.path == "/crm" for r in receiver.received)

            await eventually(delivering)
            [delivery] = [
                wf.id async for wf in client.list_workflows(f"TaskQueue = '{queue}-webhooks'")
            ]
            async with (
                build_worker(client, database, v2),
                build_webhook_worker(client, database, v2),
            ):
                await make_current(server, v2, f"{queue}-webhooks")
                receiver.endpoints["/crm"].down = False
                await client.get_workflow_handle(delivery).result()
                await act_by_id(client, referral_id, Action.CONTACTED)
                assert (await builds(client, referral_id))[-1] == "v2"
        assert set(await builds(client, delivery)) == {"v1"}
        assert len(await builds(client, delivery)) >= 2  # one task after v2 became current
    finally:
        configure_webhooks(Path("program.yaml"), WebhookRetry())


async def test_a_rollback_past_a_patch_holds_the_newer_runs_until_rolled_forward(
    server: WorkflowEnvironment, database: Engine, mail_sink: MailSink, rules: ProgramRules
) -> None:
    """The rule of docs/rollout.md, shown: v1 is the release before the newest (its code knows
    no `release-0.7`), v2 the newest. Once v1 is made current again, a referral started on v1
    goes on there, while one started on v2 cannot replay on v1: its action is not applied and
    nothing is recorded, until v2 is current again and the same request applies, once."""
    client = server.client
    queue = f"rollback-{uuid.uuid4().hex[:8]}"
    v1 = settings_with(mail_sink, task_queue=queue, deployment_name=queue, build_id="v1")
    v2 = dataclasses.replace(v1, build_id="v2")
    async with previous_release.build_worker(client, database, v1):
        await make_current(server, v1)
        older = await start_referral(client, rules, queue)
        async with build_worker(client, database, v2):
            await make_current(server, v2)
            newer = await start_referral(client, rules, queue)
            for referral_id in (older, newer):
                await act_by_id(client, referral_id, Action.CONTACTED)
            assert (await builds(client, older))[-1] == (await builds(client, newer))[-1] == "v2"

            await make_current(server, v1)  # the rollback attempt
            await act_by_id(client, older, Action.ACCEPT)
            assert (await builds(client, older))[-1] == "v1"
            accept = StaffAction(action=Action.ACCEPT, actor="alice", request_id="accept-1")
            handle = client.get_workflow_handle(newer)
            with pytest.raises(WorkflowUpdateRPCTimeoutOrCancelledError):
                await asyncio.wait_for(apply(handle, accept), 10)
            history = await handle.fetch_history()
            [failure] = [
                event.workflow_task_failed_event_attributes
                for event in history.events
                if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
            ]
            assert (
                failure.cause
                == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_NON_DETERMINISTIC_ERROR
            )
            assert f"patch marker encountered for change {RELEASE}" in failure.failure.message
            held = load_referral(database, newer)
            assert held is not None and held.stage == Stage.CONTACTED

            await make_current(server, v2)  # rolled forward

            async def applied() -> bool:
                try:
                    await apply(handle, accept)
                except RPCError as error:  # until the failed task is retried, on v2
                    assert "Workflow Task in failed state" in error.message, error
                    return False
                return True

            await eventually(applied, 60)
            await apply(handle, accept)  # the same request again: applied once
            await act_by_id(client, newer, Action.APPROVE)
            assert (await builds(client, newer))[-1] == "v2"
    state = load_referral(database, newer)
    assert state is not None and state.stage == Stage.APPROVED
    assert [entry.action for entry in state.history].count(Action.ACCEPT.value) == 1


async def apply(handle: WorkflowHandle[Any, Any], request: StaffAction) -> ActResult:
    return await handle.execute_update("act", request, id=request.request_id, result_type=ActResult)
