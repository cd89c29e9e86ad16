"""Staff actions from a referral's page (`/staff/referrals/{id}`): a form per action the stage
and the member's roles allow, applied through the workflow's `act` update by a real worker on
the dev server, recorded as the signed-in address. Signed in by the emailed link."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html import unescape
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from activities.queries import load_referral
from core.roles import refusal
from devstack.factories import submission
from devstack.settings import SETTINGS, settings_with
from starter.intake import submit_referral
from starter.web import create_app
from starter.web.signin import STAFF
from tests.activities.test_system_of_record import KEY
from tests.conftest import Live, in_process
from tests.web.test_sign_in import ask, settle
from workflows.models.program import ProgramRules, StaffRoles, StaffRules
from workflows.models.referral import Stage
from workflows.models.values import Action

# A short wait for a worker: the test of no worker answers within it.
TIMEOUT_SECONDS = 2.0


@dataclass
class Desk:
    app: FastAPI
    sales: str
    finance: str


def staff_address(role: str) -> str:
    return f"{role}-{uuid.uuid4().hex[:8]}@nuage-logiciel.example"


def desk_app(
    live: Live, rules: ProgramRules, sales: str, finance: str | None = None, **settings: Any
) -> FastAPI:
    """The app, its staff `sales` and `finance`, with `settings` changed (a signing key…)."""
    staff = StaffRules(roles=StaffRoles(sales=[sales], finance=[finance] if finance else []))
    return create_app(
        settings_with(live.sink, cli_timeout_s=TIMEOUT_SECONDS, **settings),
        rules=rules.model_copy(update={"staff": staff}),
        engine=live.engine,
        client=live.client,
        key=KEY,
        rate_limit="off",
    )


@pytest.fixture
def desk(live: Live, rules: ProgramRules) -> Desk:
    sales, finance = staff_address("sales"), staff_address("finance")
    return Desk(desk_app(live, rules, sales, finance), sales, finance)


async def sign_in(client: httpx.AsyncClient, live: Live, email: str) -> None:
    await ask(client, STAFF.home, email)
    [link] = await settle(live.sink, email, 1)
    page = await client.get(link)
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    opened = await client.post(link.partition("?")[0], data={"csrf": csrf, "lang": "en"})
    assert opened.status_code == 303


def browser(app: FastAPI) -> httpx.AsyncClient:
    return in_process(app, base_url="http://test")


@pytest_asyncio.fixture
async def sales(desk: Desk, live: Live) -> AsyncIterator[httpx.AsyncClient]:
    async with browser(desk.app) as client:
        await sign_in(client, live, desk.sales)
        yield client


@pytest_asyncio.fixture
async def finance(desk: Desk, live: Live) -> AsyncIterator[httpx.AsyncClient]:
    async with browser(desk.app) as client:
        await sign_in(client, live, desk.finance)
        yield client


async def new_referral(live: Live, rules: ProgramRules, task_queue: str | None = None) -> str:
    settings = SETTINGS if task_queue is None else settings_with(task_queue=task_queue)
    website = f"https://desk-{uuid.uuid4().hex[:8]}.example"
    return await submit_referral(
        live.client, live.engine, rules, submission(**{"prospect.website": website}), settings
    )


def page_of(rid: str) -> str:
    return f"/staff/referrals/{rid}?lang=en"


def forms(page: str) -> dict[str, dict[str, str]]:
    """Each action form on `page`: its hidden and typed values, by action."""
    found = {}
    for action, body in re.findall(
        r'<form method="post" action="[^"]+"[^>]*data-action="([^"]+)">(.*?)</form>', page, re.S
    ):
        found[action] = {
            name: unescape(value)
            for name, value in re.findall(r'<input[^>]*name="([^"]+)" value="([^"]*)"', body, re.S)
        }
    return found


def stage_of(page: str) -> str:
    [stage] = re.findall(r'data-fact="stage" data-stage="([^"]+)"', page)
    return stage


def problem_of(page: str) -> str:
    [problem] = re.findall(r'id="action-problem">(.*?)</div>', page, re.S)
    return unescape(problem)


async def act(client: httpx.AsyncClient, rid: str, action: Action, **values: str) -> httpx.Response:
    """What a member does: open the page, fill in the action's form and send it."""
    page = await client.get(page_of(rid))
    assert page.status_code == 200
    form = forms(page.text)[action.value]
    return await client.post(f"/staff/referrals/{rid}/actions/{action.value}", data=form | values)


def history(live: Live, rid: str) -> list[tuple[str, str]]:
    state = load_referral(live.engine, rid)
    assert state is not None
    return [(entry.action, entry.actor) for entry in state.history]


