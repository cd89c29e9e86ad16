"""The program dashboard (`/staff`) in process: sign-in by the emailed link (a real SMTP server on
loopback), then the figures of the known referrals of tests/web/test_figures.py on the page and in
its charts."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from html import unescape
from typing import Any

import httpx
import pytest
import pytest_asyncio
import time_machine
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from activities.db import make_engine
from activities.schema import upgrade
from core.settings import Settings
from devstack.servers import MailSink
from devstack.web import use_sign_in_link
from starter.figures import ProgramFigures, program_figures
from starter.web import staff as staff_module
from starter.web.security import RateLimiter
from starter.web.signin import STAFF
from starter.web.site import Site
from starter.web.staff import (
    CHARTS,
    FIGURES_TTL_SECONDS,
    Choice,
    FiguresCache,
    add_staff_routes,
    temporal_ui_links,
)
from tests.conftest import in_process
from tests.web.test_figures import NOW, Story, hours, known_referrals, record, step
from tests.web.test_sign_in import ask, client_for, settle
from workflows.models.program import ProgramRules, StaffRules


@pytest.fixture(scope="module")
def known_db(tmp_path_factory: pytest.TempPathFactory, shipped_rules: ProgramRules) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('staff') / 'referrals.db'}")
    upgrade(engine)
    for story in known_referrals():
        record(engine, shipped_rules, story)
    return engine


@pytest.fixture
def staff_email() -> str:
    """Of this test only: the session's mail sink is shared by every test."""
    return f"manager-{uuid.uuid4().hex[:8]}@nuage-logiciel.example"


@pytest.fixture
def app(
    known_db: Engine, shipped_rules: ProgramRules, mail_sink: MailSink, staff_email: str
) -> FastAPI:
    return staff_app(known_db, shipped_rules, mail_sink, staff_email)


def staff_app(
    engine: Engine, rules: ProgramRules, mail_sink: MailSink, staff_email: str
) -> FastAPI:
    """The dashboard's routes alone, on `engine`, with `staff_email` its only staff, at NOW."""
    site = Site(
        rules=rules.model_copy(update={"staff": StaffRules(emails=[staff_email])}),
        engine=engine,
        key="staff-dashboard-test-key",
        smtp=mail_sink.settings(),
        limiter=RateLimiter.from_setting("off"),
    )
    app = FastAPI()
    add_staff_routes(app, site, clock=lambda: NOW)
    return app


@pytest_asyncio.fixture
async def visitor(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process(app) as client:
        yield client


@pytest_asyncio.fixture
async def staff(
    visitor: httpx.AsyncClient, mail_sink: MailSink, staff_email: str
) -> httpx.AsyncClient:
    """Signed in through the link emailed to a staff address."""
    await ask(visitor, STAFF.home, staff_email)
    [link] = await settle(mail_sink, staff_email, 1)
    opened = await use_sign_in_link(visitor, link)
    assert opened.status_code == 303 and opened.headers["location"].startswith(STAFF.home)
    return visitor


def row(page: str, marker: str) -> str:
    """The table row holding `marker`, tags and all, on one line."""
    at = page.index(marker)
    start, end = page.rindex("<tr", 0, at), page.index("</tr>", at)
    return re.sub(r"[ \t\r\n]+", " ", page[start:end])  # spaces in numbers stay


def cells(page: str, marker: str) -> list[str]:
    """The text of the header and data cells of the row holding `marker`."""
    return [
        re.sub(r"<[^>]+>", "", cell).strip()
        for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row(page, marker))
    ]


async def test_signed_out_visitors_get_the_sign_in_form_and_no_figures(
    visitor: httpx.AsyncClient,
) -> None:
    page = await visitor.get("/staff?lang=en")
    chart = await visitor.get("/staff/charts/funnel.svg")

    assert page.status_code == 200
    assert 'id="email"' in page.text and "Program dashboard" in page.text
    assert 'id="funnel"' not in page.text
    assert chart.status_code == 403 and chart.content == b""


