"""The intake web app: the referral form, its JSON API and the referrer's status page.

Runs in its own process (`referrals web`); it starts workflows through Temporal
and reads referrals from the system of record, and never imports the worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import mailbox
import math
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client
from temporalio.service import RPCError

from activities.email import long_date
from activities.records import load_referral
from activities.schema import open_database
from starter.client import connect
from starter.intake import (
    DuplicateReferral,
    FieldError,
    SubmissionRefused,
    parse_submission,
    submit_referral,
)
from starter.links import (
    csrf_token,
    csrf_valid,
    public_url,
    referral_from_token,
    secret_key,
    status_token,
)
from starter.program import load_program
from workflows.models import COUNTRY_NAMES, ProgramRules, ReferralState, Stage, Submission

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "web"
STATIC = TEMPLATES / "static"
LANGUAGES = ("fr", "en")
MAX_BODY_BYTES = 64 * 1024
CSRF_COOKIE = "referral_form"
CURRENCIES = ("EUR", "USD", "GBP", "CHF", "CAD")
# A form field no person sees or fills (see `form_post`); a name bots like to fill.
HONEYPOT = "subject"
RATE_LIMIT_ENV = "REFERRALS_RATE_LIMIT"
TRUSTED_PROXIES_ENV = "REFERRALS_TRUSTED_PROXIES"
DEFAULT_RATE_LIMIT = "10/minute"


def _load_texts() -> dict[str, dict[str, Any]]:
    return {
        lang: yaml.safe_load((TEMPLATES / "messages" / f"{lang}.yaml").read_text("utf-8"))
        for lang in LANGUAGES
    }


def _country_names() -> list[tuple[str, str]]:
    return sorted(COUNTRY_NAMES.items(), key=lambda country: country[1])


class ReferralCreated(BaseModel):
    referral_id: str
    status_url: str


class ApiError(BaseModel):
    field: str
    code: str
    message: str


class ApiRefusal(BaseModel):
    detail: str
    errors: list[ApiError] = []


@dataclass
class Intake:
    """What the routes share: rules, database, secret, and the (lazily connected) client."""

    rules: ProgramRules
    engine: Engine
    key: str
    maildir: Path | None
    client: Client | None = None
    texts: dict[str, dict[str, Any]] = field(default_factory=_load_texts)
    countries: list[tuple[str, str]] = field(default_factory=_country_names)

    async def temporal(self) -> Client:
        if self.client is None:
            self.client = await connect()
        return self.client


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413), whether or not they say their length.

    The body is read here, up to the limit, before the app sees it: a route's own body
    parsing never has to tell "too large" from "malformed"."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _too_large(send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send) -> None:
    refusal = ApiRefusal(
        detail="request body too large",
        errors=[
            ApiError(
                field="body",
                code="too_large",
                message=f"the request body must not exceed {MAX_BODY_BYTES} bytes",
            )
        ],
    )
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": refusal.model_dump_json().encode()})


# --- abuse: rate limits, client addresses, security headers, hostile text ---------------------


_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_RATE_UNITS |= {"h": 3600, "hr": 3600, "hour": 3600, "d": 86400, "day": 86400}


@dataclass(frozen=True)
class RateLimit:
    """`limit` submissions per `window` seconds, written as operators write rates: `10/minute`,
    `100/hour`, `3/10s`, or `off`."""

    limit: int
    window: float

    @classmethod
    def parse(cls, text: str) -> RateLimit | None:
        """None for `off`; a typo is an error at start-up, never a silently missing limit."""
        spec = text.strip().lower()
        if spec in ("off", "none", "unlimited"):
            return None
        found = re.fullmatch(r"(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?", spec)
        unit = _RATE_UNITS.get(found.group(3)) if found else None
        if found is None or unit is None or int(found.group(1)) < 1:
            raise ValueError(
                f"{RATE_LIMIT_ENV}: {text!r} is not a rate like 10/minute, 100/hour, 3/10s or off"
            )
        return cls(int(found.group(1)), int(found.group(2) or 1) * unit)


class RateLimiter:
    """A sliding-window log per client: at most `limit` attempts in any `window` seconds.

    In process, so every worker process of the web app has its own budget (run one process,
    or divide the limit). A lock, not the event loop, guards the log, so threads sharing an
    app are safe too. A refused attempt is not logged: a client that keeps hammering is let
    back in as soon as its oldest counted attempt leaves the window, not pushed back forever.
    """

    def __init__(
        self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._sweep_above = 1024
        self._swept_at = clock()

    @classmethod
    def from_setting(cls, setting: str) -> RateLimiter | None:
        rate = RateLimit.parse(setting)
        return cls(rate.limit, rate.window) if rate else None

    def hit(self, client: str) -> float | None:
        """Count one attempt by `client`: None if allowed, else the seconds until one is."""
        now = self._clock()
        with self._lock:
            hits = self._hits.setdefault(client, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return hits[0] + self.window - now
            hits.append(now)
            if len(self._hits) > self._sweep_above or now - self._swept_at >= self.window:
                self._sweep(now)
            return None

    def _sweep(self, now: float) -> None:
        """Forget clients with nothing left in the window, so memory follows the clients of
        the last window rather than every address ever seen. At most once a window, or when
        the table doubles: the cost per attempt stays constant on average."""
        stale = [c for c, hits in self._hits.items() if not hits or hits[-1] <= now - self.window]
        for client in stale:
            del self._hits[client]
        self._sweep_above = max(1024, 2 * len(self._hits))
        self._swept_at = now


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(setting: str | Iterable[str] | None) -> tuple[Network, ...]:
    """`192.0.2.10, 2001:db8::/32` (addresses or CIDR ranges); a typo fails at start-up."""
    if setting is None:
        return ()
    items = setting.split(",") if isinstance(setting, str) else setting
    try:
        return tuple(ipaddress.ip_network(i.strip(), strict=False) for i in items if i.strip())
    except ValueError as error:
        raise ValueError(f"{TRUSTED_PROXIES_ENV}: {error}") from error


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in network for network in proxies)


def client_address(scope: Scope, proxies: tuple[Network, ...] = ()) -> str:
    """Who is asking, for rate limiting: the peer, unless the peer is a trusted proxy.

    Behind trusted proxies, `X-Forwarded-For` is read from the right: each proxy appends the
    address it received from, so the first untrusted address from the right is the one a
    trusted proxy saw; anything left of it was written by the client and may be forged.
    An IPv6 client counts as its /64, which one subscriber typically holds whole.
    """
    peer = scope.get("client")
    address = str(peer[0]) if peer else "unknown"
    if proxies and _trusted(address, proxies):
        forwarded = [
            value.decode("latin-1")
            for name, value in scope.get("headers") or []
            if name.lower() == b"x-forwarded-for"
        ]
        hops = [hop.strip() for hop in ",".join(forwarded).split(",") if hop.strip()]
        for hop in reversed(hops):
            address = hop
            if not _trusted(hop, proxies):
                break
    ip = _ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip) if ip is not None else address


# No script anywhere; style only from our own sheet; nothing may frame the pages.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
# The dev mailbox shows emails as they are sent, inline styles and all, in a sandboxed
# iframe (which inherits this policy); still no script.
DEV_MAIL_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


class SecurityHeaders:
    """Every response, error pages and 413s included, says: run no script but ours (there is
    none), load nothing from elsewhere, never be framed, leak no referrer (status links are
    secrets), and do not guess content types."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dev_mail = str(scope.get("path", "")).startswith("/dev/mail")
        policy = DEV_MAIL_CONTENT_SECURITY_POLICY if dev_mail else CONTENT_SECURITY_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = policy
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
                headers["X-Frame-Options"] = "DENY"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def duplicate_message(duplicate: DuplicateReferral, texts: dict[str, Any], lang: str) -> str:
    """Until when the prospect is protected, or that it is under review; never by whom."""
    if duplicate.protected_until is None:
        return str(texts["errors"]["duplicate"])
    day = long_date(duplicate.protected_until.date(), lang)
    return str(texts["errors"]["duplicate_protected"]).replace("{date}", day)


