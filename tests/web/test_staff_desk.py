"""The staff desk's pages in process (`/staff/referrals` and one referral's file), on the known
referrals of tests/web/test_figures.py, signed in by the emailed link: a manager from the
dashboard's figures, a salesperson (no figures) straight to the list."""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import unescape

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from activities.queries import load_referral
from devstack.servers import MailSink
from devstack.web import use_sign_in_link
from starter.web.signin import STAFF
from tests.conftest import in_process
from tests.web.test_sign_in import ask, settle
from tests.web.test_staff_dashboard import known_db, staff_app  # noqa: F401 - known_db: a fixture
from workflows.models.program import ProgramRules, StaffRoles

FIGURES = 12  # the known referrals


def desk_app(engine: Engine, rules: ProgramRules, mail_sink: MailSink, sales: str) -> FastAPI:
    """The staff routes with a manager (staff.emails, as before roles) and `sales`."""
    app = staff_app(engine, rules, mail_sink, f"manager-{uuid.uuid4().hex[:8]}@example.com")
    site = app.state.site
    site.rules = site.rules.model_copy(
        update={"staff": site.rules.staff.model_copy(update={"roles": StaffRoles(sales=[sales])})}
    )
    return app


@pytest.fixture
def sales_email() -> str:
    return f"sales-{uuid.uuid4().hex[:8]}@nuage-logiciel.example"


@asynccontextmanager
async def signed_in(
    app: FastAPI, mail_sink: MailSink, email: str
) -> AsyncIterator[httpx.AsyncClient]:
    """A browser on `app`, signed in as `email` through the emailed link."""
    async with in_process(app) as client:
        await ask(client, STAFF.home, email)
        [link] = await settle(mail_sink, email, 1)
        assert (await use_sign_in_link(client, link)).status_code == 303
        yield client


@pytest_asyncio.fixture
async def manager(
    known_db: Engine,  # noqa: F811 - the fixture of tests/web/test_staff_dashboard.py
    shipped_rules: ProgramRules,
    mail_sink: MailSink,
    staff_email: str,
) -> AsyncIterator[httpx.AsyncClient]:
    app = staff_app(known_db, shipped_rules, mail_sink, staff_email)
    async with signed_in(app, mail_sink, staff_email) as client:
        yield client


@pytest_asyncio.fixture
async def sales(
    known_db: Engine,  # noqa: F811 - the fixture of tests/web/test_staff_dashboard.py
    shipped_rules: ProgramRules,
    mail_sink: MailSink,
    sales_email: str,
) -> AsyncIterator[httpx.AsyncClient]:
    app = desk_app(known_db, shipped_rules, mail_sink, sales_email)
    async with signed_in(app, mail_sink, sales_email) as client:
        yield client


@pytest.fixture
def staff_email() -> str:
    return f"manager-{uuid.uuid4().hex[:8]}@nuage-logiciel.example"


def listed(page: str) -> list[str]:
    """The referral ids of the list's rows, in order."""
    return re.findall(r'<tr data-referral="([^"]+)"', page)


def count_of(page: str) -> int:
    [count] = re.findall(r'<p id="count">\s*([\d\u202f\xa0 ]+)', page)
    return int(re.sub(r"\D", "", count))


async def test_signed_out_visitors_get_the_sign_in_form_and_no_referral(
    known_db: Engine,  # noqa: F811 - the fixture of tests/web/test_staff_dashboard.py
    shipped_rules: ProgramRules,
    mail_sink: MailSink,
) -> None:
    app = staff_app(known_db, shipped_rules, mail_sink, "someone@example.com")
    async with in_process(app) as visitor:
        page = await visitor.get("/staff/referrals?lang=en")
        one = await visitor.get("/staff/referrals/R-FIG01?lang=en")
        spreadsheet = await visitor.get("/staff/referrals.csv")
    assert page.status_code == one.status_code == 200
    assert 'id="email"' in page.text and "R-FIG" not in page.text and "R-FIG" not in one.text
    assert spreadsheet.status_code == 303