async def test_an_address_not_on_the_staff_list_gets_the_same_answer_and_no_email(
    visitor: httpx.AsyncClient, mail_sink: MailSink, staff_email: str
) -> None:
    stranger = f"someone-{uuid.uuid4().hex[:8]}@partner-a.example"

    for_stranger = await ask(visitor, STAFF.home, stranger)
    for_staff = await ask(visitor, STAFF.home, staff_email)

    assert for_stranger.status_code == for_staff.status_code == 200
    assert for_stranger.text == for_staff.text
    assert len(await settle(mail_sink, staff_email, 1)) == 1
    assert mail_sink.sign_in_links(stranger) == []


async def test_the_page_shows_the_known_figures(staff: httpx.AsyncClient, staff_email: str) -> None:
    response = await staff.get("/staff?lang=en")
    page = response.text

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert f"Signed in as {staff_email}." in page
    assert "12 referrals in all." in page
    assert cells(page, 'data-stage="submitted"><th') == ["Submitted", "12", "—"]
    funnel = [
        ("contacted", "Contacted", "10", "83.33%"),
        ("qualifying", "Accepted (qualifying)", "9", "90%"),
        ("approved", "Approved", "6", "66.67%"),
        ("won", "Won", "4", "66.67%"),
        ("commission_payable", "Commission payable", "2", "50%"),
        ("commission_paid", "Commission paid", "1", "50%"),
    ]
    funnel_table = page.split('id="funnel"')[1].split("</table>")[0]
    for stage, *shown in funnel:
        assert cells(funnel_table, f'data-stage="{stage}"') == shown
    ended_table = page.split('id="ended"')[1].split("</table>")[0]
    assert cells(ended_table, 'data-stage="declined"') == ["Declined", "2"]
    assert cells(ended_table, 'data-stage="expired"') == ["Expired", "1"]
    time_table = page.split('id="time"')[1].split("</table>")[0]
    assert cells(time_table, 'data-stage="submitted"') == ["Submitted", "11", "2.00", "5.00"]
    assert cells(time_table, 'data-stage="contacted"') == ["Contacted", "10", "1.50", "3.10"]
    assert cells(time_table, 'data-stage="qualifying"') == [
        "Accepted (qualifying)", "8", "15.00", "75.00"
    ]  # fmt: skip
    assert cells(page, 'data-when="before_reminder"') == ["Before the reminder", "8", "80%"]
    assert cells(page, 'data-when="before_deadline"') == ["Before the deadline", "9", "90%"]
    assert "Of 10 referrals contacted" in page
    assert "Contact deadline breached in 2027-03: 1 referral" in page
    assert cells(page, ">R-FIG11</a>") == [
        "R-FIG11", "Fromagerie Bellevue SAS", "hcm-talent", "Submitted", "March 8, 2027"
    ]  # fmt: skip
    assert "Protection ending within 30 days: 1 referral" in page
    assert cells(page, ">R-FIG10</a>")[3:] == ["Accepted (qualifying)", "March 27, 2027"]
    assert cells(page, 'data-month="2026-11"') == ["2026-11", "€20,000.00", "€0.00", "€10,000.00"]
    assert cells(page, 'data-month="2027-01"') == ["2027-01", "€0.00", "€15,000.00", "€0.00"]
    assert cells(page, 'alice@partner-a.example</th><td class="num" data-count') == [
        "alice@partner-a.example", "5", "2"
    ]  # fmt: skip
    assert cells(page, 'alice@partner-a.example</th><td class="num" data-earned') == [
        "alice@partner-a.example", "€25,000.00"
    ]  # fmt: skip


# The figures' "now" is the app's clock (NOW here), never the machine's: each date below is one
# where "this month" or "within 30 days" would move if it followed the machine's clock.
MACHINE_DATES = [
    "2026-12-01T00:30:00+01:00",  # a month's first half hour, in the program's time zone
    "2027-02-28T23:30:00+01:00",  # a month's last
    "2026-12-31T23:59:00+01:00",  # the year's last minute
    "2027-01-01T00:01:00+01:00",  # the year's first
    "2027-03-28T01:59:00+01:00",  # a minute before summer time starts in Paris
    "2027-03-28T03:01:00+02:00",  # a minute after
    "2027-10-31T02:30:00+01:00",  # the autumn hour that happens twice, the second time
]