async def test_sales_and_finance_walk_a_referral_to_its_payout(
    desk: Desk,
    sales: httpx.AsyncClient,
    finance: httpx.AsyncClient,
    live: Live,
    rules: ProgramRules,
) -> None:
    rid = await new_referral(live, rules)
    first = await sales.get(page_of(rid))
    assert set(forms(first.text)) == {"contacted", "decline", "cancel"}
    assert "csrf" in forms(first.text)["contacted"]
    assert forms(first.text)["contacted"]["request_id"].startswith("web-")
    for action, values, stage in [
        (Action.CONTACTED, {"note": "phoned the referrer"}, Stage.CONTACTED),
        (Action.ACCEPT, {}, Stage.QUALIFYING),
        (Action.APPROVE, {}, Stage.APPROVED),
        (Action.WON, {"amount": "120000", "currency": "EUR"}, Stage.WON),
    ]:
        done = await act(sales, rid, action, **values)
        assert done.status_code == 303, done.text
        assert done.headers["location"] == f"/staff/referrals/{rid}?lang=en#timeline"
        page = await sales.get(page_of(rid))
        assert stage_of(page.text) == stage.value
    assert "phoned the referrer" in page.text and desk.sales in page.text
    # Sales may not record payments: the page offers only what a salesperson may do.
    assert set(forms(page.text)) == {"cancel"}
    for_finance = await finance.get(page_of(rid))
    assert set(forms(for_finance.text)) == {"payment"}
    assert "Amount paid (EUR)" in for_finance.text

    paid = await act(finance, rid, Action.PAYMENT, amount="120000", reference="INV-1")
    assert paid.status_code == 303
    page = await finance.get(page_of(rid))
    assert stage_of(page.text) == Stage.COMMISSION_PAYABLE.value
    assert set(forms(page.text)) == {"payout", "refund"}
    out = await act(finance, rid, Action.PAYOUT, reference="VIR-1")
    assert out.status_code == 303
    page = await finance.get(page_of(rid))
    assert stage_of(page.text) == Stage.COMMISSION_PAID.value and "VIR-1" in page.text
    assert history(live, rid)[1:] == [
        ("contacted", desk.sales),
        ("accept", desk.sales),
        ("approve", desk.sales),
        ("won", desk.sales),
        ("payment", desk.finance),
        ("payout", desk.finance),
    ]
    # Each signed by the desk (the test run's key, surface "tests"), and shown so.
    state = load_referral(live.engine, rid)
    assert state is not None and {entry.surface for entry in state.history[1:]} == {"tests"}
    assert page.text.count("signed by tests") == 6


async def test_a_desk_without_its_signing_key_moves_no_money(
    live: Live, rules: ProgramRules
) -> None:
    """Fail closed: the workflow refuses an unsigned `won`, and the page says why."""
    sales = staff_address("sales")
    app = desk_app(live, rules, sales, actor_signing_key=None)
    rid = await new_referral(live, rules)
    async with browser(app) as client:
        await sign_in(client, live, sales)
        for action in (Action.CONTACTED, Action.ACCEPT, Action.APPROVE):
            assert (await act(client, rid, action)).status_code == 303
        refused = await act(client, rid, Action.WON, amount="120000", currency="EUR")
    assert refused.status_code == 409
    assert problem_of(refused.text).startswith("won moves money: it needs an actor signed by")
    state = load_referral(live.engine, rid)
    assert state is not None
    assert [entry.surface for entry in state.history[1:]] == ["unauthenticated"] * 3


async def test_a_salesperson_is_offered_no_payout_and_a_crafted_one_is_refused(
    desk: Desk,
    sales: httpx.AsyncClient,
    finance: httpx.AsyncClient,
    live: Live,
    rules: ProgramRules,
) -> None:
    rid = await new_referral(live, rules)
    for action, values in [
        (Action.CONTACTED, {}),
        (Action.ACCEPT, {}),
        (Action.APPROVE, {}),
        (Action.WON, {"amount": "5000", "currency": "EUR"}),
    ]:
        assert (await act(sales, rid, action, **values)).status_code == 303
    token = forms((await sales.get(page_of(rid))).text)["cancel"]["csrf"]
    assert (
        await act(finance, rid, Action.PAYMENT, amount="5000", reference="I-2")
    ).status_code == 303
    page = await sales.get(page_of(rid))
    assert stage_of(page.text) == Stage.COMMISSION_PAYABLE.value
    assert forms(page.text) == {} and 'id="no-actions"' in page.text
    crafted = {
        "csrf": token,  # from an earlier page's form: the same cookie
        "request_id": f"web-{uuid.uuid4()}",
        "reference": "VIR-CRAFTED",
        "lang": "en",
    }
    before = history(live, rid)
    answer = await sales.post(f"/staff/referrals/{rid}/actions/payout", data=crafted)
    assert answer.status_code == 403
    assert problem_of(answer.text) == refusal(Action.PAYOUT)
    assert "payout needs the finance or manager role" in answer.text
    assert history(live, rid) == before
    assert stage_of((await sales.get(page_of(rid))).text) == Stage.COMMISSION_PAYABLE.value
    french = await sales.post(
        f"/staff/referrals/{rid}/actions/payout", data=crafted | {"lang": "fr"}
    )
    assert french.status_code == 403
    assert problem_of(french.text) == "payout nécessite le rôle finance ou manager"


