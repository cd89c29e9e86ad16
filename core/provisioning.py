"""What the program needs of its Temporal namespace, made so by `referrals temporal setup`
(idempotent, run before each deploy) and checked by every worker at start:

- the namespace itself, with its retention (self-hosted: registered when missing; Temporal
  Cloud namespaces are created in Cloud and only checked here);
- the search attributes the referral workflow sets (workflows/policies.py SEARCH_ATTRIBUTES):
  without them every referral's first workflow task would fail, after the form said 201;
- the nightly Schedules, created when missing and *updated* when their spec, time zone,
  task queue or catch-up window drifted from what this code and program.yaml say.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

from google.protobuf.duration_pb2 import Duration
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.namespace.v1 import NamespaceConfig
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.workflowservice.v1 import (
    DescribeNamespaceRequest,
    RegisterNamespaceRequest,
    UpdateNamespaceRequest,
)
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from workflows.models.program import ProgramRules
from workflows.payout_schedule import MonthlyPayoutsWorkflow
from workflows.policies import SEARCH_ATTRIBUTES
from workflows.reconcile import ReconcileWorkflow
from workflows.retention import RetentionWorkflow

RECONCILE_SCHEDULE = "referrals-reconcile"
RETENTION_SCHEDULE = "referrals-retention"
PAYOUTS_SCHEDULE = "referrals-monthly-payouts"
# A nightly run missed while the cluster was down still runs if it is back within this long.
CATCH_UP = timedelta(hours=6)
RPC_TIMEOUT = timedelta(seconds=10)
NEW_NAMESPACE_SECONDS = 60.0
T = TypeVar("T")


class ProvisioningError(Exception):
    """The namespace is not as the program needs it; the message says what to do."""


@dataclass(frozen=True)
class Nightly:
    """A Schedule the program relies on: the workflow it starts, when, in the program's zone."""

    schedule_id: str
    run: Callable[..., Any]
    cron: str

    def schedule(self, rules: ProgramRules, queue: str) -> Schedule:
        spec = f"{self.cron} {rules.calendar.timezone}; queue {queue}; catch-up {CATCH_UP}"
        return Schedule(
            action=ScheduleActionStartWorkflow(
                self.run, id=f"{self.schedule_id}-run", task_queue=queue
            ),
            spec=ScheduleSpec(cron_expressions=[self.cron], time_zone_name=rules.calendar.timezone),
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=CATCH_UP),
            # The server keeps cron as calendars; the note keeps what was asked, to compare.
            state=ScheduleState(note=spec),
        )


# Reconcile first, then erase what retention expired. The monthly payout runs are looked at
# each morning of the month's first week: the first business day prepares them.
NIGHTLY = (
    Nightly(RECONCILE_SCHEDULE, ReconcileWorkflow.run, "30 3 * * *"),
    Nightly(RETENTION_SCHEDULE, RetentionWorkflow.run, "30 4 * * *"),
    Nightly(PAYOUTS_SCHEDULE, MonthlyPayoutsWorkflow.run, "0 6 1-7 * *"),
)


async def missing_search_attributes(client: Client) -> list[SearchAttributeKey[Any]]:
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace), timeout=RPC_TIMEOUT
    )
    return [key for key in SEARCH_ATTRIBUTES if key.name not in listed.custom_attributes]


async def check_namespace(client: Client) -> None:
    """For a worker at start: refuse a namespace without the search attributes."""
    missing = await missing_search_attributes(client)
    if missing:
        names = ", ".join(f"{key.name} ({type_name(key)})" for key in missing)
        raise ProvisioningError(
            f"namespace {client.namespace} lacks the search attributes {names}: "
            "run `referrals temporal setup`"
        )


async def setup(
    client: Client, rules: ProgramRules, queue: str, retention_days: int | None
) -> list[str]:
    """Make the namespace as the program needs it; one line for each thing looked at."""
    lines = [await _namespace(client, retention_days)]
    lines += await _search_attributes(client)
    for nightly in NIGHTLY:
        lines.append(await _schedule(client, nightly, nightly.schedule(rules, queue)))
    return lines


def _indexed(key: SearchAttributeKey[Any]) -> IndexedValueType.ValueType:
    return IndexedValueType.ValueType(int(key.indexed_value_type))