def pick_language(request: Request) -> str:
    """`?lang=` first, then the browser's Accept-Language, then French."""
    asked = request.query_params.get("lang")
    if asked in LANGUAGES:
        return asked
    ranked = []
    for part in request.headers.get("accept-language", "").split(","):
        tag, _, q = part.strip().partition(";q=")
        try:
            weight = float(q) if q else 1.0
        except ValueError:
            continue
        ranked.append((weight, tag.split("-")[0].lower()))
    for _, tag in sorted(ranked, reverse=True):
        if tag in LANGUAGES:
            return tag
    return "fr"


def form_to_submission(form: dict[str, str]) -> dict[str, Any]:
    """`prospect.website=…` form fields to the nested submission; blanks mean absent."""
    data: dict[str, Any] = {"referrer": {}, "prospect": {}, "contact": {}, "opportunity": {}}
    for name, value in form.items():
        section, _, key = name.partition(".")
        if section in data and key and value.strip():
            data[section][key] = value
    data["consent"] = form.get("consent") in ("on", "true", "yes", "1")
    return data


def localized_errors(errors: list[FieldError], texts: dict[str, Any]) -> dict[str, str]:
    """One message per field, in the visitor's language."""
    messages = texts["errors"]
    result: dict[str, str] = {}
    for error in errors:
        if error.field in result:
            continue
        if error.code in messages:
            result[error.field] = messages[error.code]
        elif error.code in ("missing", "string_too_short"):
            result[error.field] = messages["required"]
        else:
            result[error.field] = messages["fields"].get(error.field, messages["invalid"])
    return result


