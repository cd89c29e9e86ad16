"""End to end on the real dev server: real activities, real SMTP, a real database."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
from sqlmodel import Session
from temporalio.api.sdk.v1 import WorkflowMetadata

from activities.db import CommissionRow, ProspectClaim
from starter.intake import DuplicateReferral, submit_referral
from tests.conftest import SETTINGS, Live, eventually
from tests.desk import act_by_id
from tests.factories import submission
from workflows.models import Action, ProgramRules, ReferralState, Stage


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