@pytest.mark.parametrize("machine_date", MACHINE_DATES)
async def test_the_page_is_the_same_whatever_the_machine_date(
    known_db: Engine, shipped_rules: ProgramRules, mail_sink: MailSink, machine_date: str
) -> None:
    async def page() -> str:
        """Signed in as a staff member of its own, whose one link is the one to open (the sink
        orders links by delivery time, which the travel moves)."""
        email = f"manager-{uuid.uuid4().hex[:8]}@nuage-logiciel.example"
        async with client_for(staff_app(known_db, shipped_rules, mail_sink, email)) as web:
            await ask(web, STAFF.home, email)
            [link] = await settle(mail_sink, email, 1)
            assert (await use_sign_in_link(web, link)).status_code == 303
            shown = (await web.get("/staff?lang=en")).text
        return re.sub(r'name="csrf" value="[^"]+"', "", shown).replace(email, "")

    today = await page()
    moment = datetime.fromisoformat(machine_date)
    with time_machine.travel(moment, tick=True):
        assert datetime.now(UTC) - moment < timedelta(minutes=1)
        then = await page()

    assert then == today
    assert "Contact deadline breached in 2027-03: 1 referral" in then


async def test_each_listed_referral_links_to_its_workflow_in_the_temporal_ui(
    staff: httpx.AsyncClient,
) -> None:
    default = (await staff.get("/staff?lang=en")).text
    configured = Settings.from_env(
        {
            "REFERRALS_TEMPORAL_UI_URL": "https://temporal.example.com/",
            "TEMPORAL_NAMESPACE": "referrals-prod",
        }
    )

    assert re.findall(r'href="(http[^"]+)" class="workflow"', default) == [
        "http://127.0.0.1:8233/namespaces/default/workflows/R-FIG11",
        "http://127.0.0.1:8233/namespaces/default/workflows/R-FIG10",
    ]
    assert temporal_ui_links(configured)("R-FIG10") == (
        "https://temporal.example.com/namespaces/referrals-prod/workflows/R-FIG10"
    )


async def test_period_and_product(staff: httpx.AsyncClient) -> None:
    chosen = (await staff.get("/staff?lang=en&since=2026-09-01&product=hcm-talent")).text
    wrong = (await staff.get("/staff?lang=en&since=yesterday&product=nothing")).text

    assert "3 referrals submitted since September 1, 2026." in chosen
    assert '<option value="hcm-talent" selected>' in chosen
    assert cells(chosen.split('id="funnel"')[1], 'data-stage="contacted"')[1:] == ["2", "66.67%"]
    assert 'src="/staff/charts/funnel.svg?lang=en&amp;since=2026-09-01&amp;product=hcm-talent"' in (
        chosen
    )
    assert 'id="since-error"' in wrong and 'id="product-error"' in wrong
    assert "12 referrals in all." in wrong


async def test_the_page_in_french(staff: httpx.AsyncClient) -> None:
    page = (await staff.get("/staff?lang=fr")).text

    assert '<html lang="fr">' in page
    assert "Tableau de bord du programme" in page and "12 référencements en tout." in page
    funnel_table = page.split('id="funnel"')[1]
    assert cells(funnel_table, 'data-stage="contacted"') == ["Contacté", "10", "83,33\u00a0%"]
    assert cells(page, 'data-month="2027-01"')[2] == "15\u202f000,00\u00a0€"


@pytest.mark.parametrize("name", CHARTS)
async def test_charts_are_svg_drawn_here_with_their_numbers(
    staff: httpx.AsyncClient, name: str
) -> None:
    chart = await staff.get(f"/staff/charts/{name}.svg?lang=en")

    assert chart.status_code == 200
    assert chart.headers["content-type"] == "image/svg+xml"
    svg = chart.text
    assert "<script" not in svg
    assert re.findall(r"https?://[^\"'\s<>]+", svg) == ["http://www.w3.org/2000/svg"]
    numbers = {
        "funnel": ["Referrals reaching each step", ">12<", ">10<", ">9<"],
        "ended": ["Referrals ended without a commission", ">2<"],
        "time": ["Days spent in each stage", ">75<", ">1.5<", ">3.1<"],
        "contact": ["Referrers contacted in time", ">80%<", ">90%<"],
        "commission": ["Commission by month won (EUR)", ">20,000<", ">15,000<", ">10,000<"],
        "referrers": ["Top referrers", "alice@partner-a.example", ">5<"],
    }
    for expected in numbers[name]:
        assert expected in svg, expected