def percent(rate: Decimal, lang: str) -> str:
    """`10 %` in French, `10%` in English; `7.5` becomes `7,5` in French."""
    text = f"{rate * 100:f}".rstrip("0").rstrip(".")
    return f"{text.replace('.', ',')}\u202f%" if lang == "fr" else f"{text}%"


def timeline(state: ReferralState) -> list[tuple[datetime, str]]:
    """What the referrer may see: dated steps, no notes, no names, no refused actions."""
    visible = {
        "submitted", "contacted", "accept", "decline", "approve", "reject", "won", "lost",
        "cancel", "payout", "extend", "expire", "refund",
    }  # fmt: skip
    steps: list[tuple[datetime, str]] = []
    payments = [h for h in state.history if h.action == "payment" and h.outcome == "applied"]
    for entry in state.history:
        if entry.outcome == "refused":
            continue
        if entry.action in visible:
            steps.append((entry.at, entry.action))
    if state.stage in (Stage.COMMISSION_PAYABLE, Stage.COMMISSION_PAID) and payments:
        steps.append((payments[-1].at, "commission_payable"))
    return sorted(steps, key=lambda step: step[0])


def create_app(
    *,
    rules: ProgramRules | None = None,
    engine: Engine | None = None,
    client: Client | None = None,
    key: str | None = None,
    maildir: Path | None = None,
    rate_limit: str | RateLimiter | None = None,
    trusted_proxies: str | Iterable[str] | None = None,
) -> FastAPI:
    """The app; `maildir` (dev mode only) enables `/dev/mail`.

    `rate_limit` caps the public POST routes per client address (`10/minute`, `off`, or a
    `RateLimiter`); when not given, `REFERRALS_RATE_LIMIT` decides and, unset, there is no cap
    in process: the served app (`served_app`) applies the 10/minute default, while in-process
    callers (tests, an embedding app behind its own limits) choose theirs. `trusted_proxies`
    (default `REFERRALS_TRUSTED_PROXIES`, else none) are the peers whose `X-Forwarded-For`
    is believed.
    """
    if rate_limit is None:
        rate_limit = os.environ.get(RATE_LIMIT_ENV) or "off"
    limiter = RateLimiter.from_setting(rate_limit) if isinstance(rate_limit, str) else rate_limit
    if trusted_proxies is None:
        trusted_proxies = os.environ.get(TRUSTED_PROXIES_ENV)
    proxies = parse_networks(trusted_proxies)
    intake = Intake(
        rules=rules or load_program(),
        engine=engine or open_database(),
        key=key or secret_key(),
        maildir=maildir,
        client=client,
    )
    app = FastAPI(
        title="Referral Desk intake",
        version="1",
        description="Submit opportunity referrals; follow them through a signed status link.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(SecurityHeaders)  # added last: outermost, so it also marks 413s
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    templates = Jinja2Templates(directory=str(TEMPLATES))
    # In the style sheet's URL, so a browser never keeps an old one after an upgrade.
    css = (STATIC / "site.css").read_bytes()
    templates.env.globals["asset_version"] = hashlib.sha256(css).hexdigest()[:12]
    zone = ZoneInfo(intake.rules.calendar.timezone)

    def local_date(moment: datetime | None, lang: str) -> str:
        return long_date(moment.astimezone(zone).date(), lang) if moment else ""

    def deadline_day(moment: datetime, lang: str) -> str:
        """Deadlines fall at 00:00 local: the last day allowed is the one before."""
        return local_date(moment - timedelta(seconds=1), lang)

    templates.env.filters.update(local_date=local_date, deadline_day=deadline_day)

    def render(
        request: Request, name: str, lang: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            name,
            {"lang": lang, "t": intake.texts[lang], "rules": intake.rules, **context},
            status_code=status,
        )

    def render_form(
        request: Request,
        lang: str,
        values: dict[str, str] | None = None,
        errors: dict[str, str] | None = None,
        problem: str | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        nonce = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(16)
        response = render(
            request,
            "form.html",
            lang,
            status,
            values=values or {"referrer.language": lang},
            errors=errors or {},
            problem=problem,
            csrf=csrf_token(nonce, intake.key),
            products=[
                (p, percent(intake.rules.commission_for(p.id).rate, lang))
                for p in intake.rules.products
                if p.multi_tenant_cloud
            ],
            countries=intake.countries,
            currencies=CURRENCIES,
            honeypot=HONEYPOT,
        )
        response.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="strict", max_age=4 * 3600)
        return response

    def over_limit(request: Request) -> dict[str, str] | None:
        """Count this attempt; over the limit, the `Retry-After` header to answer with.

        Every attempt counts, refused or not: a bot's invalid posts cost as much as valid
        ones, and a person rarely needs more than a couple of tries a minute."""
        if limiter is None:
            return None
        wait = limiter.hit(client_address(request.scope, proxies))
        return None if wait is None else {"Retry-After": str(max(1, math.ceil(wait)))}

    @app.exception_handler(StarletteHTTPException)
    async def http_refusal(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Framework refusals (404, 405, a malformed form…) in the one documented shape."""
        body = ApiRefusal(detail=str(error.detail), errors=[])
        return JSONResponse(body.model_dump(), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            ApiError(
                field=".".join(str(part) for part in e.get("loc", ())) or "request",
                code=str(e.get("type", "invalid")),
                message=str(e.get("msg", "invalid value")),
            )
            for e in error.errors()
        ]
        body = ApiRefusal(detail="invalid request", errors=errors)
        return JSONResponse(body.model_dump(), status_code=422)

    async def start(submission: Submission, consent_language: str | None = None) -> str:
        """`consent_language`: the language the consent statement was shown in (the form's
        page); the API's callers accept it in the referrer's language."""
        return await submit_referral(
            await intake.temporal(),
            intake.engine,
            intake.rules,
            submission,
            submitted_by=f"web:{submission.referrer.email}",
            key=intake.key,
            consent_language=consent_language,
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def form_page(request: Request) -> HTMLResponse:
        return render_form(request, pick_language(request))

    @app.post("/referrals", response_class=HTMLResponse, include_in_schema=False)
    async def form_post(request: Request) -> Response:
        """The form post. A filled honeypot (a field hidden from people, see form.html) gets
        the form back with a generic "could not be sent" and no reason, and nothing starts: a
        bot learns nothing it could adapt to, and a person whose browser filled the hidden
        field by mistake still has everything typed and can send it again (the honeypot comes
        back empty)."""
        raw = await request.form()
        form = {k: v for k, v in raw.items() if isinstance(v, str)}
        lang = form.get("lang") if form.get("lang") in LANGUAGES else pick_language(request)
        assert lang is not None
        texts = intake.texts[lang]
        values = {k: v for k, v in form.items() if k not in ("csrf", "lang", HONEYPOT)}
        retry = over_limit(request)
        if retry is not None:
            problem = texts["problems"]["rate_limited"]
            response = render_form(request, lang, values, problem=problem, status=429)
            response.headers.update(retry)
            return response
        if not csrf_valid(form.get("csrf"), request.cookies.get(CSRF_COOKIE), intake.key):
            return render_form(request, lang, values, problem=texts["problems"]["csrf"], status=403)
        if form.get(HONEYPOT, "").strip():
            return render_form(
                request, lang, values, problem=texts["problems"]["not_sent"], status=400
            )
        try:
            submission = parse_submission(form_to_submission(form), intake.rules)
            referral_id = await start(submission, consent_language=lang)
        except SubmissionRefused as refused:
            errors = localized_errors(refused.errors, texts)
            return render_form(request, lang, values, errors, texts["problems"]["fix"], 422)
        except DuplicateReferral as duplicate:
            errors = {"prospect.website": duplicate_message(duplicate, texts, lang)}
            return render_form(request, lang, values, errors, texts["problems"]["fix"], 409)
        except (RuntimeError, RPCError, OSError):
            problem = texts["problems"]["unavailable"]
            return render_form(request, lang, values, problem=problem, status=503)
        token = status_token(referral_id, intake.key)
        return RedirectResponse(f"/confirmation/{token}?lang={lang}", status_code=303)

    async def referral_for(token: str) -> ReferralState | None:
        referral_id = referral_from_token(token, intake.key)
        if referral_id is None:
            return None
        return await asyncio.to_thread(load_referral, intake.engine, referral_id)

    async def referral_page(
        request: Request,
        token: str,
        template: str,
        extra: Callable[[ReferralState], dict[str, Any]],
    ) -> Response:
        """A page about one referral, in the referrer's language unless `?lang=` says else."""
        state = await referral_for(token)
        if state is None:
            return render(request, "not_found.html", pick_language(request), 404)
        lang = pick_language(request) if "lang" in request.query_params else state.referrer.language
        return render(request, template, lang, state=state, **extra(state))

    @app.get("/confirmation/{token}", response_class=HTMLResponse, include_in_schema=False)
    async def confirmation(request: Request, token: str) -> Response:
        link = f"{public_url()}/status/{token}"
        return await referral_page(
            request, token, "confirmation.html", lambda _: {"status_link": link}
        )

    @app.get("/status/{token}", response_class=HTMLResponse, include_in_schema=False)
    async def status_page(request: Request, token: str) -> Response:
        return await referral_page(
            request, token, "status.html", lambda state: {"steps": timeline(state)}
        )

    @app.post(
        "/api/referrals",
        status_code=201,
        response_model=ReferralCreated,
        responses={
            409: {"model": ApiRefusal, "description": "the prospect already has an open referral"},
            413: {"model": ApiRefusal, "description": "request body over 64 KiB"},
            422: {"model": ApiRefusal, "description": "invalid or ineligible submission"},
            429: {
                "model": ApiRefusal,
                "description": "too many submissions from this address; see Retry-After",
                "headers": {
                    "Retry-After": {
                        "description": "seconds to wait before submitting again",
                        "schema": {"type": "integer"},
                    }
                },
            },
            503: {"model": ApiRefusal, "description": "Temporal unreachable; try again shortly"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}}
                },
            }
        },
        summary="Submit a referral",
    )
    async def api_submit(request: Request) -> Any:
        """Body: the submission of DESIGN.md section 4 (the `Submission` schema)."""

        def refused(status: int, detail: str, errors: list[FieldError]) -> JSONResponse:
            body = ApiRefusal(
                detail=detail,
                errors=[ApiError(field=e.field, code=e.code, message=e.message) for e in errors],
            )
            return JSONResponse(body.model_dump(), status_code=status)

        retry = over_limit(request)
        if retry is not None:
            wait = f"try again in {retry['Retry-After']} seconds"
            limited = refused(
                429,
                f"too many submissions from this address; {wait}",
                [FieldError("body", f"rate limit reached; {wait}", "rate_limited")],
            )
            limited.headers.update(retry)
            return limited
        not_an_object = FieldError("body", "the body must be a JSON object", "invalid_json")
        try:
            data = await request.json()
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
            data = None
        if not isinstance(data, dict):
            return refused(422, "the body must be a JSON object", [not_an_object])
        try:
            referral_id = await start(parse_submission(data, intake.rules))
        except SubmissionRefused as error:
            return refused(422, "invalid submission", error.errors)
        except DuplicateReferral as duplicate:
            message = duplicate_message(duplicate, intake.texts["en"], "en")
            return refused(
                409,
                f"prospect {duplicate.domain} already has an open referral",
                [FieldError("prospect.website", message, "duplicate")],
            )
        except (RuntimeError, RPCError, OSError):
            return refused(503, "the referral service is unavailable; try again shortly", [])
        token = status_token(referral_id, intake.key)
        return ReferralCreated(referral_id=referral_id, status_url=f"{public_url()}/status/{token}")

    @app.get("/healthz", summary="Health: Temporal and the database")
    async def healthz() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            client = await intake.temporal()
            await client.workflow_service.get_system_info(
                GetSystemInfoRequest(), timeout=timedelta(seconds=3)
            )
            checks["temporal"] = "ok"
        except Exception as error:  # noqa: BLE001 - any failure is "unavailable"
            checks["temporal"] = f"unavailable: {type(error).__name__}"
        try:
            with intake.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as error:  # noqa: BLE001
            checks["database"] = f"unavailable: {type(error).__name__}"
        healthy = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", **checks},
            status_code=200 if healthy else 503,
        )

    if maildir is not None:
        add_dev_mail_routes(app, templates, maildir)

    _document_submission(app)
    return app


