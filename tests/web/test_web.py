"""The intake web app, in process, against a real worker on the real dev server.

Every test builds the app with the live client, database and mail sink and drives it
through httpx's ASGI transport; nothing about Temporal is mocked.
"""

from __future__ import annotations

import asyncio
import json
import mailbox
import os
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import formatdate, parsedate_to_datetime
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from markupsafe import escape
from sqlmodel import Session

from activities.db import ProspectClaim
from activities.i18n import format_date, translations
from activities.receipts import receipts_of
from core.links import csrf_token, status_token
from core.settings import Settings
from devstack.factories import submission_data
from devstack.ports import free_port
from devstack.servers import MailSink
from devstack.settings import SECRET, SETTINGS
from starter.mail_sink import start_sink
from starter.web import WebSettingError, create_app, served_app
from starter.web.intake import (
    CSRF_COOKIE,
    ERROR_MESSAGES,
    FIELD_MESSAGES,
    STAGE_NAMES,
    STEP_NAMES,
)
from starter.web.security import MAX_BODY_BYTES
from tests.conftest import Live, eventually, in_process
from tests.desk import act_on
from workflows.models.program import ProgramRules
from workflows.models.referral import ActResult, ReferralState, StaffAction, Stage
from workflows.models.values import Action, normalize_domain

KEY = SECRET  # the live worker's: its emailed links are the pages' links
REFERRER_EMAIL = "claire.martin@conseil-martin.example"


# --- helpers ---------------------------------------------------------------------------------


def unique_site() -> str:
    return f"https://www.prospect-{uuid.uuid4().hex[:10]}.example/"


def form_fields(**changes: Any) -> dict[str, str]:
    """The example referral as the form's fields, for a prospect nobody referred yet."""
    data = submission_data(**{"prospect.website": unique_site(), **changes})
    fields = {
        f"{section}.{key}": str(value)
        for section in ("referrer", "prospect", "contact", "opportunity")
        for key, value in data[section].items()
    }
    if data["consent"]:
        fields["consent"] = "on"
    return fields


class FormState(HTMLParser):
    """What a browser would show in the form: field values, and the texts of some elements."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.values: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.options: dict[str, list[str]] = {}
        self._select: str | None = None
        self._textarea: str | None = None
        self._element: str | None = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        name = a.get("name")
        if tag == "input" and name:
            if a.get("type") in ("radio", "checkbox"):
                if "checked" in a:
                    self.values[name] = a.get("value") or "on"
            else:
                self.values[name] = a.get("value") or ""
        elif tag == "select" and name:
            self._select = name
            self.options[name] = []
        elif tag == "option" and self._select:
            self.options[self._select].append(a.get("value") or "")
            if "selected" in a:
                self.values[self._select] = a.get("value") or ""
        elif tag == "textarea" and name:
            self._textarea = name
            self.values[name] = ""
        element = a.get("id") or ""
        if tag in ("p", "div") and (element.endswith("-error") or element == "problem"):
            self._element = element
            self.texts[element] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None
        elif tag in ("p", "div"):
            self._element = None

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self.values[self._textarea] += data
        if self._element:
            self.texts[self._element] += data


def csrf_of(page: str) -> str:
    found = re.search(r'<input type="hidden" name="csrf" value="([^"]+)">', page)
    assert found, "the form has no CSRF token"
    return found.group(1)


async def open_form(web: httpx.AsyncClient, **params: str) -> str:
    """GET / as a browser does: keep the cookie, return the form's CSRF token."""
    page = await web.get("/", params=params)
    assert page.status_code == 200
    assert web.cookies.get(CSRF_COOKIE)
    return csrf_of(page.text)


async def post_form(
    web: httpx.AsyncClient, fields: dict[str, str], lang: str = "fr"
) -> httpx.Response:
    token = await open_form(web)
    return await web.post("/referrals", data={**fields, "csrf": token, "lang": lang})


def assert_kept(page: str, fields: dict[str, str], *, but: tuple[str, ...] = ()) -> None:
    """Every typed value is back in the form: inputs, selects, radios, checkbox, textarea."""
    shown = FormState(page).values
    for name, value in fields.items():
        if name not in but:
            assert shown.get(name) == value, (name, shown.get(name), value)
    if "consent" not in fields:
        assert "consent" not in shown


def assert_error(page: str, field: str, message: str) -> None:
    """The message is next to its field, and the field points to it."""
    assert f'<p class="error" id="{field}-error">{escape(message)}</p>' in page
    assert FormState(page).texts[f"{field}-error"] == message
    assert re.search(rf'aria-describedby="[^"]*{re.escape(field)}-error[^"]*"', page)


def assert_problem(page: str, message: str) -> None:
    assert f'id="problem">{escape(message)}</div>' in page


def claim_of(live: Live, website: str) -> ProspectClaim | None:
    with Session(live.engine) as session:
        return session.get(ProspectClaim, normalize_domain(website))


def token_path(status_url: str) -> tuple[str, str]:
    path = urlsplit(status_url).path
    assert path.startswith("/status/")
    return path, path.removeprefix("/status/")


def tamper(token: str) -> str:
    """Change one character in the middle (every bit of a middle base64 character counts)."""
    middle = len(token) // 2
    replacement = "A" if token[middle] != "A" else "B"
    return token[:middle] + replacement + token[middle + 1 :]


def translated(lang: str, message: str) -> str:
    """`message`, an English text of the pages, as they show it in `lang` (from the catalogs;
    tests/test_i18n.py checks every one is translated)."""
    return translations(lang).gettext(message)


FIX = "Please correct the fields marked below; what you typed is kept."
CSRF = "The form expired or could not be verified. What you typed is kept; please send it again."