async def test_a_chart_in_french_and_an_unknown_chart(staff: httpx.AsyncClient) -> None:
    french = (await staff.get("/staff/charts/funnel.svg?lang=fr")).text
    unknown = await staff.get("/staff/charts/pie.svg")

    assert (
        "Référencements parvenus à chaque étape" in french and "Accepté (qualification)" in french
    )
    assert unknown.status_code == 404


# --- the figures, computed once per view --------------------------------------------------


async def test_the_page_and_its_charts_compute_the_figures_once(
    staff: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed: list[tuple[object, object]] = []

    def counted(*args: Any, **kwargs: Any) -> ProgramFigures:
        computed.append((kwargs.get("since"), kwargs.get("product")))
        return program_figures(*args, **kwargs)

    monkeypatch.setattr(staff_module, "program_figures", counted)
    page = (await staff.get("/staff?lang=en")).text
    charts = [unescape(src) for src in re.findall(r'src="(/staff/charts/[^"]+)"', page)]
    answers = await asyncio.gather(*(staff.get(src) for src in charts))
    again = await staff.get("/staff?lang=fr")  # the same figures, in French
    other = await staff.get("/staff?lang=en&product=hcm-talent")
    other_chart = await staff.get("/staff/charts/funnel.svg?lang=en&product=hcm-talent")

    assert len(charts) == len(CHARTS)
    assert all(a.status_code == 200 for a in answers) and again.status_code == 200
    assert "3 referrals" in other.text and ">3<" in other_chart.text
    assert computed == [(None, None), (None, "hcm-talent")]


async def test_a_change_to_the_data_shows_at_once(
    engine: Engine, shipped_rules: ProgramRules, mail_sink: MailSink, staff_email: str
) -> None:
    for story in known_referrals():
        record(engine, shipped_rules, story)
    app = staff_app(engine, shipped_rules, mail_sink, staff_email)
    cache: FiguresCache = app.state.staff_figures
    async with in_process(app) as web:
        await ask(web, STAFF.home, staff_email)
        [link] = await settle(mail_sink, staff_email, 1)
        assert (await use_sign_in_link(web, link)).status_code == 303

        before = (await web.get("/staff?lang=en")).text
        cached = (await web.get("/staff?lang=en")).text
        new = Story("R-FIG13", "hcm-talent", "dan@partner-d.example", "2027-03-15 09:00")
        record(engine, shipped_rules, new)
        added = (await web.get("/staff?lang=en")).text
        new.steps.append(step(hours(1), "contacted"))
        record(engine, shipped_rules, new)  # the same referral, one step further
        contacted = (await web.get("/staff?lang=en")).text

    def reached_contact(page: str) -> str:
        return cells(page.split('id="funnel"')[1], 'data-stage="contacted"')[1]

    assert "12 referrals in all." in before and "12 referrals in all." in cached
    assert "13 referrals in all." in added and reached_contact(added) == "10"
    assert "13 referrals in all." in contacted and reached_contact(contacted) == "11"
    assert cache.computed == 3


async def test_cached_figures_last_the_ttl_at_most() -> None:
    clock = [0.0]
    computed: list[Choice] = []

    def compute(choice: Choice) -> Any:
        computed.append(choice)
        return len(computed)

    cache = FiguresCache(compute, lambda: ("unchanged",), ttl=30, monotonic=lambda: clock[0])
    everything = Choice(None, None, ())
    together = await asyncio.gather(*(cache.get(everything) for _ in range(5)))
    clock[0] = 29.9
    within = await cache.get(everything)
    clock[0] = 30.0
    expired = await cache.get(everything)

    assert together == [1] * 5 and within == 1 and expired == 2
    assert len(computed) == 2
    assert FIGURES_TTL_SECONDS == 30
