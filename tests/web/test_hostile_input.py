"""Hostile text in every free-text field of a submission: markup, line breaks, very long text,
right-to-left and CJK scripts, emoji. It must come out as text everywhere it goes: in the
emails (headers intact, HTML escaped, plain text untouched) and in the web pages (escaped,
and only our own markup). Also: the honeypot, and the security headers on every route.

The emails are rendered and built by the real `render_email` / `build_message` and parsed
back as a mail client would; the web app runs in process against the real dev server.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import AsyncIterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from fastapi.routing import APIRoute
from markupsafe import escape
from playwright.async_api import async_playwright
from sqlmodel import Session, select
from starlette.routing import Mount

from activities.db import ReferralRow
from activities.email import build_message, render_email
from activities.queries import load_referral
from core.program import load_program
from devstack.factories import ONE_LINE_FIELDS, submission_data
from devstack.servers import serve_app
from devstack.settings import ROOT, SECRET
from starter.intake import DIRECTION_CONTROLS, SubmissionRefused, parse_submission
from starter.web import create_app
from starter.web.intake import CSRF_COOKIE, ERROR_MESSAGES, HONEYPOT
from starter.web.security import MAX_BODY_BYTES
from tests.activities.test_email_templates import TEMPLATE_EXTRA, TEMPLATE_STAGES, make_state
from tests.conftest import Live, eventually
from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.web.test_web import (
    REFERRER_EMAIL,
    FormState,
    asgi_client,
    assert_kept,
    assert_problem,
    claim_of,
    csrf_of,
    form_fields,
    open_form,
    post_form,
    translated,
    unique_site,
)
from workflows.models.program import ProgramRules
from workflows.models.referral import EmailRequest, ReferralState, Submission
from workflows.models.values import Language, normalize_domain

KEY = SECRET  # the live worker's: its emailed links are the pages' links
RULES = load_program(ROOT / "program.yaml")
SINGLE_LINE = ONE_LINE_FIELDS
FREE_TEXT = [*SINGLE_LINE, "opportunity.notes"]
PAYLOADS = {
    "markup": "<script>alert('x')</script> & \"quoted\" <b onmouseover=alert(1)>bold</b>",
    "attributes": '"><img src=x onerror=alert(1)> www.evil.example/"><svg/onload=alert(1)> '
    "javascript:alert(1)",
    # Right to left (Arabic, Hebrew, a right-to-left mark), CJK, emoji with a joiner.
    "scripts": 'شركة النور — חברת אור בע"מ \u200fevil 株式会社山田製作所 🚀👩\u200d💻 Café ☕',
    "template-syntax": "{{ 7*7 }} {% if true %}x{% endif %} ${7*7} Bcc: victim@example.com",
    "long": "長" * 60 + "<i>" + "🚀" * 60 + "</i>" + "ع" * 200,
}
NOTES_LIMIT, TEXT_LIMIT = 4000, 200
# The only elements and attributes our pages and emails are made of: anything else in a
# rendered page came from someone's input.
EMAIL_TAGS = {"html", "head", "meta", "title", "body", "table", "tr", "td", "h1", "p", "br"}
EMAIL_TAGS |= {"code", "a"}
PAGE_TAGS = {"html", "head", "meta", "title", "link", "body", "header", "div", "span", "a"}
PAGE_TAGS |= {"main", "h1", "h2", "p", "form", "input", "fieldset", "legend", "label", "select"}
PAGE_TAGS |= {"option", "textarea", "button", "dl", "dt", "dd", "strong", "ol", "li", "time", "br"}
MESSAGE_HEADERS = {
    "subject",
    "from",
    "to",
    "date",
    "message-id",
    "x-referral-id",
    "x-idempotency-key",
    "content-type",
    "mime-version",
    "content-language",
}


def hostile_values(kind: str) -> dict[str, str]:
    """Each free-text field gets the payload, tagged with its field (so each is found on its
    own), cut to the model's limit; the notes get it over several lines, up to their limit."""
    payload = PAYLOADS[kind]
    values = {}
    for name in SINGLE_LINE:
        values[name] = f"{name}:{payload}"[:TEXT_LIMIT].strip()
    notes = f"notes:{payload}\nsecond line {payload}\n\n$ third paragraph {payload}"
    if kind == "long":
        notes = (notes + "\n" + payload * (NOTES_LIMIT // len(payload) + 1))[:NOTES_LIMIT]
    values["opportunity.notes"] = notes.strip()
    return values


def hostile_submission(kind: str) -> Submission:
    """Through the web intake's own check: the payloads are acceptable text."""
    data = submission_data(**{"prospect.website": unique_site(), **hostile_values(kind)})
    return parse_submission(data, RULES)


def value_of(referral: Submission | ReferralState, name: str) -> str | None:
    section, _, key = name.partition(".")
    value = getattr(getattr(referral, section), key)
    return value if isinstance(value, str) else None


class Markup(HTMLParser):
    """The elements, attributes and text a browser or a mail client would see."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attributes: list[tuple[str, str, str]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes += [(tag, name, value or "") for name, value in attrs]
        if tag == "br":
            self.text.append("\n")

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def shown(self) -> str:
        return "".join(self.text)


def assert_only_our_markup(html: str, allowed: set[str]) -> Markup:
    markup = Markup(html)
    assert markup.tags <= allowed, markup.tags - allowed
    for tag, name, value in markup.attributes:
        assert not name.startswith("on"), (tag, name, value)
        if name in ("href", "src", "action"):
            assert not value.strip().lower().startswith(("javascript:", "data:")), (tag, value)
    return markup


# --- emails -------------------------------------------------------------------------------------


def hostile_state(stage_state: ReferralState, submission: Submission) -> ReferralState:
    return stage_state.model_copy(
        update={
            "referrer": submission.referrer,
            "prospect": submission.prospect,
            "contact": submission.contact,
            "opportunity": submission.opportunity,
        }
    )


def render(
    template: str, language: Language, state: ReferralState, exact: bool = True
) -> EmailMessage:
    request = EmailRequest(
        key=f"{state.referral_id}/{template}",
        to=["someone@example.com"],
        sender="referrals@example.com",
        language=language,
        template=template,
        referral=state,
        extra=TEMPLATE_EXTRA.get(template, {}),
    )
    # As sent to a verified address, where what was typed is in the email.
    rendered = render_email(request, facts={"referrer_verified": True})
    raw = bytes(build_message(request, rendered))
    header_block = raw.split(b"\n\n", 1)[0].decode("ascii")
    for line in header_block.split("\n"):
        # A header line or a folded continuation of one: never a header of the payload's own.
        assert line[:1] in (" ", "\t") or line.split(":", 1)[0].lower() in MESSAGE_HEADERS, line
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert {name.lower() for name in parsed.keys()} == MESSAGE_HEADERS
    # Compared without whitespace: Python's header folding can drop the space between two
    # encoded words ("<Fils> : opportunité" comes back "<Fils> :opportunité"), a known
    # email-library flaw that loses a space, never adds a line.
    assert re.sub(r"\s", "", parsed["Subject"]) == re.sub(r"\s", "", rendered.subject)
    assert "\n" not in rendered.subject and "\r" not in rendered.subject
    assert parsed["To"] == "someone@example.com" and parsed.get_all("To") == [parsed["To"]]
    plain, html = parsed.get_body(("plain",)), parsed.get_body(("html",))
    assert plain is not None and html is not None
    if not exact:
        return parsed
    # Exactly what was rendered (the MIME part only ends it with a newline, as lines end).
    assert plain.get_content().rstrip("\n") == rendered.text.replace("\r\n", "\n").rstrip("\n")
    assert html.get_content().rstrip("\n") == rendered.html.replace("\r\n", "\n").rstrip("\n")
    return parsed


LANGUAGES: tuple[Language, ...] = ("fr", "en")


@functools.cache
def reference_email(template: str, language: Language) -> EmailMessage:
    """The email with the ordinary example referral: tells which fields it mentions."""
    return render(template, language, make_state(TEMPLATE_STAGES[template], language=language))


CASES = [(name, lang) for name in sorted(TEMPLATE_STAGES) for lang in LANGUAGES]


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_hostile_text_reaches_every_email_as_text(kind: str) -> None:
    """Rendered and built as the worker does, parsed back as a mail client does: headers are
    ours only, the subject is one line, the HTML part shows the text (escaped, no element
    of its own), and the plain-text part holds it exactly."""
    submission = hostile_submission(kind)
    for template, language in CASES:
        baseline = make_state(TEMPLATE_STAGES[template], language=language)
        state = hostile_state(baseline, submission)
        parsed = render(template, language, state)
        reference = reference_email(template, language)
        text = parsed.get_body(("plain",))
        html = parsed.get_body(("html",))
        assert text is not None and html is not None
        plain, page = str(text.get_content()), str(html.get_content())
        reference_part = reference.get_body(("plain",))
        assert reference_part is not None
        reference_text = str(reference_part.get_content())
        shown = assert_only_our_markup(page, EMAIL_TAGS).shown()
        assert "<script" not in page.lower() and "<img" not in page.lower()
        for name in FREE_TEXT:
            known = value_of(baseline, name)
            if known is None or known not in reference_text:
                continue  # this email does not mention the field
            value = value_of(submission, name)
            assert value is not None
            for line in value.split("\n"):
                assert line in plain, (template, language, name)
                shown_line = line.removeprefix("$ ") if line.startswith("$ ") else line
                assert shown_line in shown, (template, language, name)
        if baseline.prospect.company in str(reference["Subject"]):
            company = re.sub(r"\s", "", submission.prospect.company)  # see `render`
            assert company in re.sub(r"\s", "", str(parsed["Subject"]))


@pytest.mark.parametrize("breaker", ["\r\n", "\n", "\r", "\u2028", "\x85", "\x0b"], ids=repr)
def test_a_line_break_that_got_past_the_intake_injects_no_header(breaker: str) -> None:
    """Defense in depth, for a referral stored before the intake refused line breaks: the
    email may fail or be garbled, but can never gain a header (a Bcc) from the data."""
    state = make_state(TEMPLATE_STAGES["referrer_submitted"], language="en")
    prospect = state.prospect.model_copy(
        update={"company": f"Acme{breaker}Bcc: victim@example.com"}
    )
    state = state.model_copy(update={"prospect": prospect})
    for template in ("referrer_submitted", "staff_new_referral"):
        try:
            parsed = render(template, "en", state, exact=False)
        except ValueError as refused:  # build_message refuses a multi-line header
            assert "may not contain a line break" in str(refused)
            continue
        assert parsed["Bcc"] is None and parsed.get_all("To") == ["someone@example.com"]


# --- the intake refuses line breaks in one-line fields -------------------------------------------


@pytest.mark.parametrize("name", SINGLE_LINE)
@pytest.mark.parametrize("breaker", ["\r\n", "\n", "\u2028", "\x00"], ids=repr)
def test_intake_refuses_line_breaks_in_one_line_fields(name: str, breaker: str) -> None:
    data = submission_data(**{name: f"Acme{breaker}Bcc: victim@example.com"})
    with pytest.raises(SubmissionRefused) as refused:
        parse_submission(data, RULES)
    assert [(e.field, e.code) for e in refused.value.errors] == [(name, "control_characters")]


@pytest.mark.parametrize("name", FREE_TEXT)
@pytest.mark.parametrize("control", sorted(DIRECTION_CONTROLS), ids=lambda c: f"U+{ord(c):04X}")
def test_intake_refuses_text_direction_controls(name: str, control: str) -> None:
    """ "Acme \u202egnp.exe" displays as "Acme exe.png": text that reads as other text."""
    data = submission_data(**{name: f"Acme {control}gnp.exe"})
    with pytest.raises(SubmissionRefused) as refused:
        parse_submission(data, RULES)
    assert [e.field for e in refused.value.errors] == [name]
    assert refused.value.errors[0].code.startswith("control_characters")


def test_notes_keep_their_line_breaks() -> None:
    notes = "first line\r\nsecond line\n\n\tthird paragraph"
    submission = parse_submission(submission_data(**{"opportunity.notes": notes}), RULES)
    assert submission.opportunity.notes == notes


# --- web pages ----------------------------------------------------------------------------------


def make_app(live: Live, rules: ProgramRules, **options: Any) -> FastAPI:
    settings: dict[str, Any] = {
        "rate_limit": "off",
        "maildir": live.sink.maildir,
        "smtp": live.sink.settings(),
        **options,
    }
    return create_app(rules=rules, engine=live.engine, client=live.client, key=KEY, **settings)


@pytest_asyncio.fixture
async def web(live: Live, rules: ProgramRules) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(make_app(live, rules)) as client:
        yield client


def hostile_fields(kind: str, **changes: str) -> dict[str, str]:
    fields = form_fields()
    fields.update(hostile_values(kind))
    fields.update(changes)
    return fields


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
async def test_form_refusal_shows_hostile_text_as_typed_and_escaped(
    web: httpx.AsyncClient, live: Live, kind: str
) -> None:
    fields = hostile_fields(kind)
    del fields["consent"]  # one thing to fix, so the form comes back with everything typed
    page = await post_form(web, fields, "en")
    assert page.status_code == 422, page.text
    assert_only_our_markup(page.text, PAGE_TAGS)
    assert_kept(page.text, fields)
    assert "<script" not in page.text.lower()
    assert claim_of(live, fields["prospect.website"]) is None


@pytest.mark.parametrize("name", ["referrer.name", "prospect.company", "contact.title"])
async def test_form_refuses_a_line_break_in_a_one_line_field(
    web: httpx.AsyncClient, live: Live, name: str
) -> None:
    fields = hostile_fields("markup", **{name: "Acme\r\nBcc: victim@example.com"})
    page = await post_form(web, fields, "fr")
    assert page.status_code == 422
    state = FormState(page.text)
    message = translated("fr", ERROR_MESSAGES["control_characters"])
    assert state.texts[f"{name}-error"] == message
    assert list(state.texts) == ["problem", f"{name}-error"]
    assert_only_our_markup(page.text, PAGE_TAGS)
    assert claim_of(live, fields["prospect.website"]) is None


async def test_api_refuses_a_line_break_in_a_one_line_field(
    web: httpx.AsyncClient, live: Live
) -> None:
    site = unique_site()
    data = submission_data(
        **{"prospect.website": site, "referrer.name": "Claire\r\nBcc: victim@example.com"}
    )
    refused = await web.post("/api/referrals", json=data)
    assert refused.status_code == 422
    assert refused.json()["errors"] == [
        {
            "field": "referrer.name",
            "code": "control_characters",
            "message": "line breaks and other control characters are not allowed here",
        }
    ]
    assert claim_of(live, site) is None


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
async def test_hostile_referral_is_accepted_and_shown_escaped(
    web: httpx.AsyncClient, live: Live, kind: str
) -> None:
    """Accepted through the form (as a browser sends it: CRLF line breaks in the notes), kept
    exactly by the system of record, shown as text on the confirmation and status pages, and
    in the acknowledgement the worker really sends."""
    fields = hostile_fields(kind)
    fields["opportunity.notes"] = fields["opportunity.notes"].replace("\n", "\r\n")
    fields["opportunity.notes"] = fields["opportunity.notes"][:NOTES_LIMIT].strip()
    posted = await post_form(web, fields, "en")
    assert posted.status_code == 303, posted.text
    token = posted.headers["location"].split("/")[-1].split("?")[0]
    company = fields["prospect.company"]
    for path in (posted.headers["location"], f"/status/{token}"):
        page = await web.get(path)
        assert page.status_code == 200
        shown = assert_only_our_markup(page.text, PAGE_TAGS).shown()
        assert "<script" not in page.text.lower()
        if path.startswith("/status/"):
            assert company in shown and str(escape(company)) in page.text
    claim = claim_of(live, fields["prospect.website"])
    assert claim is not None
    stored = load_referral(live.engine, claim.referral_id)
    assert stored is not None
    for name in FREE_TEXT:
        assert value_of(stored, name) == fields[name], name

    def acknowledgement() -> EmailMessage | None:
        return next(
            (
                m
                for m in live.sink.messages()
                if m["X-Referral-Id"] == claim.referral_id and m["To"] == REFERRER_EMAIL
            ),
            None,
        )

    async def sent() -> bool:
        return acknowledgement() is not None

    await eventually(sent)
    email = acknowledgement()
    assert email is not None and email["Bcc"] is None
    assert claim.referral_id in str(email["Subject"]) and "\n" not in str(email["Subject"])
    plain = email.get_body(("plain",))
    assert plain is not None
    # Nobody has been in touch with that address yet: nothing typed reaches it.
    for name in FREE_TEXT:
        assert fields[name] not in str(email["Subject"]) + plain.get_content(), name


async def test_the_longest_texts_fit_under_the_body_limit(web: httpx.AsyncClient) -> None:
    """Every text field at its limit, in a three-byte script, as a browser encodes a form."""
    fields = form_fields()
    for name in SINGLE_LINE:
        fields[name] = "語" * TEXT_LIMIT
    fields["opportunity.notes"] = "語" * NOTES_LIMIT
    token = await open_form(web)
    body = str(httpx.QueryParams({**fields, "csrf": token, "lang": "en"})).encode()
    assert len(body) < MAX_BODY_BYTES
    posted = await web.post(
        "/referrals",
        content=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert posted.status_code == 303, posted.text


# --- the honeypot -------------------------------------------------------------------------------


async def test_the_form_has_a_hidden_honeypot(web: httpx.AsyncClient) -> None:
    page = (await web.get("/")).text
    found = re.search(r'<div class="hp" aria-hidden="true">(.*?)</div>', page, re.S)
    assert found, "no honeypot in the form"
    assert f'name="{HONEYPOT}" value="" tabindex="-1" autocomplete="off"' in found.group(1)
    css = (await web.get(re.findall(r'href="(/static/[^"]+)"', page)[0])).text
    assert re.search(r"\.hp \{[^}]*left: -10000px", css)


@pytest.mark.parametrize("lang", ["fr", "en"])
async def test_a_filled_honeypot_starts_nothing_and_says_nothing(
    web: httpx.AsyncClient, live: Live, lang: str
) -> None:
    fields = form_fields()
    token = await open_form(web)
    page = await web.post(
        "/referrals", data={**fields, HONEYPOT: "http://spam.example", "csrf": token, "lang": lang}
    )
    assert page.status_code == 400
    not_sent = (
        "Your referral could not be sent. What you typed is kept; please check it and send it "
        "again."
    )
    assert_problem(page.text, translated(lang, not_sent))
    assert "honeypot" not in page.text.lower() and "spam.example" not in page.text
    assert_kept(page.text, fields)
    assert FormState(page.text).values[HONEYPOT] == ""
    assert claim_of(live, fields["prospect.website"]) is None
    domain = normalize_domain(fields["prospect.website"])
    with Session(live.engine) as session:
        recorded = session.exec(select(ReferralRow).where(ReferralRow.prospect_domain == domain))
        assert recorded.first() is None
    # The person (not the bot) sends the kept form again: it goes through.
    again = await web.post("/referrals", data=FormState(page.text).values)
    assert again.status_code == 303


async def test_the_api_has_no_honeypot(web: httpx.AsyncClient) -> None:
    """Partners' integrations send JSON; a `subject` there is just an unknown field."""
    data = submission_data(**{"prospect.website": unique_site()})
    assert (await web.post("/api/referrals", json=data)).status_code == 201
    data = {**submission_data(**{"prospect.website": unique_site()}), HONEYPOT: "x"}
    refused = await web.post("/api/referrals", json=data)
    assert refused.status_code == 422
    assert [e["field"] for e in refused.json()["errors"]] == [HONEYPOT]


# --- security headers on every route ------------------------------------------------------------


def assert_secure(response: httpx.Response, dev_mail: bool = False, chart: bool = False) -> None:
    """`chart`: an SVG chart image, which its library styles inline (never a page)."""
    headers = response.headers
    policy_ = headers["content-security-policy"]
    directives = dict((d.strip().split(" ", 1) + [""])[:2] for d in policy_.split(";") if d.strip())
    assert directives["default-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "script-src" not in directives  # no script at all: default-src 'none' applies
    if dev_mail or chart:
        assert directives["style-src"] == "'unsafe-inline'"
    else:
        assert directives["style-src"] == "'self'"
        assert "unsafe" not in policy_
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    if headers.get("content-type", "").startswith("text/html"):
        html = response.text.lower()
        assert "<script" not in html
        if not dev_mail:  # the page keeps to its own policy: no inline style either
            assert "<style" not in html and " style=" not in html


async def test_security_headers_on_every_route(
    live: Live, rules: ProgramRules, tmp_path: Path
) -> None:
    maildir = tmp_path / "mail"
    for folder in ("tmp", "new", "cur"):
        (maildir / folder).mkdir(parents=True)
    message = EmailMessage()
    message["Subject"] = "<script>alert(1)</script>"
    message["To"] = "someone@example.com"
    message.set_content("plain")
    message.add_alternative('<p style="color:red">"><script>alert(1)</script></p>', "html")
    (maildir / "new" / "1800000000.M1P1Q1.host").write_bytes(bytes(message))
    app = make_app(live, rules, maildir=maildir)
    limited = make_app(live, rules, rate_limit="1/minute")
    hit: set[str] = set()

    async def check(
        client: httpx.AsyncClient, method: str, path: str, status: int, **kw: Any
    ) -> httpx.Response:
        response = await client.request(method, path, **kw)
        assert response.status_code == status, (method, path, response.text[:300])
        assert_secure(
            response,
            dev_mail=path.startswith("/dev/mail"),
            chart=path.startswith("/staff/charts/"),
        )
        hit.add(path.split("?")[0])
        return response

    async with asgi_client(app) as web, asgi_client(limited) as slow:
        page = await check(web, "GET", "/", 200)
        await check(web, "GET", "/?lang=en", 200)
        css = re.findall(r'href="(/static/[^"]+)"', page.text)[0]
        assert (await check(web, "GET", css, 200)).headers["content-type"].startswith("text/css")
        token = csrf_of(page.text)
        fields = form_fields()
        form = {**fields, "csrf": token, "lang": "fr"}
        posted = await check(web, "POST", "/referrals", 303, data=form)
        await check(web, "POST", "/referrals", 409, data={**form})
        await check(web, "POST", "/referrals", 422, data={**form, "consent": ""})
        await check(web, "POST", "/referrals", 403, data={**form, "csrf": "forged"})
        await check(web, "POST", "/referrals", 400, data={**form, HONEYPOT: "x"})
        big = {**form, "padding": "x" * MAX_BODY_BYTES}
        await check(web, "POST", "/referrals", 413, data=big)
        confirmation = posted.headers["location"]
        await check(web, "GET", confirmation, 200)
        token = confirmation.split("/")[-1].split("?")[0]
        await check(web, "GET", f"/status/{token}", 200)
        await check(web, "GET", "/status/forged", 404)
        await check(web, "GET", "/confirmation/forged", 404)
        data = submission_data(**{"prospect.website": unique_site()})
        await check(web, "POST", "/api/referrals", 201, json=data)
        await check(web, "POST", "/api/referrals", 409, json=data)
        await check(web, "POST", "/api/referrals", 422, json={})
        await check(web, "POST", "/api/referrals", 413, content=b" " * (MAX_BODY_BYTES + 1))
        await check(web, "PUT", "/api/referrals", 405)
        await check(web, "GET", "/healthz", 200)
        await check(web, "GET", "/livez", 200)
        await check(web, "GET", "/readyz", 200)
        await check(web, "GET", "/openapi.json", 200)
        await check(web, "GET", "/no-such-page", 404)
        listing = await check(web, "GET", "/dev/mail", 200)
        assert "&lt;script&gt;" in listing.text
        shown = await check(web, "GET", "/dev/mail/1800000000.M1P1Q1.host", 200)
        assert '<iframe sandbox="" srcdoc="' in shown.text and "<script" not in shown.text
        await check(web, "GET", "/dev/mail/none", 404)
        # The portal and the dashboard, signed out, then signed in through an emailed link.
        staff_email = str(rules.staff.emails[0])
        sign_out_tokens: dict[str, str] = {}
        for home, email in (("/me", fields["referrer.email"]), ("/staff", staff_email)):
            page = await check(web, "GET", home, 200)
            await check(web, "POST", f"{home}/sign-in", 403, data={"email": email})
            asked = {"email": email, "csrf": csrf_of(page.text), "lang": "en"}
            sent = len(live.sink.sign_in_links(email))
            await check(web, "POST", f"{home}/sign-in", 200, data=asked)
            await check(web, "GET", f"{home}/sign-in/forged", 400)

            async def arrived(email: str = email, sent: int = sent) -> bool:
                return len(live.sink.sign_in_links(email)) > sent

            await eventually(arrived)
            link = live.sink.sign_in_links(email)[-1]
            opened = await check(web, "GET", link, 200)
            await check(web, "POST", link.partition("?")[0], 403, data={"lang": "en"})
            used = {"csrf": csrf_of(opened.text), "lang": "en"}
            await check(web, "POST", link.partition("?")[0], 303, data=used)
            signed_in = await check(web, "GET", home, 200)
            sign_out_tokens[home] = csrf_of(signed_in.text)
        await check(web, "GET", "/me/statement.csv", 200)
        await check(web, "GET", "/staff/charts/funnel.svg", 200)
        for home in ("/me", "/staff"):
            await check(web, "POST", f"{home}/sign-out", 303, data={"csrf": sign_out_tokens[home]})
        await check(slow, "POST", "/api/referrals", 422, json={})
        await check(slow, "POST", "/api/referrals", 429, json={})
        slow_page = await slow.get("/")
        form = {**fields, "csrf": csrf_of(slow_page.text), "lang": "fr"}
        await check(slow, "POST", "/referrals", 429, data=form)

    # Every route of the app was visited: a new route cannot slip by without its headers.
    for route in app.routes:
        if isinstance(route, APIRoute | Mount):
            pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(route.path))
            pattern += "/.+" if isinstance(route, Mount) else ""
            assert any(re.fullmatch(pattern, path) for path in hit), route.path


async def test_a_fresh_visitor_gets_the_form_cookie_safely(web: httpx.AsyncClient) -> None:
    response = await web.get("/")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{CSRF_COOKIE}=") and "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()


# --- in a real browser: the policy blocks nothing the pages need ---------------------------------


@pytest_asyncio.fixture
async def served(live: Live, rules: ProgramRules, tmp_path: Path) -> AsyncIterator[str]:
    """The app on a loopback port, with a dev mailbox holding one email whose HTML has inline
    styles, as every email does."""
    maildir = tmp_path / "mail"
    for folder in ("tmp", "new", "cur"):
        (maildir / folder).mkdir(parents=True)
    message = EmailMessage()
    message["Subject"] = "styled"
    message["To"] = "someone@example.com"
    message.set_content("plain")
    message.add_alternative('<p style="color: rgb(200, 0, 0)">styled</p>', "html")
    (maildir / "new" / "1800000000.M2P1Q1.host").write_bytes(bytes(message))
    async with serve_app(make_app(live, rules, maildir=maildir)) as base:
        yield base


async def test_the_pages_work_under_their_policy_in_a_browser(served: str) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = await browser.new_page()
        refused: list[str] = []
        page.on(
            "console", lambda m: refused.append(m.text) if "Security Policy" in m.text else None
        )
        await page.goto(f"{served}/?lang=en")
        # The style sheet applied (the button's colour comes from it)...
        colour = await page.locator("button").evaluate("b => getComputedStyle(b).backgroundColor")
        assert colour == "rgb(29, 78, 216)"
        # ...and it hides the honeypot from people while keeping it in the form for bots.
        honeypot = page.locator(f'[name="{HONEYPOT}"]')
        assert await honeypot.count() == 1
        box = await honeypot.bounding_box()
        assert box is None or box["x"] + box["width"] <= 0
        await page.goto(f"{served}/dev/mail/1800000000.M2P1Q1.host")
        frame = page.frame_locator("iframe").locator("p")
        assert await frame.evaluate("p => getComputedStyle(p).color") == "rgb(200, 0, 0)"
        await browser.close()
    assert refused == []