async def test_every_referral_newest_first_with_each_filter(manager: httpx.AsyncClient) -> None:
    every = await manager.get("/staff/referrals?lang=en")
    assert every.status_code == 200 and every.headers["cache-control"] == "no-store"
    ids = listed(every.text)
    assert count_of(every.text) == len(ids) == FIGURES
    assert ids[0] == "R-FIG11"  # received last (NOW minus 200 h)
    for query, expected in [
        ("stage=won", {"R-FIG03"}),
        ("search=r-fig0", {f"R-FIG0{n}" for n in range(1, 10)}),
        ("contact_breached=true", {"R-FIG11"}),
    ]:
        page = await manager.get(f"/staff/referrals?{query}&lang=en")
        assert set(listed(page.text)) >= expected, query
        assert count_of(page.text) == len(listed(page.text))
    won = await manager.get("/staff/referrals?stage=won&lang=en")
    assert listed(won.text) == ["R-FIG03"]


async def test_a_bad_filter_is_named_and_the_rest_still_apply(manager: httpx.AsyncClient) -> None:
    page = await manager.get("/staff/referrals?stage=won&submitted_from=31-12-2026&lang=en")
    assert page.status_code == 200
    assert 'id="filter-problems"' in page.text and 'data-field="submitted_from"' in page.text
    assert listed(page.text) == ["R-FIG03"]


async def test_the_dashboards_figures_link_to_the_referrals_they_count(
    manager: httpx.AsyncClient,
) -> None:
    dashboard = await manager.get("/staff?lang=en")
    links = re.findall(r'<a href="([^"]+)" data-figure="([^"]+)">([^<]*)</a>', dashboard.text)
    assert {key for _, key, _ in links} >= {"funnel.submitted", "funnel.won", "contact.breaches"}
    tables = {"contact.breaches": "breaches", "protections.ending": "protections"}
    for href, key, shown in links:
        page = await manager.get(unescape(href))
        assert page.status_code == 200, key
        if key in tables:  # as many as the dashboard's table of them has rows
            table = dashboard.text.partition(f'<table id="{tables[key]}"')[2]
            expected = table.partition("</table>")[0].count("<tr>") - 1 if table else 0
        else:  # the number shown
            expected = int(re.sub(r"\D", "", shown))
        assert count_of(page.text) == expected, key


async def test_the_csv_holds_every_matching_referral(manager: httpx.AsyncClient) -> None:
    answer = await manager.get("/staff/referrals.csv?product=&search=R-FIG")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    assert 'filename="referrals-' in answer.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert len(rows) == FIGURES


async def test_one_referrals_file_from_the_database(
    manager: httpx.AsyncClient,
    known_db: Engine,  # noqa: F811 - the fixture of tests/web/test_staff_dashboard.py
) -> None:
    state = load_referral(known_db, "R-FIG02")
    assert state is not None
    page = await manager.get("/staff/referrals/R-FIG02?lang=en")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    text = unescape(page.text)
    assert state.prospect.company in text and str(state.referrer.email) in text
    assert 'data-stage="commission_payable"' in text or 'data-stage="won"' in text
    timeline = re.findall(r'<tr data-seq="\d+" data-outcome="(\w+)">', page.text)
    assert len(timeline) >= len(state.history) > 0
    assert 'data-kind="accrual"' in page.text  # its ledger
    assert "one site dropped" in text  # the refund's reason
    assert 'id="workflow"' in page.text and "/workflows/R-FIG02" in page.text
    missing = await manager.get("/staff/referrals/R-NOPE?lang=en")
    assert missing.status_code == 404


async def test_a_salesperson_has_the_desk_and_not_the_figures(
    sales: httpx.AsyncClient,
) -> None:
    home = await sales.get("/staff?lang=fr")
    assert home.status_code == 303 and home.headers["location"] == "/staff/referrals?lang=fr"
    assert (await sales.get("/staff/charts/funnel.svg")).status_code == 403
    page = await sales.get(home.headers["location"])
    assert page.status_code == 200 and listed(page.text)
    assert "Tous les référencements" not in page.text and "Référencements" in page.text
    file = await sales.get("/staff/referrals/R-FIG01?lang=fr")
    assert "Chronologie" in file.text
