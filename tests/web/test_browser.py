"""The intake form in a real browser: Chromium against `referrals web`, a real server process
that starts referrals on the dev server where the session's real worker runs them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from activities.i18n import format_date, translations
from activities.receipts import referrer_copy
from devstack.factories import submission
from devstack.servers import referrals_web
from devstack.settings import ROOT, SETTINGS
from starter.intake import submit_referral
from starter.web.intake import ERROR_MESSAGES, FIELD_MESSAGES, STAGE_NAMES, STEP_NAMES
from tests.conftest import Live
from tests.desk import act_by_id
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralState, Stage
from workflows.models.values import Action

REFERRALS = Path(sys.executable).parent / "referrals"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "test-output" / "screenshots"
FR = translations("fr").gettext  # the pages' texts in French


def field(page: Page, name: str) -> Any:
    """Form controls are named like `referrer.name`; an id with a dot is no CSS `#id`."""
    return page.locator(f'[id="{name}"]')


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest_asyncio.fixture(scope="module")
async def web(
    chromium: Path, live: Live, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """`referrals web` on the session's dev server, database and mail sink; the base URL once
    /healthz says Temporal and the database are reachable."""
    async with referrals_web(
        tmp_path_factory.mktemp("web"),
        "/healthz",
        TEMPORAL_ADDRESS=live.address,
        TEMPORAL_NAMESPACE=live.client.namespace,
        REFERRALS_DATABASE_URL=live.database_url,
        REFERRALS_SMTP_HOST=live.sink.host,
        REFERRALS_SMTP_PORT=str(live.sink.port),
    ) as base:
        yield base


@pytest_asyncio.fixture(scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest_asyncio.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh French-speaking visitor: own cookies, French Accept-Language."""
    context: BrowserContext = await browser.new_context(
        locale="fr-FR", viewport={"width": 1280, "height": 900}
    )
    context.set_default_timeout(10_000)
    opened = await context.new_page()
    yield opened
    await context.close()


async def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    await page.screenshot(path=str(path), full_page=True)
    return path


async def fill_form(page: Page, website: str, email: str, consent: bool) -> None:
    """What a French referrer types; the language and currency keep their defaults."""
    await field(page, "referrer.name").fill("Claire Martin")
    await field(page, "referrer.email").fill(email)
    await field(page, "referrer.company").fill("Conseil Martin & Associés")
    await field(page, "referrer.phone").fill("+33 6 12 34 56 78")
    await field(page, "prospect.company").fill("Fromagerie Bellevue SAS")
    await field(page, "prospect.website").fill(website)
    await field(page, "prospect.country").select_option("FR")
    await field(page, "prospect.industry").fill("Agroalimentaire")
    await field(page, "prospect.sector.private").check()
    await field(page, "contact.name").fill("Julien Roche")
    await field(page, "contact.email").fill("j.roche@fromagerie-bellevue.example")
    await field(page, "contact.title").fill("Directeur administratif et financier")
    await field(page, "opportunity.product").select_option("cloudsuite-financials")
    await field(page, "opportunity.estimated_annual_value").fill("180000")
    await field(page, "opportunity.notes").fill(
        "Remplacement d'un ERP vieillissant sur trois sites ; décision prévue au T2."
    )
    if consent:
        await page.locator("#consent").check()
    else:
        await page.locator("#consent").uncheck()


def unique_site() -> str:
    return f"https://www.fromagerie-{uuid.uuid4().hex[:10]}.example/"