def deadline_days(state: ReferralState, rules: ProgramRules, lang: str) -> list[str]:
    """The last local day to contact the referrer, as the page may write it."""
    return last_days(state.contact_deadline, rules, lang)


def last_days(end: datetime, rules: ProgramRules, lang: str) -> list[str]:
    """The last local day before `end` (a 00:00 end closes the day before), as the page may
    write it: `2026-12-04`, or in words (`4 décembre 2026`, `December 4, 2026`)."""
    day = (end - timedelta(seconds=1)).astimezone(ZoneInfo(rules.calendar.timezone)).date()
    return [day.isoformat(), format_date(day, lang)]


async def state_of(live: Live, referral_id: str) -> ReferralState:
    handle = live.client.get_workflow_handle(referral_id)
    return await handle.query("state", result_type=ReferralState)


def asgi_client(app: FastAPI, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    return in_process(app, raise_app_exceptions=raise_app_exceptions)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def app(live: Live, rules: ProgramRules) -> FastAPI:
    return create_app(
        rules=rules, engine=live.engine, client=live.client, key=KEY, maildir=live.sink.maildir
    )


@pytest_asyncio.fixture
async def web(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


# --- the form page ---------------------------------------------------------------------------


async def test_form_is_french_by_default(web: httpx.AsyncClient, rules: ProgramRules) -> None:
    page = await web.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<html lang="fr">' in html
    assert f"<h1>{translated('fr', 'Refer an opportunity')}</h1>" in html
    intro = (
        "Refer a company interested in one of our multi-tenant cloud products. We will contact "
        "you within 3 to 5 business days of receipt. Public-sector opportunities are not "
        "eligible. The referral commission is paid once the customer has paid in full, under "
        "its payment terms."
    )
    assert f"<p>{translated('fr', intro)}</p>" in html  # a catalog's text is markup
    # The program's rules, stated up front.
    assert "3 à 5 jours ouvrés" in html
    assert "secteur public ne sont pas éligibles" in html
    assert "une fois que le client a intégralement payé" in html
    # Only multi-tenant cloud products are offered.
    state = FormState(html)
    offered = [p for p in state.options["opportunity.product"] if p]
    assert offered == [p.id for p in rules.products if p.multi_tenant_cloud]
    assert "ln-on-premises" not in offered and "m3-single-tenant" not in offered
    assert "LN On-Premises" not in html
    # Each product states its rate: the program's, or its own.
    assert ">CloudSuite Financials (commission de 10\xa0%)</option>" in html
    assert ">HCM Talent Management (commission de 15\xa0%)</option>" in html
    english = (await web.get("/?lang=en")).text
    assert ">HCM Talent Management (commission 15%)</option>" in english
    # Emails in French unless chosen otherwise; a fresh form carries a CSRF token and cookie.
    assert state.values["referrer.language"] == "fr"
    assert state.values["lang"] == "fr"
    assert state.values["csrf"]
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{CSRF_COOKIE}=") and "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()


@pytest.mark.parametrize(
    ("headers", "params"),
    [({"Accept-Language": "en-US,en;q=0.9"}, {}), ({}, {"lang": "en"})],
    ids=["accept-language", "query"],
)
async def test_form_in_english(
    web: httpx.AsyncClient, headers: dict[str, str], params: dict[str, str]
) -> None:
    page = await web.get("/", headers=headers, params=params)
    assert page.status_code == 200
    html = page.text
    assert '<html lang="en">' in html
    assert "<h1>Refer an opportunity</h1>" in html
    assert "within 3 to 5 business days" in html
    assert "Public-sector opportunities are not eligible" in html
    assert "paid once the customer has paid in full" in html
    assert "jours ouvrés" not in html
    state = FormState(html)
    assert state.values["lang"] == "en" and state.values["referrer.language"] == "en"
    assert "ln-on-premises" not in state.options["opportunity.product"]


async def test_query_language_wins_over_browser(web: httpx.AsyncClient) -> None:
    page = await web.get("/?lang=fr", headers={"Accept-Language": "en-US,en;q=0.9"})
    assert '<html lang="fr">' in page.text


# --- a referral through the form -------------------------------------------------------------


async def test_form_post_confirms_starts_workflow_and_emails(
    web: httpx.AsyncClient, live: Live, rules: ProgramRules
) -> None:
    fields = form_fields()
    posted = await post_form(web, fields)
    assert posted.status_code == 303, posted.text
    location = posted.headers["location"]
    assert re.fullmatch(r"/confirmation/[^/?]+\?lang=fr", location)

    confirmation = await web.get(location)
    assert confirmation.status_code == 200
    html = confirmation.text
    found = re.search(r'<span class="reference" id="referral-id">(R-[0-9A-Z]{10})</span>', html)
    assert found, html
    referral_id = found.group(1)

    # The workflow exists, with what was typed.
    state = await state_of(live, referral_id)
    assert state.stage is Stage.SUBMITTED
    assert state.referrer.name == "Claire Martin" and state.referrer.email == REFERRER_EMAIL
    assert state.referrer.company == "Conseil Martin & Associés"
    assert state.prospect.website == fields["prospect.website"]
    assert state.prospect_domain == normalize_domain(fields["prospect.website"])
    assert state.contact.email == fields["contact.email"]
    assert state.opportunity.product == "cloudsuite-financials"
    assert state.opportunity.notes == fields["opportunity.notes"]
    assert state.history[0].action == "submitted"
    assert state.history[0].actor == f"web:{REFERRER_EMAIL}"
    claim = claim_of(live, fields["prospect.website"])
    assert claim is not None and claim.referral_id == referral_id

    # The confirmation: reference, contact deadline, personal status link.
    sentence = translated(
        "fr",
        "Someone from our team will contact you by %(deadline)s to discuss this opportunity. A "
        "confirmation email will reach you in a few moments.",
    )
    shown = [
        day
        for day in deadline_days(state, rules, "fr")
        if f"<p>{escape(sentence % {'deadline': day})}</p>" in html
    ]
    assert shown, html
    link = re.search(r'<a id="status-link" href="([^"]+)">', html)
    assert link
    status_link = link.group(1)
    assert status_link == f"{SETTINGS.public_url}/status/{status_token(referral_id, KEY)}"
    path, _ = token_path(status_link)
    status = await web.get(path)
    assert status.status_code == 200 and referral_id in status.text
    # The receipt of the registration, to download at once: the one the email attaches.
    [registered] = receipts_of(live.engine, referral_id)
    download = re.search(r'<a id="receipt-download" href="([^"]+)">', html)
    assert download, html
    got = await web.get(download.group(1))
    assert got.headers["content-disposition"] == (
        f'attachment; filename="receipt-{registered["seq"]}.json"'
    )
    copy = got.json()
    assert copy["entry_hash"] == registered["entry_hash"]
    assert copy["disclosures"]["referrer_email"]["value"] == REFERRER_EMAIL

    # The acknowledgement reaches the referrer, with the same status link.
    async def acknowledged() -> bool:
        return any(
            m["X-Referral-Id"] == referral_id and m["To"] == REFERRER_EMAIL
            for m in live.sink.messages()
        )

    await eventually(acknowledged)
    [mail] = [
        m
        for m in live.sink.messages()
        if m["X-Referral-Id"] == referral_id and m["To"] == REFERRER_EMAIL
    ]
    assert referral_id in str(mail["Subject"])
    plain = mail.get_body(("plain",))
    assert plain is not None
    text = plain.get_content()
    assert referral_id in text
    assert status_link in text


async def test_confirmation_in_english_when_the_form_was(
    web: httpx.AsyncClient, live: Live, rules: ProgramRules
) -> None:
    posted = await post_form(web, form_fields(), lang="en")
    assert posted.status_code == 303
    assert posted.headers["location"].endswith("?lang=en")
    page = await web.get(posted.headers["location"])
    assert page.status_code == 200
    assert '<html lang="en">' in page.text
    assert "<h1>Thank you, your referral is registered</h1>" in page.text


async def test_confirmation_of_a_bad_token_is_not_found(web: httpx.AsyncClient) -> None:
    page = await web.get(f"/confirmation/{status_token('R-NOPE', 'another-key')}")
    assert page.status_code == 404
    assert translated("fr", "Link not found") in page.text


# --- refusals, field by field, keeping what was typed ----------------------------------------


REFUSALS = [
    pytest.param(
        {"prospect.sector": "public"}, "prospect.sector", "public_sector", "fr", id="public-sector"
    ),
    pytest.param(
        {"opportunity.product": "ln-on-premises"},
        "opportunity.product",
        "product_not_eligible",
        "en",
        id="on-premises-product",
    ),
    pytest.param(
        {"opportunity.product": "no-such-product"},
        "opportunity.product",
        "unknown_product",
        "fr",
        id="unknown-product",
    ),
    pytest.param({"consent": None}, "consent", "consent_required", "fr", id="no-consent"),
    pytest.param(
        {"referrer.email": "claire.martin-at-conseil"},
        "referrer.email",
        "fields.referrer.email",
        "en",
        id="invalid-email",
    ),
    pytest.param({"contact.name": ""}, "contact.name", "required", "fr", id="missing-contact-name"),
]


@pytest.mark.parametrize(("changes", "field", "message_key", "lang"), REFUSALS)
async def test_form_refusal_keeps_what_was_typed(
    web: httpx.AsyncClient,
    live: Live,
    changes: dict[str, str | None],
    field: str,
    message_key: str,
    lang: str,
) -> None:
    fields = form_fields()
    for name, value in changes.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    page = await post_form(web, fields, lang)
    assert page.status_code == 422, page.text
    html = page.text
    assert f'<html lang="{lang}">' in html
    message = (
        FIELD_MESSAGES[field] if message_key.startswith("fields.") else ERROR_MESSAGES[message_key]
    )
    assert_error(html, field, translated(lang, message))
    assert_problem(html, translated(lang, FIX))
    assert list(FormState(html).texts) == ["problem", f"{field}-error"]  # only that field
    # The product select only offers eligible products: the refused one cannot be "kept".
    unofferable = ("opportunity.product",) if field == "opportunity.product" else ()
    assert_kept(html, fields, but=unofferable)
    assert FormState(html).values["lang"] == lang
    # A refused form is ready to be sent again.
    assert csrf_of(html)
    assert claim_of(live, fields["prospect.website"]) is None


async def test_form_refusal_shows_every_value_in_detail(web: httpx.AsyncClient) -> None:
    """Spelled out once, as the HTML a browser gets (escaped, selected, checked)."""
    fields = form_fields(**{"prospect.sector": "public", "opportunity.currency": "CHF"})
    page = await post_form(web, fields)
    assert page.status_code == 422
    html = page.text
    assert 'value="Claire Martin"' in html
    assert 'value="Conseil Martin &amp; Associés"' in html
    assert f'value="{fields["prospect.website"]}"' in html
    assert 'value="j.roche@fromagerie-bellevue.example"' in html
    assert 'value="180000.00"' in html
    assert '<option value="FR" selected>France</option>' in html
    assert (
        '<option value="cloudsuite-financials" selected>'
        "CloudSuite Financials (commission de 10\xa0%)</option>"
    ) in html
    assert '<option value="CHF" selected>CHF</option>' in html
    assert '<option value="EUR" selected>' not in html
    assert re.search(
        r'id="prospect\.sector\.public" name="prospect\.sector" value="public" checked', html
    )
    assert not re.search(r'value="private" checked', html)
    assert re.search(r'<input type="checkbox" id="consent" name="consent" required checked', html)
    notes = str(escape(fields["opportunity.notes"]))
    textarea = r'<textarea id="opportunity\.notes" name="opportunity\.notes"[^>]*>'
    assert re.search(textarea + re.escape(notes) + "</textarea>", html)
    assert 'aria-invalid="true"' in html


@pytest.mark.parametrize("lang", ["fr", "en"])
async def test_form_duplicate_is_409(web: httpx.AsyncClient, live: Live, lang: str) -> None:
    first = form_fields()
    accepted = await post_form(web, first, lang)
    assert accepted.status_code == 303
    claim = claim_of(live, first["prospect.website"])
    assert claim is not None
    # The same company, typed differently, by someone else.
    second = form_fields(
        **{
            "prospect.website": first["prospect.website"].replace("https://www.", "HTTP://"),
            "referrer.name": "Bob Durand",
            "referrer.email": "bob@durand.example",
        }
    )
    page = await post_form(web, second, lang)
    assert page.status_code == 409
    duplicate = (
        "This company is already referred, and that referral is being reviewed. Thank you all "
        "the same: only one referral per company can be open at a time."
    )
    assert_error(page.text, "prospect.website", translated(lang, duplicate))
    assert_problem(page.text, translated(lang, FIX))
    assert_kept(page.text, second)
    again = claim_of(live, first["prospect.website"])
    assert again is not None and again.referral_id == claim.referral_id
    # The refusal's receipt, explained, cites the first registration and not its referrer.
    [registered] = receipts_of(live.engine, claim.referral_id)
    refusal = page.text.split('id="refusal"', 1)[1].split("</div>", 1)[0]
    assert f"{registered['seq']}" in refusal and registered["at"][:10] in refusal
    shown = refusal.split('<textarea id="refusal-receipt"', 1)[1].split(">", 1)[1]
    copy = json.loads(unescape(shown.split("</textarea>", 1)[0]))
    assert copy["kind"] == "refused_duplicate" and first["referrer.email"] not in str(copy)


# --- CSRF ------------------------------------------------------------------------------------


async def test_form_without_csrf_token_is_refused_keeping_values(
    web: httpx.AsyncClient, live: Live
) -> None:
    fields = form_fields()
    await open_form(web)
    page = await web.post("/referrals", data={**fields, "lang": "fr"})
    assert page.status_code == 403
    assert_problem(page.text, translated("fr", CSRF))
    assert_kept(page.text, fields)
    assert claim_of(live, fields["prospect.website"]) is None
    # As the message promises, sending the kept form again works.
    again = await web.post("/referrals", data={**FormState(page.text).values})
    assert again.status_code == 303, again.text
    assert claim_of(live, fields["prospect.website"]) is not None


async def test_form_without_any_cookie_is_refused(app: FastAPI, live: Live) -> None:
    fields = form_fields()
    async with asgi_client(app) as stranger:
        page = await stranger.post(
            "/referrals", data={**fields, "csrf": csrf_token("made-up", KEY), "lang": "en"}
        )
    assert page.status_code == 403
    assert_problem(page.text, CSRF)
    assert_kept(page.text, fields)
    assert claim_of(live, fields["prospect.website"]) is None


@pytest.mark.parametrize("forgery", ["garbage", "tampered", "other-key", "other-cookie"])
async def test_form_with_bad_csrf_token_is_refused(
    app: FastAPI, web: httpx.AsyncClient, live: Live, forgery: str
) -> None:
    fields = form_fields()
    token = await open_form(web)
    nonce = web.cookies[CSRF_COOKIE]
    if forgery == "garbage":
        token = "not-a-token"
    elif forgery == "tampered":
        token = tamper(token)
    elif forgery == "other-key":
        token = csrf_token(nonce, "not-the-key")
    else:  # a genuine token, but issued with another visitor's cookie
        async with asgi_client(app) as other:
            token = await open_form(other)
            assert other.cookies[CSRF_COOKIE] != nonce
    page = await web.post("/referrals", data={**fields, "csrf": token, "lang": "fr"})
    assert page.status_code == 403
    assert_problem(page.text, translated("fr", CSRF))
    assert_kept(page.text, fields)
    assert claim_of(live, fields["prospect.website"]) is None


# --- body size -------------------------------------------------------------------------------


async def _chunks(total: int, prefix: bytes) -> AsyncIterator[bytes]:
    yield prefix
    sent = len(prefix)
    while sent < total:
        yield b"x" * 8192
        sent += 8192


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
async def test_oversized_form_is_413(web: httpx.AsyncClient, live: Live, streamed: bool) -> None:
    fields = form_fields()
    token = await open_form(web)
    # A valid referral plus a field the app ignores: only the size is wrong.
    body = str(httpx.QueryParams({**fields, "csrf": token, "lang": "fr"})).encode()
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if streamed:
        content: Any = _chunks(MAX_BODY_BYTES + 10_000, body + b"&padding=")
    else:
        content = body + b"&padding=" + b"x" * (MAX_BODY_BYTES + 1)
    response = await web.post("/referrals", content=content, headers=headers)
    assert response.status_code == 413
    assert response.json()["detail"] == "request body too large"
    assert [(e["field"], e["code"]) for e in response.json()["errors"]] == [("body", "too_large")]
    assert claim_of(live, fields["prospect.website"]) is None


async def test_form_just_under_the_limit_is_accepted(web: httpx.AsyncClient, live: Live) -> None:
    fields = form_fields()
    token = await open_form(web)
    body = str(httpx.QueryParams({**fields, "csrf": token, "lang": "fr"})).encode()
    body += b"&padding=" + b"x" * (MAX_BODY_BYTES - len(body) - len(b"&padding="))
    assert len(body) == MAX_BODY_BYTES
    headers = {"content-type": "application/x-www-form-urlencoded"}
    response = await web.post("/referrals", content=body, headers=headers)
    assert response.status_code == 303
    assert claim_of(live, fields["prospect.website"]) is not None


def _oversized_json(site: str) -> bytes:
    """A valid submission, made too large by insignificant whitespace: only the size is wrong."""
    return json.dumps(submission_data(**{"prospect.website": site})).encode() + b" " * (
        MAX_BODY_BYTES + 1
    )


async def test_oversized_api_body_with_length_is_413(web: httpx.AsyncClient, live: Live) -> None:
    site = unique_site()
    response = await web.post(
        "/api/referrals",
        content=_oversized_json(site),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["detail"] == "request body too large"
    assert [(e["field"], e["code"]) for e in response.json()["errors"]] == [("body", "too_large")]
    assert claim_of(live, site) is None


async def test_oversized_api_body_streamed_is_413(web: httpx.AsyncClient, live: Live) -> None:
    site = unique_site()
    body = _oversized_json(site)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = await web.post(
        "/api/referrals", content=stream(), headers={"content-type": "application/json"}
    )
    assert claim_of(live, site) is None
    assert response.status_code == 413, response.text


# --- the status page -------------------------------------------------------------------------


async def submit_api(web: httpx.AsyncClient, **changes: Any) -> tuple[str, str]:
    """A referral through the JSON API: its id and the path of its status page."""
    data = submission_data(**{"prospect.website": unique_site(), **changes})
    created = await web.post("/api/referrals", json=data)
    assert created.status_code == 201, created.text
    body = created.json()
    path, _ = token_path(body["status_url"])
    return body["referral_id"], path


async def test_status_page_follows_the_referral_without_staff_details(
    web: httpx.AsyncClient, live: Live, rules: ProgramRules
) -> None:
    referral_id, path = await submit_api(web)
    page = await web.get(path)
    assert page.status_code == 200
    html = page.text
    assert '<html lang="fr">' in html  # the referrer's language, not the browser's
    assert f'<dd class="reference">{referral_id}</dd>' in html
    assert "Fromagerie Bellevue SAS" in html and "CloudSuite Financials" in html
    submitted = escape(translated("fr", STAGE_NAMES[Stage.SUBMITTED]))
    assert f'data-stage="submitted"><strong>{submitted}</strong>' in html
    state = await state_of(live, referral_id)
    assert any(f"<dd>{day}</dd>" in html for day in deadline_days(state, rules, "fr"))
    assert re.findall(r'<li data-step="(\w+)">', html) == ["submitted"]
    assert escape(translated("fr", STEP_NAMES["submitted"])) in html

    browser_en = await web.get(path, headers={"Accept-Language": "en-US,en;q=0.9"})
    assert '<html lang="fr">' in browser_en.text
    # One referral's details, behind a secret link: no shared cache keeps them.
    assert page.headers["cache-control"] == "no-store"
    assert "strict-transport-security" not in page.headers  # plain http: the dev stack

    handle = live.client.get_workflow_handle(referral_id)
    await handle.execute_update(
        "act",
        StaffAction(action=Action.CONTACTED, actor="desk-anna", note="SECRET-NOTE"),
        result_type=ActResult,
    )
    page = await web.get(path)
    assert page.status_code == 200
    html = page.text
    contacted = escape(translated("fr", STAGE_NAMES[Stage.CONTACTED]))
    assert f'data-stage="contacted"><strong>{contacted}</strong>' in html
    assert re.findall(r'<li data-step="(\w+)">', html) == ["submitted", "contacted"]
    assert escape(translated("fr", STEP_NAMES["contacted"])) in html
    contact_by = translated("fr", "Contact expected by")
    assert contact_by not in html  # contacted: no deadline any more
    assert "SECRET-NOTE" not in html and "desk-anna" not in html
    assert REFERRER_EMAIL not in html and "Julien Roche" not in html

    english = await web.get(path, params={"lang": "en"})
    assert '<html lang="en">' in english.text
    assert escape(STAGE_NAMES[Stage.CONTACTED]) in english.text
    assert "SECRET-NOTE" not in english.text and "desk-anna" not in english.text


async def test_status_page_shows_the_end_of_protection(
    web: httpx.AsyncClient, live: Live, rules: ProgramRules
) -> None:
    referral_id, path = await submit_api(web)
    handle = live.client.get_workflow_handle(referral_id)
    steps = [
        StaffAction(action=Action.CONTACTED, actor="desk-anna"),
        StaffAction(action=Action.ACCEPT, actor="desk-anna"),
        StaffAction(action=Action.EXTEND, actor="desk-anna", days=30, reason="SECRET-REASON"),
    ]
    for step in steps:
        state = await act_on(handle, step)
    assert state.protected_until is not None
    html = (await web.get(path)).text
    shown = re.search(r'<dd id="protected-until">([^<]+)</dd>', html)
    assert shown is not None and shown.group(1).strip() in last_days(
        state.protected_until, rules, "fr"
    )
    assert translated("fr", "Protected until") in html
    assert re.findall(r'<li data-step="(\w+)">', html) == [
        "submitted",
        "contacted",
        "accept",
        "extend",
    ]
    assert escape(translated("fr", STEP_NAMES["extend"])) in html and "SECRET-REASON" not in html
    await handle.execute_update(
        "act", StaffAction(action=Action.REJECT, actor="desk-anna", reason="no budget")
    )
    assert 'id="protected-until"' not in (await web.get(path)).text


async def test_status_page_for_an_english_referrer(web: httpx.AsyncClient) -> None:
    _, path = await submit_api(web, **{"referrer.language": "en"})
    page = await web.get(path)
    assert '<html lang="en">' in page.text
    assert escape(STAGE_NAMES[Stage.SUBMITTED]) in page.text


@pytest.mark.parametrize("forgery", ["tampered", "unknown-referral", "other-key", "garbage"])
async def test_status_page_of_a_bad_token_is_not_found(
    web: httpx.AsyncClient, forgery: str
) -> None:
    if forgery == "tampered":
        _, path = await submit_api(web)
        token = tamper(path.removeprefix("/status/"))
    elif forgery == "unknown-referral":
        token = status_token("R-NOPE", KEY)
    elif forgery == "other-key":
        referral_id, _ = await submit_api(web)
        token = status_token(referral_id, "not-the-key")
    else:
        token = "R-0000000000"
    page = await web.get(f"/status/{token}")
    assert page.status_code == 404
    assert f"<h1>{translated('fr', 'Link not found')}</h1>" in page.text
    assert 'class="reference"' not in page.text and 'id="timeline"' not in page.text


# --- the JSON API ----------------------------------------------------------------------------


async def test_api_creates_a_referral(web: httpx.AsyncClient, live: Live) -> None:
    site = unique_site()
    created = await web.post("/api/referrals", json=submission_data(**{"prospect.website": site}))
    assert created.status_code == 201
    body = created.json()
    assert set(body) == {"referral_id", "status_url"}
    referral_id = body["referral_id"]
    assert re.fullmatch(r"R-[0-9A-Z]{10}", referral_id)
    assert body["status_url"] == f"{SETTINGS.public_url}/status/{status_token(referral_id, KEY)}"
    path, _ = token_path(body["status_url"])
    page = await web.get(path)
    assert page.status_code == 200 and referral_id in page.text
    state = await state_of(live, referral_id)
    assert state.prospect.website == site
    assert state.history[0].actor == f"web:{REFERRER_EMAIL}"
    claim = claim_of(live, site)
    assert claim is not None and claim.referral_id == referral_id


async def test_api_refuses_field_by_field(web: httpx.AsyncClient, live: Live) -> None:
    site = unique_site()
    public = await web.post(
        "/api/referrals",
        json=submission_data(**{"prospect.website": site, "prospect.sector": "public"}),
    )
    assert public.status_code == 422
    body = public.json()
    assert body["detail"] == "invalid submission"
    [error] = body["errors"]
    assert error["field"] == "prospect.sector" and error["code"] == "public_sector"
    assert "public" in error["message"]
    assert claim_of(live, site) is None

    bad = submission_data(
        **{
            "prospect.website": "not a website",
            "contact.email": "nobody",
            "opportunity.product": "ln-on-premises",
            "consent": False,
        }
    )
    del bad["referrer"]["name"]
    refused = await web.post("/api/referrals", json=bad)
    assert refused.status_code == 422
    errors = refused.json()["errors"]
    assert all(set(e) == {"field", "code", "message"} for e in errors)
    assert all(isinstance(e["message"], str) and e["message"] for e in errors)
    codes = {e["field"]: e["code"] for e in errors}
    assert codes["referrer.name"] == "missing"
    assert {"prospect.website", "contact.email"} <= set(codes)

    ineligible = await web.post(
        "/api/referrals",
        json=submission_data(
            **{"prospect.website": unique_site(), "opportunity.product": "ln-on-premises"},
            consent=False,
        ),
    )
    assert ineligible.status_code == 422
    codes = {e["field"]: e["code"] for e in ineligible.json()["errors"]}
    assert codes == {"opportunity.product": "product_not_eligible", "consent": "consent_required"}


@pytest.mark.parametrize("body", [b"[]", b"{not json"], ids=["array", "malformed"])
async def test_api_refusal_of_a_non_object_body_has_the_documented_shape(
    web: httpx.AsyncClient, body: bytes
) -> None:
    refused = await web.post(
        "/api/referrals", content=body, headers={"content-type": "application/json"}
    )
    assert refused.status_code == 422
    payload = refused.json()
    assert isinstance(payload["detail"], str)
    assert payload["errors"] and all(
        set(e) == {"field", "code", "message"} for e in payload["errors"]
    )


async def test_api_duplicate_is_409(web: httpx.AsyncClient, live: Live) -> None:
    site = unique_site()
    first = await web.post("/api/referrals", json=submission_data(**{"prospect.website": site}))
    assert first.status_code == 201
    again = await web.post(
        "/api/referrals",
        json=submission_data(**{"prospect.website": site.upper().replace("HTTPS://WWW.", "")}),
    )
    assert again.status_code == 409
    body = again.json()
    assert normalize_domain(site) in body["detail"]
    assert [(e["field"], e["code"]) for e in body["errors"]] == [("prospect.website", "duplicate")]
    claim = claim_of(live, site)
    assert claim is not None and claim.referral_id == first.json()["referral_id"]


async def test_api_duplicate_after_acceptance_says_until_when(
    web: httpx.AsyncClient, live: Live
) -> None:
    site = unique_site()
    first = await web.post("/api/referrals", json=submission_data(**{"prospect.website": site}))
    handle = live.client.get_workflow_handle(first.json()["referral_id"])
    for action in (Action.CONTACTED, Action.ACCEPT):
        accepted = await act_on(handle, StaffAction(action=action, actor="alice"))
    assert accepted.protected_until is not None
    again = await web.post(
        "/api/referrals",
        json=submission_data(
            **{"prospect.website": site, "referrer.email": "other@consulting.example"}
        ),
    )
    assert again.status_code == 409
    (error,) = again.json()["errors"]
    day = format_date(accepted.protected_until.date(), "en")
    assert error["message"] == (
        f"This company is already referred, and protected for that referral until {day}. "
        "Thank you all the same: only one referral per company can be open at a time."
    )
    assert accepted.referrer.name not in again.text
    assert str(accepted.referrer.email) not in again.text
    await handle.execute_update(
        "act", StaffAction(action=Action.CANCEL, actor="alice", reason="test over")
    )


async def test_api_concurrent_submissions_for_one_prospect(
    web: httpx.AsyncClient, live: Live
) -> None:
    site = unique_site()
    domain = normalize_domain(site)
    data = submission_data(**{"prospect.website": site})
    responses = await asyncio.gather(*(web.post("/api/referrals", json=data) for _ in range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 19, [r.text for r in responses if r.status_code >= 500]
    [winner] = [r.json()["referral_id"] for r in responses if r.status_code == 201]
    claim = claim_of(live, site)
    assert claim is not None and claim.referral_id == winner

    query = f"ProspectDomain = '{domain}'"

    async def listed() -> list[str]:
        return [wf.id async for wf in live.client.list_workflows(query)]

    async def one_listed() -> bool:
        return len(await listed()) >= 1

    await eventually(one_listed)
    await asyncio.sleep(1.0)  # let any straggler become visible too
    assert await listed() == [winner]


# --- health and Temporal outages -------------------------------------------------------------


async def test_healthz_of_the_live_app(web: httpx.AsyncClient) -> None:
    health = await web.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "temporal": "ok", "database": "ok"}


async def test_temporal_unreachable(live: Live, rules: ProgramRules) -> None:
    nowhere = Settings.from_env({**os.environ, "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
    app = create_app(nowhere, rules=rules, engine=live.engine, client=None, key="k")
    fields = form_fields()
    async with asgi_client(app) as web:
        page = await post_form(web, fields, "en")
        assert page.status_code == 503
        assert_problem(
            page.text,
            "The service is briefly unavailable. What you typed is kept; please try again shortly.",
        )
        assert_kept(page.text, fields)
        assert csrf_of(page.text)

        health = await web.get("/healthz")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "unavailable" and body["database"] == "ok"
        assert body["temporal"].startswith("unavailable")
    assert claim_of(live, fields["prospect.website"]) is None


# --- OpenAPI ---------------------------------------------------------------------------------


async def test_openapi_documents_the_submission(web: httpx.AsyncClient) -> None:
    response = await web.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    post = schema["paths"]["/api/referrals"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Submission"}
    components = schema["components"]["schemas"]
    submission = components["Submission"]
    assert {"referrer", "prospect", "contact", "opportunity", "consent"} <= set(
        submission["properties"]
    )
    assert set(submission["required"]) >= {"referrer", "prospect", "contact", "opportunity"}
    assert {"201", "409", "422"} <= set(post["responses"])
    created = post["responses"]["201"]["content"]["application/json"]["schema"]
    assert created == {"$ref": "#/components/schemas/ReferralCreated"}
    assert set(components["ReferralCreated"]["properties"]) == {"referral_id", "status_url"}
    # Every reference resolves inside the document.
    refs = set(re.findall(r'"\$ref": ?"#/components/schemas/([^"]+)"', response.text))
    assert refs and refs <= set(components)
    prospect = components["Prospect"]["properties"]
    assert set(prospect["sector"]["enum"]) == {"private", "public"}
    # The HTML routes are not part of the API.
    assert "/referrals" not in schema["paths"] and "/" not in schema["paths"]


# --- the dev mailbox -------------------------------------------------------------------------


async def test_dev_mail_lists_newest_first_and_shows_one(
    web: httpx.AsyncClient, live: Live
) -> None:
    referral_id, _ = await submit_api(web)

    def ours() -> list[str]:
        return [
            key
            for key, message in sink_items(live)
            if message["X-Referral-Id"] == referral_id and message["To"] == REFERRER_EMAIL
        ]

    async def delivered() -> bool:
        return bool(ours())

    await eventually(delivered)
    [key] = ours()

    listing = await web.get("/dev/mail")
    assert listing.status_code == 200
    rows = re.findall(
        r'<tr><td>([^<]*)</td><td>[^<]*</td><td><a href="/dev/mail/([^"]+)">([^<]*)</a></td>'
        r"<td>([^<]*)</td></tr>",
        listing.text,
    )
    assert rows
    dates = [parsedate_to_datetime(date) for date, _, _, _ in rows]
    assert dates == sorted(dates, reverse=True)
    assert any(k == key and rid == referral_id for _, k, _, rid in rows)

    shown = await web.get(f"/dev/mail/{key}")
    assert shown.status_code == 200
    message = dict(sink_items(live))[key]
    assert f"<h1>{escape(str(message['Subject']))}</h1>" in shown.text
    assert referral_id in str(message["Subject"])
    plain = re.search(r"<h2>Plain text</h2>\n<pre>(.*?)</pre>", shown.text, re.S)
    assert plain and referral_id in plain.group(1) and "/status/" in plain.group(1)
    assert (await web.get("/dev/mail/no-such-key")).status_code == 404


async def test_no_dev_mail_without_maildir(live: Live, rules: ProgramRules) -> None:
    app = create_app(rules=rules, engine=live.engine, client=live.client, key=KEY)
    async with asgi_client(app) as web:
        assert (await web.get("/dev/mail")).status_code == 404
        key = next(iter(mailbox.Maildir(live.sink.maildir, create=False).keys()), "x")
        assert (await web.get(f"/dev/mail/{key}")).status_code == 404


async def test_dev_mail_never_shows_a_sign_in_link(
    live: Live, rules: ProgramRules, own_maildir: Path
) -> None:
    """A visitor with no cookie asks for a staff member's sign-in link: /dev/mail shows that
    the email went, never the link (read from the message file, it still works)."""
    staff = str(rules.staff.emails[0])
    sink = MailSink("127.0.0.1", free_port(), own_maildir)
    controller = start_sink(sink.host, sink.port, own_maildir)
    try:
        app = create_app(
            rules=rules, engine=live.engine, client=live.client, key=KEY,
            maildir=own_maildir, smtp=sink.settings(), rate_limit="off",
        )  # fmt: skip
        async with asgi_client(app) as web:
            page = await web.get("/staff/sign-in/not-a-token?lang=en")
            asked = {"email": staff, "lang": "en", "csrf": csrf_of(page.text)}
            assert (await web.post("/staff/sign-in", data=asked)).status_code == 200
            for _ in range(200):
                if sink.sign_in_links(staff):
                    break
                await asyncio.sleep(0.05)
            [link] = sink.sign_in_links(staff)
            token = link.split("/sign-in/")[1].split("?")[0]
            listing = await web.get("/dev/mail")
            [key] = re.findall(r'<a href="/dev/mail/([^"]+)">', listing.text)
            shown = await web.get(f"/dev/mail/{key}")
    finally:
        controller.stop()
    assert shown.status_code == 200 and token not in shown.text and token not in listing.text
    assert f"[sign-in link: open it from the message file new/{key}]" in shown.text


def test_dev_mail_is_served_on_loopback_only(live: Live, own_maildir: Path) -> None:
    environment = {**os.environ, "REFERRALS_DATABASE_URL": live.database_url}
    dev = Settings.from_env({**environment, "REFERRALS_DEV_MAILDIR": str(own_maildir)})
    with pytest.raises(WebSettingError, match="REFERRALS_DEV_MAILDIR"):
        served_app(dev, "0.0.0.0")
    served_app(dev, "127.0.0.1")
    served_app(Settings.from_env(environment), "0.0.0.0")  # no mailbox: nothing to hide


def sink_items(live: Live) -> list[tuple[str, EmailMessage]]:
    box = mailbox.Maildir(live.sink.maildir, create=False)
    parsed = [
        (key, message_from_bytes(box.get_bytes(key), policy=policy.default)) for key in box.keys()
    ]
    return [(key, m) for key, m in parsed if isinstance(m, EmailMessage)]


def _deliver(maildir: Path, name: str, subject: str, date: str | None) -> None:
    message = EmailMessage()
    message["Subject"] = subject
    message["To"] = "someone@example.com"
    if date is not None:
        message["Date"] = date
    message.set_content(f"body of {subject}")
    (maildir / "new" / name).write_bytes(bytes(message))


@pytest.fixture
def own_maildir(tmp_path: Path) -> Path:
    for folder in ("tmp", "new", "cur"):
        (tmp_path / "mail" / folder).mkdir(parents=True)
    return tmp_path / "mail"


async def test_dev_mail_same_second_newest_first(
    live: Live, rules: ProgramRules, own_maildir: Path
) -> None:
    date = formatdate(1_800_000_000, localtime=False)
    _deliver(own_maildir, "1800000000.M99999P100Q1.host", "older", date)
    _deliver(own_maildir, "1800000000.M100000P100Q2.host", "newer", date)
    app = create_app(rules=rules, engine=live.engine, client=live.client, key=KEY,
                     maildir=own_maildir)  # fmt: skip
    async with asgi_client(app) as web:
        listing = await web.get("/dev/mail")
    subjects = re.findall(r'<a href="/dev/mail/[^"]+">([^<]*)</a>', listing.text)
    assert subjects == ["newer", "older"]


async def test_dev_mail_message_without_date(
    live: Live, rules: ProgramRules, own_maildir: Path
) -> None:
    _deliver(own_maildir, "1800000000.M1P100Q1.host", "dated", formatdate(localtime=False))
    _deliver(own_maildir, "1800000001.M1P100Q2.host", "undated", None)
    app = create_app(rules=rules, engine=live.engine, client=live.client, key=KEY,
                     maildir=own_maildir)  # fmt: skip
    async with asgi_client(app, raise_app_exceptions=False) as web:
        listing = await web.get("/dev/mail")
    assert listing.status_code == 200
    subjects = re.findall(r'<a href="/dev/mail/[^"]+">([^<]*)</a>', listing.text)
    assert subjects == ["dated", "undated"]


async def test_behind_https_cookies_stay_on_https_and_browsers_remember_it(
    live: Live, rules: ProgramRules
) -> None:
    """The public URL is https (the ingress ends TLS): a CSRF or session cookie is never sent
    over plain http, and a browser that came once never tries plain http again (HSTS)."""
    app = create_app(
        Settings(public_url="https://referrals.example.com"),
        rules=rules, engine=live.engine, client=live.client, key=KEY, rate_limit="off",
    )  # fmt: skip
    async with asgi_client(app) as web:
        for path in ("/", "/me", "/staff", "/no-such-page"):
            page = await web.get(path)
            assert page.headers["strict-transport-security"] == "max-age=31536000", path
        form = await web.get("/")
    cookies = form.headers.get_list("set-cookie")
    assert cookies and all("; secure" in cookie.lower() for cookie in cookies)
