"""The referrer portal in a real browser: Chromium against `referrals web` (test_browser's
server), signed in through the link the server emailed to the session's SMTP sink."""

from __future__ import annotations

import asyncio
import time

from playwright.async_api import Page, ViewportSize, expect

from starter.web.signin import REFERRER
from tests.conftest import Live
from tests.web.test_browser import browser, chromium, page, screenshot, web  # noqa: F401 - fixtures
from tests.web.test_portal import known
from workflows.models.program import ProgramRules

PHONE: ViewportSize = {"width": 390, "height": 844}


async def emailed_link(live: Live, email: str) -> str:
    deadline = time.monotonic() + 15
    while not (links := live.sink.sign_in_links(email)):
        assert time.monotonic() < deadline, f"no sign-in link reached {email}"
        await asyncio.sleep(0.2)
    return links[-1]


async def focus_by_tab(view: Page, element_id: str, presses: int = 60) -> list[str]:
    """Tab through the page until `element_id` has the focus; the ids focused on the way."""
    seen: list[str] = []
    for _ in range(presses):
        await view.keyboard.press("Tab")
        focused = await view.evaluate("document.activeElement && document.activeElement.id")
        seen.append(focused or "")
        if focused == element_id:
            return seen
    raise AssertionError(f"#{element_id} never took the focus; focused: {seen}")


async def test_a_referrer_signs_in_by_emailed_link_and_sees_the_portal(
    web: str,  # noqa: F811 - the fixture
    page: Page,  # noqa: F811 - the fixture
    live: Live,
    shipped_rules: ProgramRules,
) -> None:
    who = await asyncio.to_thread(known, live.engine, shipped_rules)
    await page.goto(f"{web}/me?lang=fr")
    await expect(page.locator("h1")).to_have_text("Vos recommandations")
    await page.locator("#email").fill(who.claire)
    await page.locator(f'form[action="{REFERRER.home}/sign-in"] button').click()
    await expect(page.locator("#sent")).to_be_visible()

    await page.goto(f"{web}{await emailed_link(live, who.claire)}")
    await page.locator("#use-link").click()  # opening the link spends nothing; this does
    await page.wait_for_url(f"{web}/me?lang=fr")
    rows = page.locator("#referrals tbody tr")
    await expect(rows).to_have_count(4)
    await expect(page.locator("#totals tbody tr")).to_have_count(2)
    await expect(page.locator("#referral-R-PORTAL0003")).to_contain_text("17 mai 2027")
    await screenshot(page, "portal.png")

    # The keyboard reaches the sign-out button and the statement link, visibly focused.
    await page.locator("body").focus()
    await focus_by_tab(page, "sign-out")
    outline = await page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    await focus_by_tab(page, "statement-link")
    async with page.expect_download() as downloading:
        await page.keyboard.press("Enter")
    download = await downloading.value
    assert download.suggested_filename.startswith("referrals-statement-")
    assert download.suggested_filename.endswith(".csv")

    # On a phone, the tables become cards: nothing is wider than the screen.
    await page.set_viewport_size(PHONE)
    await page.reload()
    await expect(rows).to_have_count(4)
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page is {overflow}px wider than a {PHONE['width']}px screen"
    await screenshot(page, "portal-phone.png")

    # The row opens the referral's status page.
    await page.locator("#referral-R-PORTAL0001 a").click()
    await page.wait_for_url(f"{web}/status/**")
    await expect(page.locator("#stage")).to_have_attribute("data-stage", "commission_paid")

    await page.goto(f"{web}/me?lang=fr")
    await page.locator("#sign-out").click()
    await page.wait_for_url(f"{web}/me?lang=fr")
    await expect(page.locator("#email")).to_be_visible()
    await expect(page.locator("#referrals")).to_have_count(0)
