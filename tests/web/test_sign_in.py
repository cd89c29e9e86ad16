"""Sign-in by emailed link (portal and dashboard): the links go through a real SMTP server on
loopback, the one-time use through a real database."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.requests import Request

from activities.db import ReferralRow, make_engine
from activities.schema import upgrade
from devstack.servers import MailSink
from devstack.web import use_sign_in_link
from starter.web import signin
from starter.web.security import RateLimiter
from starter.web.signin import (
    CSRF_COOKIE,
    LINKS_PER_ADDRESS,
    REFERRER,
    STAFF,
    LinkRefused,
    SignedIn,
    add_sign_in_routes,
    link_token,
    redeem,
    sign_out_token,
    signed_in,
)
from starter.web.site import Site
from tests.conftest import in_process
from workflows.models.program import ProgramRules, StaffRules

KEY = "sign-in-test-key"
STAFF_EMAIL = "manager@nuage-logiciel.example"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('signin') / 'referrals.db'}")
    upgrade(engine)
    return engine


def site_for(rules: ProgramRules, engine: Engine, mail_sink: MailSink, limit: str = "off") -> Site:
    staff = rules.model_copy(update={"staff": StaffRules(emails=[STAFF_EMAIL.upper()])})
    return Site(
        rules=staff,
        engine=engine,
        key=KEY,
        smtp=mail_sink.settings(),
        limiter=RateLimiter.from_setting(limit),
    )


def app_for(site: Site) -> FastAPI:
    app = FastAPI()
    add_sign_in_routes(app, site, REFERRER)
    add_sign_in_routes(app, site, STAFF)
    return app


@pytest_asyncio.fixture
async def web(rules: ProgramRules, engine: Engine, mail_sink: MailSink) -> AsyncIterator[Site]:
    yield site_for(rules, engine, mail_sink)


def referral_of(engine: Engine, email: str) -> None:
    """The one fact `may_sign_in` needs of a referrer: a referral row with their address."""
    now = datetime.now(UTC)
    with Session(engine) as session:
        session.add(
            ReferralRow(
                referral_id=f"referral-{uuid.uuid4().hex[:8]}",
                stage="submitted",
                prospect_company="Fromagerie Bellevue",
                prospect_domain=f"{uuid.uuid4().hex[:8]}.example",
                product="cloudsuite-financials",
                referrer_email=email,
                submitted_at=now,
                contact_deadline=now,
                contact_sla_breached=False,
                revision=1,
                state="{}",
                updated_at=now,
            )
        )
        session.commit()


async def ask(client: httpx.AsyncClient, home: str, email: str, lang: str = "en") -> httpx.Response:
    page = await client.get(f"{home}/sign-in/not-a-token?lang={lang}")  # any page sets the CSRF
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    return await client.post(f"{home}/sign-in", data={"email": email, "lang": lang, "csrf": csrf})


def links(sink: MailSink, email: str) -> list[str]:
    return sink.sign_in_links(email)


async def settle(sink: MailSink, email: str, count: int) -> list[str]:
    """Links are sent after the answer: wait until `count` have arrived."""
    deadline = time.monotonic() + 20
    while len(found := links(sink, email)) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} sign-in links arrived"
        await asyncio.sleep(0.05)
    return found


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return in_process(app)


async def test_known_and_unknown_addresses_get_the_same_answer_and_only_one_email(
    web: Site, mail_sink: MailSink, engine: Engine
) -> None:
    known = f"claire-{uuid.uuid4().hex[:6]}@conseil-durand.example"
    unknown = f"nobody-{uuid.uuid4().hex[:6]}@conseil-durand.example"
    referral_of(engine, known)
    async with client_for(app_for(web)) as client:
        for_known = await ask(client, "/me", known)
        for_unknown = await ask(client, "/me", unknown)
        for_staff = await ask(client, "/staff", known)  # a referrer is not staff
    assert for_known.status_code == for_unknown.status_code == for_staff.status_code == 200
    assert for_known.text == for_unknown.text
    assert 'id="sent"' in for_known.text
    assert len(await settle(mail_sink, known, 1)) == 1
    await asyncio.sleep(0.3)
    assert links(mail_sink, unknown) == []
    assert [link for link in links(mail_sink, known) if link.startswith("/staff")] == []
    message = next(m for m in mail_sink.messages() if str(m["To"]) == known)
    assert message["Subject"] == "Sign in to see your referrals"
    assert "valid for 30 minutes" in message.get_content()


async def test_a_link_signs_in_once_with_a_safe_cookie(web: Site, mail_sink: MailSink) -> None:
    async with client_for(app_for(web)) as client:
        before = len(links(mail_sink, STAFF_EMAIL))
        await ask(client, "/staff", STAFF_EMAIL, lang="fr")
        link = (await settle(mail_sink, STAFF_EMAIL, before + 1))[-1]
        assert link.startswith("/staff/sign-in/") and link.endswith("?lang=fr")
        # A mail scanner fetching every link spends nothing: the page has a button.
        scanned = [await client.get(link) for _ in range(2)]
        opened = await use_sign_in_link(client, link)
        again = await use_sign_in_link(client, link)
    assert [page.status_code for page in scanned] == [200, 200]
    assert 'id="use-link"' in scanned[0].text
    assert STAFF.cookie not in scanned[0].headers.get("set-cookie", "")
    assert scanned[0].headers["cache-control"] == "no-store"
    assert opened.status_code == 303
    assert opened.headers["location"] == "/staff?lang=fr"
    cookie = opened.headers["set-cookie"].lower()
    assert cookie.startswith(f"{STAFF.cookie}=")
    for attribute in ("httponly", "samesite=lax", "path=/staff", "max-age=28800"):
        assert attribute in cookie
    assert again.status_code == 400
    assert 'id="problem"' in again.text and "a déjà servi" in again.text


def test_expired_forged_and_reused_links_are_refused(
    web: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = link_token(web, STAFF, STAFF_EMAIL)
    assert redeem(web, REFERRER, fresh) is LinkRefused.INVALID  # another audience's salt
    assert redeem(web, STAFF, fresh[:-2] + "xx") is LinkRefused.INVALID
    opened = redeem(web, STAFF, fresh)
    assert isinstance(opened, SignedIn) and opened.email == STAFF_EMAIL
    assert redeem(web, STAFF, fresh) is LinkRefused.USED
    stale = link_token(web, STAFF, STAFF_EMAIL)
    later = time.time() + 31 * 60
    monkeypatch.setattr(signin, "time", SimpleNamespace(time=lambda: later))
    assert redeem(web, STAFF, stale) is LinkRefused.EXPIRED


def test_a_link_reveals_nothing(web: Site) -> None:
    """Whoever sees a link (a proxy's log, a forwarded email) learns not even the address."""
    token = link_token(web, STAFF, STAFF_EMAIL)
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for shown in (token, decoded.decode("latin-1")):
        assert STAFF_EMAIL not in shown and "manager" not in shown and "nonce" not in shown


def test_links_survive_a_rotation_of_the_secret(web: Site) -> None:
    before = link_token(web, STAFF, STAFF_EMAIL)
    rotated = dataclasses.replace(web, key=("a-new-secret", KEY))
    opened = redeem(rotated, STAFF, before)
    assert isinstance(opened, SignedIn) and opened.email == STAFF_EMAIL
    assert redeem(web, STAFF, link_token(rotated, STAFF, STAFF_EMAIL)) is LinkRefused.INVALID


async def sign_in_as_staff(client: httpx.AsyncClient, sink: MailSink) -> httpx.Response:
    """Ask for a staff link and use it: the answer that sets the session."""
    before = len(links(sink, STAFF_EMAIL))
    await ask(client, "/staff", STAFF_EMAIL)
    link = (await settle(sink, STAFF_EMAIL, before + 1))[-1]
    return await use_sign_in_link(client, link)


async def test_sessions_are_per_audience_and_sign_out_ends_them(
    web: Site, mail_sink: MailSink
) -> None:
    async with client_for(app_for(web)) as client:
        opened = await sign_in_as_staff(client, mail_sink)
        session = opened.cookies[STAFF.cookie]
        as_staff = _request(STAFF.home, {STAFF.cookie: session})
        assert await signed_in(as_staff, web, STAFF) == STAFF_EMAIL
        as_referrer = _request(REFERRER.home, {REFERRER.cookie: session})
        assert await signed_in(as_referrer, web, REFERRER) is None
        # Another site's form cannot sign a visitor out: it does not know the token.
        forged = await client.post("/staff/sign-out?lang=en", data={"csrf": "forged"})
        assert forged.status_code == 303 and "set-cookie" not in forged.headers
        assert await signed_in(as_staff, web, STAFF) == STAFF_EMAIL
        token = sign_out_token(as_staff, web, STAFF)
        out = await client.post("/staff/sign-out?lang=en", data={"csrf": token})
    assert out.status_code == 303 and out.headers["location"] == "/staff?lang=en"
    assert f'{STAFF.cookie}=""' in out.headers["set-cookie"]
    assert "max-age=0" in out.headers["set-cookie"].lower()
    # A copy of the cookie kept from before is worth nothing now.
    assert await signed_in(as_staff, web, STAFF) is None


async def test_an_address_removed_from_the_staff_list_loses_its_session(
    web: Site, mail_sink: MailSink
) -> None:
    async with client_for(app_for(web)) as client:
        opened = await sign_in_as_staff(client, mail_sink)
    as_staff = _request(STAFF.home, {STAFF.cookie: opened.cookies[STAFF.cookie]})
    assert await signed_in(as_staff, web, STAFF) == STAFF_EMAIL
    others = web.rules.model_copy(update={"staff": StaffRules(emails=["someone@else.example"])})
    assert await signed_in(as_staff, dataclasses.replace(web, rules=others), STAFF) is None


async def test_the_answer_does_not_wait_to_know_the_address(
    web: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether an address may sign in is looked up after the answer: the answer takes the
    same time whoever asks (a lookup that would take a second does not delay it)."""
    looked_up: list[str] = []
    release = threading.Event()

    def slow_lookup(site: Site, audience: object, email: str) -> bool:
        release.wait(10)
        looked_up.append(email)
        return False

    monkeypatch.setattr(signin, "may_sign_in", slow_lookup)
    async with client_for(app_for(web)) as client:
        known = await ask(client, "/staff", STAFF_EMAIL)
        unknown = await ask(client, "/staff", "stranger@example.com")
        assert looked_up == []  # both answered while their lookups were still running
        release.set()
    assert known.status_code == unknown.status_code == 200 and known.text == unknown.text
    deadline = time.monotonic() + 10
    while len(looked_up) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_one_address_gets_few_links_whoever_asks(web: Site, mail_sink: MailSink) -> None:
    """The per-connection rate limit does not protect a mailbox from many connections."""
    referrer = f"target-{uuid.uuid4().hex[:6]}@conseil-durand.example"
    referral_of(web.engine, referrer)
    limit, _ = LINKS_PER_ADDRESS
    async with client_for(app_for(web)) as client:
        for _ in range(limit + 3):
            assert (await ask(client, "/me", referrer)).status_code == 200
    assert len(await settle(mail_sink, referrer, limit)) == limit
    await asyncio.sleep(0.5)
    assert len(links(mail_sink, referrer)) == limit


def _request(path: str, cookies: dict[str, str]) -> Request:
    """A request to `path` carrying `cookies`, for `signed_in`."""
    cookie = "; ".join(f"{name}={value}" for name, value in cookies.items())
    return Request({"type": "http", "path": path, "headers": [(b"cookie", cookie.encode())]})


async def test_bad_input_is_answered_and_kept(web: Site) -> None:
    async with client_for(app_for(web)) as client:
        invalid = await ask(client, "/me", "not an address")
        client.cookies.delete(CSRF_COOKIE)
        no_csrf = await client.post("/me/sign-in", data={"email": STAFF_EMAIL, "lang": "en"})
    assert invalid.status_code == 422
    assert 'value="not an address"' in invalid.text and 'aria-invalid="true"' in invalid.text
    assert no_csrf.status_code == 403
    assert f'value="{STAFF_EMAIL}"' in no_csrf.text


async def test_asking_for_links_is_rate_limited(
    rules: ProgramRules, engine: Engine, mail_sink: MailSink
) -> None:
    site = site_for(rules, engine, mail_sink, limit="2/minute")
    async with client_for(app_for(site)) as client:
        answers = [await ask(client, "/me", f"x{n}@example.com") for n in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert int(answers[2].headers["retry-after"]) >= 1
    assert 'value="x2@example.com"' in answers[2].text
