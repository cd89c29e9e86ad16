"""Who may refer whom, on the dev server with the real worker: a prospect is its registrable
domain; no self-referral; public sector by domain; ProtectedUntil lists what expires soon."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from devstack.factories import submission
from devstack.settings import SETTINGS
from starter.domains import registrable_domain
from starter.intake import DuplicateReferral, SubmissionRefused, submit_referral
from tests.conftest import Live, eventually
from tests.desk import act_by_id
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralState
from workflows.models.values import Action
from workflows.referral import PROTECTED_KEY


def unique() -> str:
    return uuid.uuid4().hex[:8]


async def submit(live: Live, rules: ProgramRules, **changes: Any) -> str:
    return await submit_referral(live.client, live.engine, rules, submission(**changes), SETTINGS)


@pytest.mark.parametrize(
    ("given", "registrable"),
    [
        ("https://www.shop.acme.co.uk/x", "acme.co.uk"),
        ("ACME.CO.UK", "acme.co.uk"),
        ("http://a.github.io/", "a.github.io"),  # a private suffix: each site is its own
        ("https://www.boulangerie.paris.fr/", "paris.fr"),
        ("exemple.com.", "exemple.com"),
    ],
)
def test_registrable_domain(given: str, registrable: str) -> None:
    assert registrable_domain(given) == registrable


async def test_one_prospect_per_registrable_domain(live: Live, rules: ProgramRules) -> None:
    name = f"acme-{unique()}"
    first = await submit(live, rules, **{"prospect.website": f"https://www.shop.{name}.co.uk/x"})
    with pytest.raises(DuplicateReferral) as refused:
        await submit(live, rules, **{"prospect.website": f"{name}.co.uk"})
    assert refused.value.domain == f"{name}.co.uk"
    assert str(refused.value) == (
        f"prospect {name}.co.uk already has an open referral, being reviewed"
    )
    state = await live.client.get_workflow_handle(first).query("state", result_type=ReferralState)
    assert state.prospect_domain == f"{name}.co.uk"
    # Two sites under a private suffix are two prospects.
    a = await submit(live, rules, **{"prospect.website": f"https://a-{name}.github.io/"})
    b = await submit(live, rules, **{"prospect.website": f"https://b-{name}.github.io/"})
    for rid in (first, a, b):
        await act_by_id(live.client, rid, Action.CANCEL, reason="test over")


async def test_duplicate_names_the_end_of_protection(live: Live, rules: ProgramRules) -> None:
    site = f"https://www.{unique()}-fromages.example/"
    rid = await submit(live, rules, **{"prospect.website": site})
    await act_by_id(live.client, rid, Action.CONTACTED)
    accepted = await act_by_id(live.client, rid, Action.ACCEPT)
    assert accepted.protected_until is not None
    with pytest.raises(DuplicateReferral) as refused:
        await submit(
            live,
            rules,
            **{"prospect.website": site, "referrer.email": "autre@conseil.example"},
        )
    message = str(refused.value)
    assert message.endswith(f"protected until {accepted.protected_until:%Y-%m-%d}")
    assert accepted.referrer.name not in message and str(accepted.referrer.email) not in message
    await act_by_id(live.client, rid, Action.CANCEL, reason="test over")


async def test_self_referral_is_refused(live: Live, rules: ProgramRules) -> None:
    company = f"conseil-{unique()}.fr"
    with pytest.raises(SubmissionRefused) as refused:
        await submit(
            live,
            rules,
            **{
                "referrer.email": f"jeanne@{company}",
                "prospect.website": f"https://shop.{company}",
            },
        )
    (error,) = refused.value.errors
    assert (error.field, error.code) == ("prospect.website", "self_referral")
    assert "your own company" in error.message


@pytest.mark.parametrize(
    ("website", "suffix"),
    [
        ("https://www.impots.gouv.fr/", "gouv.fr"),
        ("https://data.gov", "gov"),
        ("https://www.nhs.gov.uk", "gov.uk"),
        ("https://commission.europa.eu/", "europa.eu"),
    ],
)
async def test_public_sector_by_domain_whatever_the_form_says(
    live: Live, rules: ProgramRules, website: str, suffix: str
) -> None:
    with pytest.raises(SubmissionRefused) as refused:
        await submit(live, rules, **{"prospect.website": website, "prospect.sector": "private"})
    (error,) = refused.value.errors
    assert (error.field, error.code) == ("prospect.website", "public_sector_domain")
    assert f"under {suffix}" in error.message and "public sector excluded" in error.message


async def test_protected_until_lists_what_expires_soon(live: Live, rules: ProgramRules) -> None:
    domain = f"{unique()}-expires.example"
    rid = await submit(live, rules, **{"prospect.website": f"https://{domain}"})
    await act_by_id(live.client, rid, Action.CONTACTED)
    accepted = await act_by_id(live.client, rid, Action.ACCEPT)
    assert accepted.protected_until is not None
    soon = datetime.now(UTC) + timedelta(days=rules.protection.days + 1)
    query = (
        f'ProspectDomain = "{domain}" AND ProtectedUntil < "{soon.isoformat()}" '
        'AND ExecutionStatus = "Running"'
    )

    async def listed() -> bool:
        return [w.id async for w in live.client.list_workflows(query)] == [rid]

    await eventually(listed)
    extended = await act_by_id(live.client, rid, Action.EXTEND, days=30, reason="budget vote")
    assert extended.protected_until == accepted.protected_until + timedelta(days=30)

    async def moved() -> bool:
        return [w.id async for w in live.client.list_workflows(query)] == []

    await eventually(moved)
    handle = live.client.get_workflow_handle(rid)
    described = await handle.describe()
    assert described.typed_search_attributes.get(PROTECTED_KEY) == extended.protected_until
    # Won: the protection no longer runs, and a search for what expires soon skips it.
    await act_by_id(live.client, rid, Action.APPROVE)
    await act_by_id(live.client, rid, Action.WON, amount="180000", currency="EUR")
    described = await handle.describe()
    assert described.typed_search_attributes.get(PROTECTED_KEY) is None
    await act_by_id(live.client, rid, Action.CANCEL, reason="test over")