def type_name(key: SearchAttributeKey[Any]) -> str:
    """As the `temporal` CLI names it: Keyword, Bool, Datetime…"""
    return IndexedValueType.Name(_indexed(key)).removeprefix("INDEXED_VALUE_TYPE_").title()


async def _namespace(client: Client, retention_days: int | None) -> str:
    name = client.namespace
    retention = Duration(seconds=int(timedelta(days=retention_days or 30).total_seconds()))
    try:
        described = await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=name), timeout=RPC_TIMEOUT
        )
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        try:
            await client.workflow_service.register_namespace(
                RegisterNamespaceRequest(
                    namespace=name, workflow_execution_retention_period=retention
                ),
                timeout=RPC_TIMEOUT,
            )
        except RPCError as refused:
            raise ProvisioningError(
                f"namespace {name} does not exist and cannot be registered here "
                f"({refused.message}); on Temporal Cloud, create it in Cloud"
            ) from refused
        return (
            f"namespace {name}: registered, closed workflows kept {retention.seconds // 86400} days"
        )
    kept = described.config.workflow_execution_retention_ttl.seconds // 86400
    if retention_days is None or kept == retention_days:
        return f"namespace {name}: exists, closed workflows kept {kept} days"
    await client.workflow_service.update_namespace(
        UpdateNamespaceRequest(
            namespace=name, config=NamespaceConfig(workflow_execution_retention_ttl=retention)
        ),
        timeout=RPC_TIMEOUT,
    )
    return f"namespace {name}: retention changed from {kept} to {retention_days} days"


async def _served(call: Callable[[], Awaitable[T]], namespace: str) -> T:
    """`call`, again while the namespace is not found: one just registered is not found for
    some seconds, here and there, until every service's namespace cache has it."""
    deadline = asyncio.get_running_loop().time() + NEW_NAMESPACE_SECONDS
    while True:
        try:
            return await call()
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND or "amespace" not in error.message:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise ProvisioningError(
                    f"namespace {namespace} still not found after {NEW_NAMESPACE_SECONDS:g}s: "
                    "run setup again"
                ) from error
        await asyncio.sleep(0.5)


async def _search_attributes(client: Client) -> list[str]:
    listed = await _served(
        lambda: client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace), timeout=RPC_TIMEOUT
        ),
        client.namespace,
    )
    lines: list[str] = []
    missing: dict[str, IndexedValueType.ValueType] = {}
    for key in SEARCH_ATTRIBUTES:
        found = listed.custom_attributes.get(key.name)
        if found is None:
            missing[key.name] = _indexed(key)
        elif found != _indexed(key):
            raise ProvisioningError(
                f"search attribute {key.name} is a {IndexedValueType.Name(found)}, the program "
                f"needs a {type_name(key)}: remove it (`temporal operator search-attribute "
                "remove`) and run setup again"
            )
        else:
            lines.append(f"search attribute {key.name} ({type_name(key)}): exists")
    if missing:
        await _served(
            lambda: client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing),
                timeout=RPC_TIMEOUT,
            ),
            client.namespace,
        )
        for key in SEARCH_ATTRIBUTES:
            if key.name in missing:
                lines.append(f"search attribute {key.name} ({type_name(key)}): added")
    return lines


async def _schedule(client: Client, nightly: Nightly, wanted: Schedule) -> str:
    handle = client.get_schedule_handle(nightly.schedule_id)
    try:
        await _served(
            lambda: client.create_schedule(nightly.schedule_id, wanted, rpc_timeout=RPC_TIMEOUT),
            client.namespace,
        )
        return f"schedule {nightly.schedule_id}: created ({wanted.state.note})"
    except ScheduleAlreadyRunningError:
        pass
    described = await handle.describe(rpc_timeout=RPC_TIMEOUT)
    before = described.schedule.state.note or "(made by an earlier release)"
    if before == wanted.state.note:
        return f"schedule {nightly.schedule_id}: unchanged ({before})"
    # An operator's pause stays.
    wanted = replace(wanted, state=replace(wanted.state, paused=described.schedule.state.paused))

    def update(_: ScheduleUpdateInput) -> ScheduleUpdate:
        return ScheduleUpdate(schedule=wanted)

    await handle.update(update, rpc_timeout=RPC_TIMEOUT)
    return f"schedule {nightly.schedule_id}: updated from {before} to {wanted.state.note}"