async def test_a_french_referrer_submits_and_follows_the_referral(
    web: str, page: Page, live: Live
) -> None:
    await page.goto(f"{web}/?lang=fr")
    await expect(page.locator("html")).to_have_attribute("lang", "fr")
    await expect(page.locator("h1")).to_have_text(FR("Refer an opportunity"))
    await expect(field(page, "referrer.language")).to_have_value("fr")
    await expect(field(page, "opportunity.currency")).to_have_value("EUR")
    await screenshot(page, "form.png")

    site = unique_site()
    await fill_form(page, site, "claire.martin@conseil-martin.example", consent=True)
    async with page.expect_response(
        lambda r: r.request.method == "POST" and r.url == f"{web}/referrals"
    ) as posted:
        await page.get_by_role("button", name=FR("Send the referral")).click()
    assert (await posted.value).status == 303
    await page.wait_for_url(f"{web}/confirmation/**")

    await expect(page.locator("h1")).to_have_text(FR("Thank you, your referral is registered"))
    referral_id = (await page.locator("#referral-id").inner_text()).strip()
    assert referral_id.startswith("R-") and len(referral_id) == 12, referral_id

    state = await live.client.get_workflow_handle(referral_id).query(
        "state", result_type=ReferralState
    )
    assert state.stage is Stage.SUBMITTED
    assert state.prospect.website == site and state.prospect.country == "FR"
    assert state.prospect.sector == "private"
    assert state.referrer.language == "fr" and state.referrer.company == "Conseil Martin & Associés"
    assert state.opportunity.product == "cloudsuite-financials"
    assert [(h.action, h.actor) for h in state.history] == [
        ("submitted", "web:claire.martin@conseil-martin.example")
    ]
    # The deadline falls at 00:00 local: the page names the last day, in the desk's zone.
    zone = ZoneInfo(state.contact_calendar.timezone)
    last_day = format_date(
        (state.contact_deadline.astimezone(zone) - timedelta(seconds=1)).date(), "fr"
    )
    await expect(page.locator("main")).to_contain_text(
        FR(
            "Someone from our team will contact you by %(deadline)s to discuss this "
            "opportunity. A confirmation email will reach you in a few moments."
        )
        % {"deadline": last_day}
    )
    await screenshot(page, "confirmation.png")

    link = page.locator("#status-link")
    await expect(link).to_have_text(FR("Follow my referral"))
    assert (await link.get_attribute("href") or "").startswith(f"{web}/status/")
    await link.click()
    await page.wait_for_url(f"{web}/status/**")

    await expect(page.locator("h1")).to_have_text(FR("Your referral"))
    stage = page.locator("#stage")
    await expect(stage).to_have_attribute("data-stage", "submitted")
    await expect(stage).to_have_text(FR(STAGE_NAMES[Stage.SUBMITTED]))
    await expect(page.locator("main")).to_contain_text(referral_id)
    await expect(page.locator("main")).to_contain_text(last_day)
    steps = page.locator("#timeline li")
    await expect(steps).to_have_count(1)
    await expect(steps.first).to_have_attribute("data-step", "submitted")
    await expect(steps.first).to_contain_text(FR(STEP_NAMES["submitted"]))
    # The referrer's page shows no internal actor or email.
    assert "web:" not in await page.locator("main").inner_text()
    await screenshot(page, "status.png")

    # "Un e-mail de confirmation vient de vous être envoyé": the worker did send it.
    deadline = time.monotonic() + 15
    while not any(
        m["X-Referral-Id"] == referral_id and m["To"] == "claire.martin@conseil-martin.example"
        for m in live.sink.messages()
    ):
        assert time.monotonic() < deadline, "no confirmation email reached the sink"
        await asyncio.sleep(0.2)


async def submit_invalid(page: Page, web: str) -> None:
    async with page.expect_response(
        lambda r: r.request.method == "POST" and r.url == f"{web}/referrals"
    ) as posted:
        await page.get_by_role("button", name=FR("Send the referral")).click()
    response = await posted.value
    assert response.status == 422, response.status  # the server refused, re-rendering the form
    await page.wait_for_load_state()
    assert page.url == f"{web}/referrals"
    await expect(page.locator("#problem")).to_have_text(
        FR("Please correct the fields marked below; what you typed is kept.")
    )


