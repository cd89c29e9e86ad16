"""The baseline: a bare Temporal lifecycle of the referral's shape, with none of its work.

It is started, receives as many updates as a referral's walk to `commission_paid`, and runs
as many no-op activities as the referral ran, where it ran them (`plan`, read off a
referral's history). Like the referral, it performs them on two queues in order, writes and
emails, and an update returns once its writes have landed, not its emails. What the project
does beyond this (payloads, state, SQL, SMTP) is what the ratio measures.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow


@dataclass
class BarePlan:
    """No-op writes and emails after the start (index 0) and in each update (1…)."""

    writes: list[int]
    emails: list[int]

    @property
    def updates(self) -> int:
        return len(self.writes) - 1


@activity.defn(name="bare_noop")
def bare_noop(kind: str) -> str:
    return kind


@workflow.defn(name="BareLifecycle")
class BareLifecycle:
    @workflow.init
    def __init__(self, plan: BarePlan) -> None:
        self.plan = plan
        self.done = 0
        self.queued = {"write": plan.writes[0], "email": plan.emails[0]}
        self.performed = {"write": 0, "email": 0}

    async def _pump(self, kind: str) -> None:
        while True:
            await workflow.wait_condition(lambda: self.performed[kind] < self.queued[kind])
            await workflow.execute_activity(
                bare_noop, kind, start_to_close_timeout=timedelta(seconds=30)
            )
            self.performed[kind] += 1

    def _settled(self) -> bool:
        return self.done == self.plan.updates and self.performed == self.queued

    @workflow.run
    async def run(self, plan: BarePlan) -> int:
        pumps = [asyncio.create_task(self._pump(kind)) for kind in self.queued]
        await workflow.wait_condition(self._settled)
        await workflow.wait_condition(workflow.all_handlers_finished)
        for pump in pumps:
            pump.cancel()
        return self.done

    @workflow.update
    async def act(self, step: int) -> int:
        self.queued["write"] += self.plan.writes[step]
        self.queued["email"] += self.plan.emails[step]
        written = self.queued["write"]
        await workflow.wait_condition(lambda: self.performed["write"] >= written)
        self.done += 1
        return self.done
