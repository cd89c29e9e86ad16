"""Rate limits on the public POST routes, per client address: the limiter itself (a fake clock,
threads), then the app in process against the real dev server, as a client, behind a proxy
and configured from the environment.

Client and proxy addresses are documentation ranges (RFC 5737, RFC 3849): they only ever
appear in ASGI scopes here, no packet goes anywhere.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from core.settings import Settings
from devstack.factories import submission_data
from devstack.settings import SECRET
from starter.web import create_app, intake, served_app
from starter.web.security import (
    RATE_LIMIT_ENV,
    TRUSTED_PROXIES_ENV,
    RateLimit,
    RateLimiter,
    client_address,
    parse_networks,
)
from tests.conftest import Live, in_process
from tests.web.test_web import (
    FormState,
    assert_kept,
    assert_problem,
    claim_of,
    csrf_of,
    form_fields,
    open_form,
    translated,
)
from workflows.models.program import ProgramRules

KEY = SECRET
PROXY = "192.0.2.10"
CLIENT_A, CLIENT_B, OTHER = "198.51.100.1", "198.51.100.2", "203.0.113.50"


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the limiter ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "limit", "window"),
    [
        ("10/minute", 10, 60),
        ("10/min", 10, 60),
        ("100/hour", 100, 3600),
        ("3/10s", 3, 10),
        ("5 / 30 seconds", 5, 30),
        ("1/day", 1, 86400),
    ],
)
def test_rate_settings(setting: str, limit: int, window: float) -> None:
    assert RateLimit.parse(setting) == RateLimit(limit, window)


@pytest.mark.parametrize("setting", ["10", "ten/minute", "0/minute", "10/fortnight", ""])
def test_a_wrong_rate_setting_is_an_error_naming_the_variable(setting: str) -> None:
    with pytest.raises(ValueError, match=RATE_LIMIT_ENV):
        RateLimit.parse(setting)


def test_off_means_no_limit() -> None:
    assert RateLimit.parse("off") is None and RateLimiter.from_setting(" OFF ") is None


def test_limit_then_wait_then_again() -> None:
    clock = Clock()
    limiter = RateLimiter(3, 60, clock=clock)
    for second in (0, 10, 20):
        clock.now = 1000 + second
        assert limiter.hit("a") is None
    clock.now = 1030
    assert limiter.hit("a") == pytest.approx(30)  # the first attempt leaves the window at 1060
    assert limiter.hit("b") is None  # other clients have their own budget
    clock.now = 1059.5
    assert limiter.hit("a") == pytest.approx(0.5)  # refused attempts were not counted
    clock.now = 1060
    assert limiter.hit("a") is None  # sliding: one slot freed...
    assert limiter.hit("a") == pytest.approx(10)  # ...only one, the next frees at 1070
    clock.now = 1200
    assert all(limiter.hit("a") is None for _ in range(3))  # a whole window later: all three


def test_concurrent_hits_from_threads_never_exceed_the_limit() -> None:
    limiter = RateLimiter(100, 60)
    allowed: list[bool] = []
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        allowed.extend(limiter.hit("a") is None for _ in range(50))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert allowed.count(True) == 100 and len(allowed) == 400


def test_memory_follows_the_active_clients() -> None:
    clock = Clock()
    limiter = RateLimiter(1, 60, clock=clock)
    for n in range(5000):
        limiter.hit(f"client-{n}")
    clock.now += 61
    for n in range(5000, 5100):
        limiter.hit(f"client-{n}")
    assert len(limiter._hits) <= 2048  # the idle thousands were forgotten


# --- who the client is ---------------------------------------------------------------------------


def scope(peer: str, forwarded: str | None = None) -> dict[str, Any]:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded is not None else []
    return {"type": "http", "client": (peer, 4000), "headers": headers}


TRUSTED = parse_networks("192.0.2.0/28, 2001:db8:ffff::1")


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        (CLIENT_A, None, CLIENT_A),
        (CLIENT_A, CLIENT_B, CLIENT_A),  # an untrusted peer's header is ignored
        (PROXY, CLIENT_A, CLIENT_A),
        (PROXY, f"{OTHER}, {CLIENT_A}", CLIENT_A),  # what the client wrote itself is ignored
        (PROXY, f"{CLIENT_A}, 192.0.2.11", CLIENT_A),  # through two trusted proxies
        (PROXY, None, PROXY),
        ("2001:db8:ffff::1", CLIENT_B, CLIENT_B),
        ("2001:db8:1:2::1", None, "2001:db8:1:2::/64"),  # one IPv6 subscriber, one budget
        ("::ffff:198.51.100.1", None, CLIENT_A),
        ("192.0.2.200", CLIENT_B, "192.0.2.200"),  # outside the trusted range
    ],
)
def test_client_address(peer: str, forwarded: str | None, client: str) -> None:
    assert client_address(scope(peer, forwarded), TRUSTED) == client


def test_no_trusted_proxy_means_no_forwarded_header_is_believed() -> None:
    assert client_address(scope(PROXY, CLIENT_A)) == PROXY


def test_a_wrong_proxy_setting_is_an_error_naming_the_variable() -> None:
    with pytest.raises(ValueError, match=TRUSTED_PROXIES_ENV):
        parse_networks("192.0.2.0/24, not-an-address")


# --- the app -------------------------------------------------------------------------------------


def make_app(
    live: Live, rules: ProgramRules, settings: Settings | None = None, **options: Any
) -> FastAPI:
    return create_app(
        settings, rules=rules, engine=live.engine, client=live.client, key=KEY, **options
    )


def client(app: FastAPI, peer: str = CLIENT_A) -> httpx.AsyncClient:
    return in_process(app, peer=peer)


def assert_limited(response: httpx.Response, *, window: float = 60) -> None:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= window


def assert_limited_api(response: httpx.Response, *, window: float = 60) -> None:
    assert_limited(response, window=window)
    body = response.json()
    assert set(body) == {"detail", "errors"} and "too many" in body["detail"]
    [error] = body["errors"]
    assert set(error) == {"field", "code", "message"}
    assert error["field"] == "body" and error["code"] == "rate_limited"
    assert f"{response.headers['retry-after']} seconds" in error["message"]


@pytest_asyncio.fixture
async def three_a_minute(live: Live, rules: ProgramRules) -> AsyncIterator[FastAPI]:
    yield make_app(live, rules, rate_limit="3/minute")


async def test_api_429_after_the_limit(three_a_minute: FastAPI) -> None:
    """Every attempt counts, valid or not: three refusals use up the budget."""
    async with client(three_a_minute) as web, client(three_a_minute, CLIENT_B) as other:
        for _ in range(3):
            assert (await web.post("/api/referrals", json={})).status_code == 422
        assert_limited_api(await web.post("/api/referrals", json={}))
        assert_limited_api(await web.post("/api/referrals", content=b"not even json"))
        assert (await other.post("/api/referrals", json={})).status_code == 422
        # Reading is never limited.
        assert (await web.get("/")).status_code == 200
        assert (await web.get("/healthz")).status_code == 200


async def test_the_form_and_the_api_share_one_budget(three_a_minute: FastAPI) -> None:
    async with client(three_a_minute) as web:
        token = await open_form(web)
        for _ in range(2):
            assert (await web.post("/api/referrals", json={})).status_code == 422
        page = await web.post("/referrals", data={"csrf": token, "lang": "en"})
        assert page.status_code == 422
        assert_limited_api(await web.post("/api/referrals", json={}))


async def test_the_window_resets(live: Live, rules: ProgramRules) -> None:
    clock = Clock()
    app = make_app(live, rules, rate_limit=RateLimiter(2, 60, clock=clock))
    async with client(app) as web:
        for _ in range(2):
            assert (await web.post("/api/referrals", json={})).status_code == 422
        clock.now += 45
        limited = await web.post("/api/referrals", json={})
        assert_limited_api(limited)
        assert limited.headers["retry-after"] == "15"
        clock.now += 15
        assert (await web.post("/api/referrals", json={})).status_code == 422
        assert (await web.post("/api/referrals", json={})).status_code == 422
        assert_limited_api(await web.post("/api/referrals", json={}))


@pytest.mark.parametrize("lang", ["fr", "en"])
async def test_form_over_the_limit_keeps_what_was_typed(
    live: Live, rules: ProgramRules, lang: str
) -> None:
    clock = Clock()
    app = make_app(live, rules, rate_limit=RateLimiter(1, 60, clock=clock))
    fields = form_fields()
    async with client(app) as web:
        token = await open_form(web)
        incomplete = {k: v for k, v in fields.items() if k != "consent"}
        first = await web.post("/referrals", data={**incomplete, "csrf": token, "lang": lang})
        assert first.status_code == 422
        page = await web.post("/referrals", data={**fields, "csrf": token, "lang": lang})
        assert_limited(page)
        assert page.headers["content-type"].startswith("text/html")
        too_many = (
            "Too many referrals were sent from your connection in a short time. What you typed "
            "is kept; please wait a moment, then send it again."
        )
        assert_problem(page.text, translated(lang, too_many))
        assert_kept(page.text, fields)
        assert claim_of(live, fields["prospect.website"]) is None
        # After the wait, the kept form (with its fresh token) goes through as it is.
        clock.now += int(page.headers["retry-after"])
        again = await web.post("/referrals", data=FormState(page.text).values)
        assert again.status_code == 303, again.text
        assert csrf_of(page.text)
    assert claim_of(live, fields["prospect.website"]) is not None


async def test_forwarded_for_is_believed_only_from_a_trusted_proxy(
    live: Live, rules: ProgramRules
) -> None:
    app = make_app(live, rules, rate_limit="2/minute", trusted_proxies="192.0.2.0/28")

    async def post(web: httpx.AsyncClient, forwarded: str | None = None) -> httpx.Response:
        headers = {"x-forwarded-for": forwarded} if forwarded else {}
        return await web.post("/api/referrals", json={}, headers=headers)

    async with client(app, PROXY) as proxy, client(app, OTHER) as direct:
        # Two clients behind the proxy: a budget each.
        for _ in range(2):
            assert (await post(proxy, CLIENT_A)).status_code == 422
            assert (await post(proxy, CLIENT_B)).status_code == 422
        assert_limited_api(await post(proxy, CLIENT_A))
        # Forging the start of the header does not buy a new budget: the proxy appended A.
        assert_limited_api(await post(proxy, f"{OTHER}, {CLIENT_A}"))
        # A client that is not a proxy cannot pick its own address by a header.
        for n in range(2):
            assert (await post(direct, f"198.51.100.{100 + n}")).status_code == 422
        assert_limited_api(await post(direct, "198.51.100.199"))


async def test_configured_from_the_environment(live: Live, rules: ProgramRules) -> None:
    environment = {RATE_LIMIT_ENV: "2/minute", TRUSTED_PROXIES_ENV: PROXY}
    app = make_app(live, rules, Settings.from_env(environment))
    async with client(app, PROXY) as proxy:
        for _ in range(2):
            response = await proxy.post(
                "/api/referrals", json={}, headers={"x-forwarded-for": CLIENT_A}
            )
            assert response.status_code == 422
        limited = await proxy.post("/api/referrals", json={}, headers={"x-forwarded-for": CLIENT_A})
        assert_limited_api(limited)
        other = await proxy.post("/api/referrals", json={}, headers={"x-forwarded-for": CLIENT_B})
        assert other.status_code == 422
    with pytest.raises(ValueError, match=RATE_LIMIT_ENV):
        make_app(live, rules, Settings.from_env({RATE_LIMIT_ENV: "ten a minute"}))


async def test_in_process_apps_are_unlimited_unless_asked(live: Live, rules: ProgramRules) -> None:
    """What the other test modules rely on: `create_app` without a limit and without the
    variable sets none (the served app has its default, below)."""
    async with client(make_app(live, rules)) as web:
        for _ in range(25):
            assert (await web.post("/api/referrals", json={})).status_code == 422


async def test_the_served_app_allows_ten_a_minute_by_default(live: Live) -> None:
    environment = {
        **os.environ,
        "REFERRALS_DATABASE_URL": live.database_url,
        "TEMPORAL_ADDRESS": live.address,
    }
    async with client(served_app(Settings.from_env(environment))) as web:
        for _ in range(10):
            assert (await web.post("/api/referrals", json={})).status_code == 422
        assert_limited_api(await web.post("/api/referrals", json={}))


async def test_one_referrer_address_gets_few_acknowledgements_whoever_sends(
    live: Live, rules: ProgramRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each referral emails its referrer: past a few an hour for one address, from however
    many connections, the form refuses rather than flood that mailbox."""
    monkeypatch.setattr(intake, "ACKNOWLEDGEMENTS_PER_ADDRESS", (3, 3600))
    app = make_app(live, rules, rate_limit="1000/minute")
    target = f"victim-{uuid.uuid4().hex[:6]}@example.com"

    def body(email: str) -> dict[str, Any]:
        site = f"https://www.flood-{uuid.uuid4().hex[:8]}.example/"
        return submission_data(**{"prospect.website": site, "referrer.email": email})

    answers = []
    for peer in ("198.51.100.10", "198.51.100.11", "198.51.100.12", "198.51.100.13"):
        async with client(app, peer) as web:
            answers.append(await web.post("/api/referrals", json=body(target)))
    assert [a.status_code for a in answers] == [201, 201, 201, 429]
    [error] = answers[-1].json()["errors"]
    assert (error["field"], error["code"]) == ("referrer.email", "rate_limited")
    assert 1 <= int(answers[-1].headers["retry-after"]) <= 3600
    async with client(app, "198.51.100.14") as web:
        other = await web.post("/api/referrals", json=body(f"other-{target}"))
        assert other.status_code == 201
        token = await open_form(web)
        form = {**form_fields(**{"referrer.email": target}), "csrf": token, "lang": "en"}
        page = await web.post("/referrals", data=form)
    assert page.status_code == 429
    assert "Too many referrals were sent for this email address" in page.text
    assert 'value="' + target + '"' in page.text  # what was typed is kept
