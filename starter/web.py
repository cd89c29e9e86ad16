"""The intake web app: the referral form, its JSON API and the referrer's status page.

Runs in its own process (`referrals web`); it starts workflows through Temporal
and reads referrals from the system of record, and never imports the worker.
"""

from __future__ import annotations

import asyncio
import mailbox
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import Engine
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
LANGUAGES = ("fr", "en")
MAX_BODY_BYTES = 64 * 1024
CSRF_COOKIE = "referral_form"
CURRENCIES = ("EUR", "USD", "GBP", "CHF", "CAD")


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
    body = b'{"detail":"request body too large"}'
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


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


def timeline(state: ReferralState) -> list[tuple[datetime, str]]:
    """What the referrer may see: dated steps, no notes, no names, no refused actions."""
    visible = {"submitted", "contacted", "accept", "decline", "approve", "reject", "won", "lost"}
    steps: list[tuple[datetime, str]] = []
    payments = [h for h in state.history if h.action == "payment" and h.outcome == "applied"]
    for entry in state.history:
        if entry.outcome == "refused":
            continue
        if entry.action in visible or entry.action in ("cancel", "payout"):
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
) -> FastAPI:
    """The app; `maildir` (dev mode only) enables `/dev/mail`."""
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
    templates = Jinja2Templates(directory=str(TEMPLATES))
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
            products=[p for p in intake.rules.products if p.multi_tenant_cloud],
            countries=intake.countries,
            currencies=CURRENCIES,
        )
        response.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="strict", max_age=4 * 3600)
        return response

    async def start(submission: Submission) -> str:
        return await submit_referral(
            await intake.temporal(),
            intake.engine,
            intake.rules,
            submission,
            submitted_by=f"web:{submission.referrer.email}",
            key=intake.key,
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def form_page(request: Request) -> HTMLResponse:
        return render_form(request, pick_language(request))

    @app.post("/referrals", response_class=HTMLResponse, include_in_schema=False)
    async def form_post(request: Request) -> Response:
        raw = await request.form()
        form = {k: v for k, v in raw.items() if isinstance(v, str)}
        lang = form.get("lang") if form.get("lang") in LANGUAGES else pick_language(request)
        assert lang is not None
        texts = intake.texts[lang]
        values = {k: v for k, v in form.items() if k not in ("csrf", "lang")}
        if not csrf_valid(form.get("csrf"), request.cookies.get(CSRF_COOKIE), intake.key):
            return render_form(request, lang, values, problem=texts["problems"]["csrf"], status=403)
        try:
            submission = parse_submission(form_to_submission(form), intake.rules)
            referral_id = await start(submission)
        except SubmissionRefused as refused:
            errors = localized_errors(refused.errors, texts)
            return render_form(request, lang, values, errors, texts["problems"]["fix"], 422)
        except DuplicateReferral:
            errors = {"prospect.website": texts["errors"]["duplicate"]}
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
            422: {"model": ApiRefusal, "description": "invalid or ineligible submission"},
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

        not_an_object = FieldError("body", "the body must be a JSON object", "invalid_json")
        try:
            data = await request.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return refused(422, "the body must be a JSON object", [not_an_object])
        try:
            referral_id = await start(parse_submission(data, intake.rules))
        except SubmissionRefused as error:
            return refused(422, "invalid submission", error.errors)
        except DuplicateReferral as duplicate:
            message = "this prospect already has an open referral"
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


def run_web(host: str, port: int) -> None:
    import uvicorn

    dev_maildir = os.environ.get("REFERRALS_DEV_MAILDIR")
    app = create_app(maildir=Path(dev_maildir) if dev_maildir else None)
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)
