"""The program dashboard in a real browser: Chromium against the web app served on loopback,
signed in through the link read from the SMTP sink, over the known referrals of
tests/web/test_figures.py. The app's clock is theirs (NOW), so the figures of "this month" are the
same whatever day the suite runs. Saves the page and each chart as screenshots."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, expect

from activities.db import make_engine
from activities.schema import upgrade
from core.program import load_program
from devstack.servers import MailSink, serve_app
from devstack.settings import ROOT
from starter.web import create_app
from tests.web.test_browser import SCREENSHOTS, browser, chromium  # noqa: F401
from tests.web.test_figures import NOW, known_referrals, record

STAFF_EMAIL = "finance-partners@nuage-logiciel.example"  # listed in program.yaml
CHART_NAMES = ["funnel", "ended", "time", "contact", "commission", "referrers"]


@pytest_asyncio.fixture(scope="module")
async def dashboard(
    chromium: Path,  # noqa: F811 - the fixture of tests/web/test_browser.py
    mail_sink: MailSink,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[str]:
    """The web app over a database of the known referrals, its clock at their NOW; the base
    URL once it answers. Temporal is not needed."""
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('staff-web') / 'referrals.db'}")
    upgrade(engine)
    rules = load_program(ROOT / "program.yaml")
    for story in known_referrals():
        record(engine, rules, story)
    app = create_app(
        rules=rules,
        engine=engine,
        key="browser-test-secret",
        smtp=mail_sink.settings(),
        rate_limit="off",
        clock=lambda: NOW,
    )
    async with serve_app(app) as base:
        yield base
    engine.dispose()


async def sign_in(page: Page, base: str, sink: MailSink) -> None:
    """Ask for a link with the form, then open the link the email brought."""
    before = len(sink.sign_in_links(STAFF_EMAIL))
    await page.goto(f"{base}/staff?lang=fr")
    await expect(page.locator("h1")).to_have_text("Tableau de bord du programme")
    await page.locator("#email").fill(STAFF_EMAIL)
    await page.locator('form[action="/staff/sign-in"] button[type="submit"]').click()
    await expect(page.locator("#sent")).to_be_visible()
    deadline = time.monotonic() + 15
    while len(links := sink.sign_in_links(STAFF_EMAIL)) == before:
        assert time.monotonic() < deadline, "no sign-in link arrived"
        await asyncio.sleep(0.1)
    await page.goto(base + links[-1])
    await page.locator("#use-link").click()
    await page.wait_for_url(f"{base}/staff?lang=fr")


async def test_staff_sign_in_and_see_the_dashboard_with_its_charts(
    dashboard: str,
    browser: Browser,  # noqa: F811 - the fixture of tests/web/test_browser.py
    mail_sink: MailSink,
) -> None:
    context = await browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    page = await context.new_page()
    problems: list[str] = []
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.on(
        "response",
        lambda r: (
            problems.append(f"{r.status}: {r.url}")
            if r.status >= 400 and not r.url.endswith("/favicon.ico")  # the app has no icon
            else None
        ),
    )
    page.on("console", lambda m: problems.append(m.text) if "Content Security" in m.text else None)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))

    await sign_in(page, dashboard, mail_sink)

    await expect(page.locator("h1")).to_have_text("Tableau de bord du programme")
    funnel = page.locator('#funnel tr[data-stage="contacted"]')
    await expect(funnel.locator("[data-count]")).to_have_text("10")
    await expect(funnel.locator("[data-conversion]")).to_have_text("83,33\u00a0%")
    await expect(page.locator("#breaches a.workflow")).to_have_text(["R-FIG11"])
    await expect(page.locator("#protections a.workflow")).to_have_text(["R-FIG10"])
    charts = page.locator("img.chart")
    await expect(charts).to_have_count(len(CHART_NAMES))
    for index in range(len(CHART_NAMES)):
        loaded = await charts.nth(index).evaluate("img => img.complete && img.naturalWidth > 0")
        assert loaded, await charts.nth(index).get_attribute("src")
    # staff.css applies: each chart stands beside its table.
    assert await page.locator(".pair").first.evaluate("e => getComputedStyle(e).display") == "grid"
    assert problems == []
    assert all(url.startswith(dashboard) for url in requested), requested

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "staff-dashboard.png"), full_page=True)
    for name in CHART_NAMES:
        chart = page.locator(f'img.chart[id^="chart-{name}"]').first
        await chart.scroll_into_view_if_needed()
        await chart.screenshot(path=str(SCREENSHOTS / f"staff-chart-{name}.png"))

    await page.set_viewport_size({"width": 390, "height": 844})
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone"
    await page.screenshot(path=str(SCREENSHOTS / "staff-dashboard-phone.png"), full_page=True)
    await context.close()
