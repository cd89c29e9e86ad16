"""End to end on the real dev server: real activities, real SMTP, a real database."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlmodel import Session
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    StartWorkflowInput,
    WorkflowExecutionStatus,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.db import CommissionRow, ProspectClaim
from activities.queries import load_referral
from devstack.factories import submission
from devstack.settings import SETTINGS
from starter.domains import registrable_domain
from starter.intake import DuplicateReferral, submit_referral
from tests.conftest import Live, eventually
from tests.desk import act_by_id
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralState, Stage
from workflows.models.values import Action


def unique_site() -> str:
    return f"https://www.prospect-{uuid.uuid4().hex[:8]}.example/"


async def test_referral_runs_to_commission_paid(live: Live, rules: ProgramRules) -> None:
    referral_id = await submit_referral(
        live.client, live.engine, rules, submission(**{"prospect.website": unique_site()}), SETTINGS
    )
    await act_by_id(live.client, referral_id, Action.CONTACTED, note="called the referrer")
    await act_by_id(live.client, referral_id, Action.ACCEPT)
    await act_by_id(live.client, referral_id, Action.APPROVE)
    await act_by_id(live.client, referral_id, Action.WON, amount=Decimal("180000"), currency="EUR")
    await act_by_id(
        live.client, referral_id, Action.PAYMENT, amount=Decimal("100000"), reference="INV-1"
    )
    await act_by_id(
        live.client, referral_id, Action.PAYMENT, amount=Decimal("80000"), reference="INV-2"
    )
    await act_by_id(live.client, referral_id, Action.PAYOUT, reference="VIR-1")
    handle = live.client.get_workflow_handle(referral_id, result_type=ReferralState)
    final = await handle.result()
    assert final.stage is Stage.COMMISSION_PAID
    assert final.commission is not None and final.commission.amount == Decimal("18000.00")

    mails = [m for m in live.sink.messages() if m["X-Referral-Id"] == referral_id]
    to_referrer = [m for m in mails if m["To"] == "claire.martin@conseil-martin.example"]
    assert len(to_referrer) == 7  # submitted, contacted, qualifying, approved, won, payable, paid
    assert all(m["Content-Language"] == "fr" for m in to_referrer)
    staff = sorted(str(m["To"]) for m in mails if m not in to_referrer)
    assert staff == sorted(
        [
            str(rules.recipients.desk),
            str(rules.recipients.sales),
            str(rules.recipients.finance),
            str(rules.recipients.finance),
        ]
    )
    assert len({m["Message-ID"] for m in mails}) == len(mails)

    with Session(live.engine) as session:
        row = session.get(CommissionRow, referral_id)
        assert row is not None and row.status == "paid"
        assert row.customer_paid == Decimal("180000")
        assert session.get(ProspectClaim, final.prospect_domain) is None


async def test_search_attributes_summary_and_details(live: Live, rules: ProgramRules) -> None:
    site = unique_site()
    referral_id = await submit_referral(
        live.client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
    )
    for action in (Action.CONTACTED, Action.ACCEPT, Action.APPROVE):
        await act_by_id(live.client, referral_id, action)
    state = await act_by_id(
        live.client, referral_id, Action.WON, amount=Decimal("50000"), currency="EUR"
    )
    query = f"ReferralStage = 'won' AND ProspectDomain = '{state.prospect_domain}'"

    async def listed() -> bool:
        return [wf.id async for wf in live.client.list_workflows(query)] == [referral_id]

    await eventually(listed)
    handle = live.client.get_workflow_handle(referral_id)
    description = await handle.describe()
    assert "Fromagerie Bellevue SAS" in (await description.static_summary() or "")
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "**Stage:** won" in metadata.current_details
    assert "payment reminder" in metadata.current_details
    assert "5000.00 EUR" in metadata.current_details
    await act_by_id(live.client, referral_id, Action.CANCEL, reason="test over")


async def test_one_open_referral_per_prospect(live: Live, rules: ProgramRules) -> None:
    site = unique_site()
    attempts = [
        submit_referral(
            live.client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
        )
        for _ in range(8)
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    accepted = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, DuplicateReferral)]
    assert len(accepted) == 1 and len(refused) == 7, results
    assert all(r.referral_id == accepted[0] for r in refused)
    # The same prospect written differently is the same prospect.
    with pytest.raises(DuplicateReferral):
        await submit_referral(
            live.client,
            live.engine,
            rules,
            submission(**{"prospect.website": site.replace("https://www.", "HTTP://")}),
            SETTINGS,
        )
    # Once the referral is closed, the prospect can be referred again.
    await act_by_id(live.client, accepted[0], Action.DECLINE, reason="already a customer")

    async def released() -> bool:
        with Session(live.engine) as session:
            return session.get(ProspectClaim, refused[0].domain) is None

    await eventually(released)
    again = await submit_referral(
        live.client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
    )
    assert again != accepted[0]
    await act_by_id(live.client, again, Action.CANCEL, reason="test over")


class StartAnswers(Interceptor):
    """A client whose start answers `error`, after starting the workflow when `reached`: a
    reply lost on the way back, or a refusal."""

    def __init__(self, error: Exception, reached: bool) -> None:
        self.error, self.reached = error, reached

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        outer = self

        class Start(OutboundInterceptor):
            async def start_workflow(self, input: StartWorkflowInput) -> Any:
                if outer.reached:
                    await super().start_workflow(input)
                raise outer.error

        return Start(next)


@pytest.mark.parametrize(
    ("error", "reached", "kept"),
    [
        (RPCError("deadline exceeded", RPCStatusCode.DEADLINE_EXCEEDED, b""), True, True),
        (RPCError("deadline exceeded", RPCStatusCode.DEADLINE_EXCEEDED, b""), False, False),
        (RPCError("unavailable", RPCStatusCode.UNAVAILABLE, b""), False, False),
    ],
)
async def test_a_failed_start_is_cleaned_up_only_when_it_did_not_reach_temporal(
    live: Live, rules: ProgramRules, error: RPCError, reached: bool, kept: bool
) -> None:
    """The intake asks Temporal what an ambiguous error means: a start that reached it keeps
    its referral (and answers with its id), one that did not leaves nothing behind."""
    client = Client(
        live.client.service_client,
        namespace=live.client.namespace,
        data_converter=live.client.data_converter,
        interceptors=[StartAnswers(error, reached)],
    )
    site = unique_site()
    if kept:
        referral_id = await submit_referral(
            client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
        )
        assert load_referral(live.engine, referral_id) is not None
        handle = live.client.get_workflow_handle(referral_id)
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        await act_by_id(live.client, referral_id, Action.CANCEL, reason="test over")
        return
    with pytest.raises(RPCError):
        await submit_referral(
            client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
        )
    with Session(live.engine) as session:
        assert session.get(ProspectClaim, registrable_domain(site)) is None  # free again
    again = await submit_referral(
        live.client, live.engine, rules, submission(**{"prospect.website": site}), SETTINGS
    )
    await act_by_id(live.client, again, Action.CANCEL, reason="test over")