async def test_the_same_form_sent_twice_applies_once(
    desk: Desk, sales: httpx.AsyncClient, live: Live, rules: ProgramRules
) -> None:
    rid = await new_referral(live, rules)
    page = await sales.get(page_of(rid))
    form = forms(page.text)["contacted"] | {"note": "double click"}
    url = f"/staff/referrals/{rid}/actions/contacted"
    first = await sales.post(url, data=form)
    again = await sales.post(url, data=form)
    assert first.status_code == again.status_code == 303
    assert history(live, rid)[1:] == [("contacted", desk.sales)]
    # Another site's form, without the page's token, does nothing.
    forged = await sales.post(
        f"/staff/referrals/{rid}/actions/accept", data=forms(page.text)["contacted"] | {"csrf": "x"}
    )
    assert forged.status_code == 403 and "This form had expired" in forged.text
    assert history(live, rid)[1:] == [("contacted", desk.sales)]


async def test_an_invalid_amount_comes_back_as_typed(
    sales: httpx.AsyncClient, live: Live, rules: ProgramRules
) -> None:
    rid = await new_referral(live, rules)
    for action in (Action.CONTACTED, Action.ACCEPT, Action.APPROVE):
        assert (await act(sales, rid, action)).status_code == 303
    page = await sales.get(page_of(rid))
    form = forms(page.text)["won"]
    answer = await sales.post(
        f"/staff/referrals/{rid}/actions/won",
        data=form | {"amount": "12 000,5 €", "currency": "EUR", "payment_terms_days": "45"},
    )
    assert answer.status_code == 422
    again = forms(answer.text)["won"]
    assert again["amount"] == "12 000,5 €" and again["payment_terms_days"] == "45"
    assert again["request_id"] == form["request_id"]
    assert 'id="won-amount-error"' in answer.text and "A decimal number" in answer.text
    assert stage_of(answer.text) == Stage.APPROVED.value
    days = await sales.post(
        f"/staff/referrals/{rid}/actions/won",
        data=form | {"amount": "1000", "currency": "EUR", "payment_terms_days": "soon"},
    )
    assert days.status_code == 422 and 'id="won-payment_terms_days-error"' in days.text
    missing = await sales.post(
        f"/staff/referrals/{rid}/actions/lost", data=forms(page.text)["lost"]
    )
    assert missing.status_code == 422 and 'id="lost-reason-error"' in missing.text
    assert history(live, rid)[-1][0] == "approve"


async def test_a_refused_action_shows_the_workflows_reason(
    desk: Desk, sales: httpx.AsyncClient, live: Live, rules: ProgramRules
) -> None:
    rid = await new_referral(live, rules)
    page = await sales.get(page_of(rid))
    form = forms(page.text)["contacted"]
    # `accept` is not offered while the referral is only submitted: sent all the same.
    answer = await sales.post(
        f"/staff/referrals/{rid}/actions/accept", data=form | {"note": "typed with care"}
    )
    assert answer.status_code == 409
    assert problem_of(answer.text) == (
        "accept is not allowed in stage submitted (allowed: contacted, decline, cancel)"
    )
    kept = forms(answer.text)["accept"]
    assert kept["note"] == "typed with care" and kept["request_id"] != form["request_id"]
    assert history(live, rid) == [("submitted", "referrer")]


async def test_with_no_worker_the_page_says_so_and_offers_the_same_request(
    desk: Desk, sales: httpx.AsyncClient, live: Live, rules: ProgramRules
) -> None:
    rid = await new_referral(live, rules, task_queue=f"nobody-{uuid.uuid4().hex[:8]}")
    try:
        page = await sales.get(page_of(rid))
        form = forms(page.text)["contacted"] | {"note": "no one home"}
        started = time.monotonic()
        answer = await sales.post(f"/staff/referrals/{rid}/actions/contacted", data=form)
        assert time.monotonic() - started < TIMEOUT_SECONDS + 3
        assert answer.status_code == 503
        assert problem_of(answer.text).startswith(
            f"No worker answered within {TIMEOUT_SECONDS:g} s."
        )
        again = forms(answer.text)["contacted"]
        assert again["request_id"] == form["request_id"] and again["note"] == "no one home"
        assert "Send again" in answer.text
    finally:
        await live.client.get_workflow_handle(rid).terminate("test over")