async def test_invalid_submission_is_refused_by_the_server_and_keeps_the_input(
    web: str, page: Page
) -> None:
    await page.goto(f"{web}/?lang=fr")
    site = unique_site()
    await fill_form(page, site, "claire@", consent=False)
    # The browser itself would call this invalid; `novalidate` lets it through to the server.
    assert await field(page, "referrer.email").evaluate("e => !e.validity.valid")
    await submit_invalid(page, web)

    email_error = field(page, "referrer.email-error")
    await expect(email_error).to_be_visible()
    await expect(email_error).to_have_text(FR(FIELD_MESSAGES["referrer.email"]))
    await expect(field(page, "referrer.email")).to_have_attribute("aria-invalid", "true")
    await expect(field(page, "referrer.email")).to_have_value("claire@")
    await expect(field(page, "referrer.name")).to_have_value("Claire Martin")
    await expect(field(page, "referrer.company")).to_have_value("Conseil Martin & Associés")
    await expect(field(page, "prospect.company")).to_have_value("Fromagerie Bellevue SAS")
    await expect(field(page, "prospect.website")).to_have_value(site)
    await expect(field(page, "prospect.country")).to_have_value("FR")
    await expect(field(page, "prospect.sector.private")).to_be_checked()
    await expect(field(page, "opportunity.product")).to_have_value("cloudsuite-financials")
    await expect(field(page, "opportunity.notes")).to_have_value(
        "Remplacement d'un ERP vieillissant sur trois sites ; décision prévue au T2."
    )
    await expect(page.locator("#consent")).not_to_be_checked()
    await screenshot(page, "form-errors.png")

    # Corrected email, consent still missing: the second round trip names the consent.
    await field(page, "referrer.email").fill("claire.martin@conseil-martin.example")
    await submit_invalid(page, web)
    consent_error = page.locator("#consent-error")
    await expect(consent_error).to_be_visible()
    await expect(consent_error).to_have_text(FR(ERROR_MESSAGES["consent_required"]))
    await expect(page.locator(".error")).to_have_count(1)
    await expect(field(page, "prospect.website")).to_have_value(site)
    await screenshot(page, "form-errors-consent.png")


async def test_every_error_is_reported_in_one_round_trip(web: str, page: Page) -> None:
    await page.goto(f"{web}/?lang=fr")
    await fill_form(page, unique_site(), "claire@", consent=False)
    await submit_invalid(page, web)
    await expect(field(page, "referrer.email-error")).to_be_visible()
    await expect(page.locator("#consent-error")).to_be_visible(timeout=1_000)


@pytest.mark.parametrize(("lang", "locale"), [("fr", "fr-FR"), ("en", "en-GB")])
async def test_the_verify_page_tells_a_valid_receipt_from_an_altered_one(
    web: str,
    live: Live,
    rules: ProgramRules,
    browser: Browser,
    tmp_path: Path,
    lang: str,
    locale: str,
) -> None:
    """A referrer uploads the receipt their acknowledgement carried: valid, with its time;
    the same receipt backdated and pasted: altered, naming the time."""
    _ = translations(lang).gettext
    website = f"https://www.{uuid.uuid4().hex[:8]}-verif.example/"
    referral_id = await submit_referral(
        live.client, live.engine, rules, submission(**{"prospect.website": website}),
        SETTINGS,
    )  # fmt: skip
    copy = referrer_copy(live.engine, referral_id)
    assert copy is not None
    path = tmp_path / f"receipt-{copy['seq']}.json"
    path.write_text(json.dumps(copy, indent=2), encoding="utf-8")
    context = await browser.new_context(locale=locale)
    context.set_default_timeout(10_000)
    page = await context.new_page()
    try:
        await page.goto(f"{web}/receipts/verify")
        await expect(page.locator("h1")).to_have_text(_("Check a receipt"))
        await page.locator("#file").set_input_files(str(path))
        await page.locator("form button[type=submit]").click()
        verdict = page.locator("#verdict")
        await expect(verdict).to_have_attribute("data-valid", "true")
        await expect(verdict).to_contain_text(_("Valid receipt"))
        await expect(verdict).to_contain_text(copy["at"])
        await expect(verdict).to_contain_text(referral_id)
        await screenshot(page, f"receipt-valid-{lang}.png")

        backdated = {**copy, "at": "2026-01-02T09:00:00.000000Z"}
        await page.locator("#receipt").fill(json.dumps(backdated))
        await page.locator("#file").set_input_files([])
        await page.locator("form button[type=submit]").click()
        await expect(verdict).to_have_attribute("data-valid", "false")
        await expect(verdict).to_contain_text(_("Not a valid receipt"))
        await expect(page.locator("#verdict-problem")).to_contain_text(_("the time"))
        await screenshot(page, f"receipt-altered-{lang}.png")
    finally:
        await context.close()
    await act_by_id(live.client, referral_id, Action.CANCEL, reason="test over")