def _document_submission(app: FastAPI) -> None:
    """The API reads its body itself (so every refusal has our shape); publish the body's
    real schema in openapi.json all the same."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        submission = Submission.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(submission.pop("$defs", {}))
        components["Submission"] = submission
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- dev mode: what the SMTP sink caught ------------------------------------------------------


def _read_mail(maildir: Path) -> list[tuple[str, EmailMessage]]:
    box = mailbox.Maildir(maildir, create=False)
    found = []
    for key in box.keys():
        parsed = message_from_bytes(box.get_bytes(key), policy=policy.default)
        if isinstance(parsed, EmailMessage):
            found.append((key, parsed))

    def sent_at(item: tuple[str, EmailMessage]) -> tuple[datetime, tuple[int, ...]]:
        """Date header, then the delivery time in the Maildir key (finer than a second)."""
        try:
            date = parsedate_to_datetime(str(item[1]["Date"]))
        except (TypeError, ValueError):
            date = datetime.min
        if date.tzinfo is None:  # "-0000" dates parse naive; they are UTC
            date = date.replace(tzinfo=UTC)
        delivered = re.match(r"(\d+)\.M(\d+)P\d+Q(\d+)", item[0])
        return date, tuple(int(n) for n in delivered.groups()) if delivered else ()

    return sorted(found, key=sent_at, reverse=True)


def add_dev_mail_routes(app: FastAPI, templates: Jinja2Templates, maildir: Path) -> None:
    @app.get("/dev/mail", response_class=HTMLResponse, include_in_schema=False)
    async def mail_list(request: Request) -> HTMLResponse:
        messages = _read_mail(maildir) if (maildir / "new").exists() else []
        return templates.TemplateResponse(
            request, "dev_mail.html", {"lang": "en", "messages": messages, "message": None}
        )

    @app.get("/dev/mail/{key}", response_class=HTMLResponse, include_in_schema=False)
    async def mail_message(request: Request, key: str) -> HTMLResponse:
        found = dict(_read_mail(maildir)) if (maildir / "new").exists() else {}
        message = found.get(key)
        if message is None:
            return HTMLResponse("no such message", status_code=404)
        text_part = message.get_body(("plain",))
        html_part = message.get_body(("html",))
        return templates.TemplateResponse(
            request,
            "dev_mail.html",
            {
                "lang": "en",
                "messages": None,
                "message": message,
                "text": text_part.get_content() if text_part else "",
                "html": html_part.get_content() if html_part else "",
            },
        )


def served_app() -> FastAPI:
    """The app as `referrals web` serves it: configured by the environment, and limited to
    10 submissions a minute per client unless `REFERRALS_RATE_LIMIT` says otherwise."""
    dev_maildir = os.environ.get("REFERRALS_DEV_MAILDIR")
    return create_app(
        maildir=Path(dev_maildir) if dev_maildir else None,
        rate_limit=os.environ.get(RATE_LIMIT_ENV) or DEFAULT_RATE_LIMIT,
    )


def run_web(host: str, port: int) -> None:
    import uvicorn

    # proxy_headers off: uvicorn must not rewrite the peer address from X-Forwarded-For;
    # the app reads that header itself, and only from REFERRALS_TRUSTED_PROXIES.
    uvicorn.run(served_app(), host=host, port=port, log_level="info", proxy_headers=False)
