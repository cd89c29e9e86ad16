"""The staff desk in a real browser: Chromium against the web app on loopback, the dev server
and a worker behind it (the `live` stack). A salesperson signs in through the emailed link,
finds a referral by its company and walks it to `won` from its page, with the keyboard only;
a finance officer records two payments and the payout. A salesperson is offered no payout and
a crafted one is refused; a form sent twice at once applies once; at phone width nothing overflows.
French for one, English for the other; screenshots of the list, the page and a refusal."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, expect

from activities.queries import load_referral
from devstack.factories import submission
from devstack.servers import MailSink, serve_app
from devstack.settings import SETTINGS, settings_with
from starter.intake import submit_referral
from starter.web import create_app
from tests.activities.test_system_of_record import KEY
from tests.conftest import Live
from tests.web.test_browser import SCREENSHOTS, browser, chromium  # noqa: F401
from workflows.models.program import ProgramRules, StaffRoles, StaffRules
from workflows.models.referral import Stage

SALES = f"sales-{uuid.uuid4().hex[:8]}@nuage-logiciel.example"
FINANCE = f"finance-{uuid.uuid4().hex[:8]}@nuage-logiciel.example"


@pytest_asyncio.fixture
async def desk(live: Live, rules: ProgramRules) -> AsyncIterator[str]:
    """The web app of the live stack, with a salesperson and a finance officer; its base URL."""
    staff = StaffRules(roles=StaffRoles(sales=[SALES], finance=[FINANCE]))
    app = create_app(
        settings_with(live.sink),
        rules=rules.model_copy(update={"staff": staff}),
        engine=live.engine,
        client=live.client,
        key=KEY,
        rate_limit="off",
    )
    async with serve_app(app) as base:
        yield base


async def signed_in(
    running: Browser, base: str, sink: MailSink, email: str, lang: str, width: int = 1280
) -> tuple[BrowserContext, Page]:
    """A browser context of its own, signed in through the form and the link the email
    brought."""
    context = await running.new_context(
        locale="fr-FR" if lang == "fr" else "en-GB", viewport={"width": width, "height": 900}
    )
    context.set_default_timeout(15_000)
    page = await context.new_page()
    before = len(sink.sign_in_links(email))
    await page.goto(f"{base}/staff?lang={lang}")
    await page.locator("#email").fill(email)
    await page.locator("#email").press("Enter")
    deadline = time.monotonic() + 20
    while len(links := sink.sign_in_links(email)) == before:
        assert time.monotonic() < deadline, "no sign-in link arrived"
        await asyncio.sleep(0.1)
    await page.goto(base + links[-1])
    await page.locator("#use-link").click()
    await page.wait_for_load_state()
    return context, page


async def by_keyboard(page: Page, action: str, values: dict[str, str]) -> None:
    """Fill in one action's form and send it with the keyboard only: Tab from field to field,
    Enter on its button."""
    form = page.locator(f"#act-{action}")
    fields = form.locator("input:not([type=hidden])")
    await (fields.first if await fields.count() else form.locator("button")).focus()
    for index in range(await fields.count()):
        name = await fields.nth(index).get_attribute("name")
        if name in values:
            await page.keyboard.press("Control+A")
            await page.keyboard.type(values[name])
        await page.keyboard.press("Tab")
    focused = await page.evaluate("document.activeElement.closest('form')?.id")
    assert focused == f"act-{action}"
    await page.keyboard.press("Enter")
    await page.wait_for_load_state()


async def no_horizontal_overflow(page: Page) -> bool:
    return bool(await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


async def test_sales_and_finance_run_a_referral_from_the_browser(
    desk: str,
    live: Live,
    rules: ProgramRules,
    browser: Browser,  # noqa: F811 - the fixture of tests/web/test_browser.py
) -> None:
    company = f"Atelier {uuid.uuid4().hex[:6]}"
    given = submission(
        **{"prospect.company": company, "prospect.website": f"https://{company[-6:]}.example"}
    )
    rid = await submit_referral(live.client, live.engine, rules, given, SETTINGS)
    shots = SCREENSHOTS
    shots.mkdir(parents=True, exist_ok=True)

    sales, page = await signed_in(browser, desk, live.sink, SALES, "fr")
    await expect(page.locator("h1")).to_have_text("Référencements")  # no figures for sales
    await page.locator("#search").fill(company)
    await page.locator("#search").press("Enter")
    await expect(page.locator("#referrals tbody tr")).to_have_count(1)
    await page.screenshot(path=shots / "desk-list.png", full_page=True)
    await page.locator(f'a[href^="/staff/referrals/{rid}"]').click()
    await expect(page.locator('[data-fact="stage"]')).to_have_attribute("data-stage", "submitted")

    for action, values, stage in [
        ("contacted", {"note": "appelé"}, "contacted"),
        ("accept", {}, "qualifying"),
        ("approve", {}, "approved"),
        ("won", {"amount": "120000", "currency": "EUR"}, "won"),
    ]:
        await by_keyboard(page, action, values)
        await expect(page.locator('[data-fact="stage"]')).to_have_attribute("data-stage", stage)
    await expect(page.locator("#act-payout")).to_have_count(0)
    await page.screenshot(path=shots / "desk-referral.png", full_page=True)

    # A crafted payout from the salesperson's session: refused, nothing applied.
    csrf = await page.locator("#actions input[name=csrf]").first.get_attribute("value")
    crafted = await page.request.post(
        f"{desk}/staff/referrals/{rid}/actions/payout",
        form={"csrf": csrf or "", "lang": "fr", "request_id": "web-crafted", "reference": "X"},
    )
    assert crafted.status == 403
    await page.set_content(await crafted.text())
    await page.screenshot(path=shots / "desk-refused.png", full_page=True)

    finance, page = await signed_in(browser, desk, live.sink, FINANCE, "en")
    await page.goto(f"{desk}/staff/referrals/{rid}?lang=en")
    await expect(page.locator("#act-payment")).to_be_visible()
    await expect(page.locator("#act-won")).to_have_count(0)  # not a finance action
    # The first payment's form sent twice at once, as a double click on a slow connection
    # can: the same request id, applied once.
    form = page.locator("#act-payment")
    await form.locator("[name=amount]").fill("60000")
    await form.locator("[name=reference]").fill("INV-1")
    fields = await form.evaluate("f => Object.fromEntries(new FormData(f))")
    url = f"{desk}/staff/referrals/{rid}/actions/payment"
    twice = await asyncio.gather(*(page.request.post(url, form=fields) for _ in range(2)))
    assert [answer.ok for answer in twice] == [True, True]
    await page.reload()
    form = page.locator("#act-payment")
    await form.locator("[name=amount]").fill("60000")
    await form.locator("[name=reference]").fill("INV-2")
    await form.locator("button").click()
    await expect(page.locator('[data-fact="stage"]')).to_have_attribute(
        "data-stage", Stage.COMMISSION_PAYABLE.value
    )
    await page.locator("#act-payout [name=reference]").fill("VIR-1")
    await page.locator("#act-payout button").click()
    await expect(page.locator('[data-fact="stage"]')).to_have_attribute(
        "data-stage", Stage.COMMISSION_PAID.value
    )

    state = load_referral(live.engine, rid)
    assert state is not None
    applied = [(e.action, e.actor) for e in state.history if e.outcome == "applied"]
    assert applied[1:] == [
        ("contacted", SALES), ("accept", SALES), ("approve", SALES), ("won", SALES),
        ("payment", FINANCE), ("payment", FINANCE), ("payout", FINANCE),
    ]  # fmt: skip
    assert [p.reference for p in state.payments] == ["INV-1", "INV-2"]  # each applied once

    phone, page = await signed_in(browser, desk, live.sink, SALES, "en", width=375)
    for path in ("/staff/referrals?lang=en", f"/staff/referrals/{rid}?lang=en"):
        await page.goto(desk + path)
        assert await no_horizontal_overflow(page), path
    for context in (sales, finance, phone):
        await context.close()
