"""The web app, one router per audience: the intake form and status pages (`intake`), the
referrer portal (`portal`), the program dashboard (`staff`), sign-in for the last two
(`signin`); `probes` for the orchestrator and `devmail` for the dev stack. `security` is
shared by all of them, `site` holds what every page needs and `deps` hands it to routes.

Runs in its own process (`referrals web`); it starts workflows through Temporal and reads
referrals from the system of record, and never imports the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.client import Client

from activities.receipts import configure as configure_receipts
from activities.schema import open_database
from core.links import Keys
from core.logs import configure_logging
from core.program import load_program
from core.settings import Need, Settings, SmtpSettings, loopback
from starter.web import devmail, probes
from starter.web.intake import add_intake_routes
from starter.web.metrics import RequestMetrics, WebMetrics
from starter.web.portal import add_portal_routes
from starter.web.receipts import add_receipt_routes
from starter.web.security import (
    DEFAULT_RATE_LIMIT,
    MAX_BODY_BYTES,
    ApiError,
    ApiRefusal,
    BodyLimit,
    RateLimiter,
    SecurityHeaders,
    parse_networks,
)
from starter.web.site import STATIC, Site
from starter.web.staff import add_staff_routes
from workflows.models.program import ProgramRules
from workflows.models.referral import Submission


def create_app(
    settings: Settings | None = None,
    *,
    rules: ProgramRules | None = None,
    engine: Engine | None = None,
    client: Client | None = None,
    key: Keys | None = None,
    maildir: Path | None = None,
    smtp: SmtpSettings | None = None,
    rate_limit: str | RateLimiter | None = None,
    trusted_proxies: str | Iterable[str] | None = None,
    metrics: WebMetrics | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> FastAPI:
    """The app, from `settings` (default: the defaults, not the environment); each other
    argument, given, stands in for what the settings would make of it.

    `maildir` (dev stack only) enables `/dev/mail`; `smtp` sends the sign-in links.
    `rate_limit` caps the public POST routes per client address (`10/minute`, `off`, or a
    `RateLimiter`; default the settings', else no cap in process: the served app
    (`served_app`) applies the 10/minute default, while in-process callers (tests, an embedding
    app behind its own limits) choose theirs). `trusted_proxies` are the peers whose
    `X-Forwarded-For` is believed. `metrics` (default: new ones, in a registry of their own)
    count the requests; `app.state.metrics` holds them, and `run_web` serves them on
    REFERRALS_WEB_METRICS_PORT. `clock` says when "now" is for the dashboard's figures of the
    month (tests pin it).
    """
    settings = settings or Settings()
    if settings.encryption_keys is not None:  # the intake signs receipts (readiness checks)
        configure_receipts(settings.key_ring())
    if rate_limit is None:
        rate_limit = settings.rate_limit or "off"
    limiter = RateLimiter.from_setting(rate_limit) if isinstance(rate_limit, str) else rate_limit
    if trusted_proxies is None:
        trusted_proxies = settings.trusted_proxies
    if key is None:
        settings.require(Need.SECRET)
        key = settings.secret_keys
    site = Site(
        rules=rules or load_program(settings.program_path),
        engine=engine or open_database(settings.database()),
        key=key,
        smtp=smtp or settings.smtp,
        maildir=maildir,
        client=client,
        limiter=limiter,
        proxies=parse_networks(trusted_proxies),
        settings=settings,
    )
    app = FastAPI(
        title="Referral Desk intake",
        version="1",
        description="Submit opportunity referrals; follow them through a signed status link.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    # After BodyLimit: outside it, so it also marks 413s.
    app.add_middleware(SecurityHeaders, https=site.https)
    app.state.metrics = metrics or WebMetrics()
    # Added last: outermost, so it counts every answer, 413s included.
    app.add_middleware(RequestMetrics, metrics=app.state.metrics, routes=app.router.routes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

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

    add_intake_routes(app, site)
    add_portal_routes(app, site)
    add_receipt_routes(app, site)
    add_staff_routes(app, site, clock=clock)
    app.include_router(probes.router)
    if maildir is not None:
        app.include_router(devmail.router)

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


class WebSettingError(Exception):
    """The web app would be unsafe to serve as configured."""


def served_app(settings: Settings, host: str = "127.0.0.1") -> FastAPI:
    """The app as `referrals web` serves it on `host`, limited to 10 submissions a minute per
    client unless REFERRALS_RATE_LIMIT says otherwise. `/dev/mail` (REFERRALS_DEV_MAILDIR, set
    by `referrals dev`) is served on a loopback address only: it shows every email sent."""
    settings.require(Need.DATABASE, Need.ENCRYPTION, Need.SECRET, Need.ACTOR_SIGNING)
    if settings.dev_maildir is not None and not loopback(host):
        raise WebSettingError(
            f"REFERRALS_DEV_MAILDIR is for the dev stack: bound to {host}, /dev/mail would show "
            "every email sent to whoever reaches it; unset it or bind to 127.0.0.1"
        )
    return create_app(
        settings,
        maildir=settings.dev_maildir,
        rate_limit=settings.rate_limit or DEFAULT_RATE_LIMIT,
    )


def run_web(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    configure_logging(settings)
    app = served_app(settings, host)
    if settings.web_metrics_port is not None:
        # Its own port, on loopback unless REFERRALS_METRICS_HOST says otherwise: not public.
        where = app.state.metrics.serve(settings.web_metrics_port, settings.metrics_host)
        print(f"metrics on {where}", flush=True)
    # proxy_headers off: uvicorn must not rewrite the peer address from X-Forwarded-For;
    # the app reads that header itself, and only from REFERRALS_TRUSTED_PROXIES. Its access
    # log is off (it prints paths, tokens included): the app logs route templates instead.
    # log_config None: the logging of core/logs.py stays in force.
    uvicorn.run(app, host=host, port=port, proxy_headers=False, access_log=False, log_config=None)
