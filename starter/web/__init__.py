"""The web app, one module per audience: the intake form and status pages (`intake`), the
referrer portal (`portal`), the program dashboard (`staff`); `security` and `signin` are
shared by all of them, `site` holds what every page needs.

Runs in its own process (`referrals web`); it starts workflows through Temporal and reads
referrals from the system of record, and never imports the worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from activities.email import SmtpSettings
from activities.schema import open_database
from core.links import secret_key
from core.program import load_program
from starter.web.devmail import add_dev_mail_routes
from starter.web.intake import add_intake_routes
from starter.web.metrics import RequestMetrics, WebMetrics, web_metrics_port
from starter.web.portal import add_portal_routes
from starter.web.security import (
    DEFAULT_RATE_LIMIT,
    MAX_BODY_BYTES,
    RATE_LIMIT_ENV,
    TRUSTED_PROXIES_ENV,
    ApiError,
    ApiRefusal,
    BodyLimit,
    RateLimiter,
    SecurityHeaders,
    parse_networks,
)
from starter.web.site import STATIC, Site
from starter.web.staff import add_staff_routes
from workflows.models import ProgramRules, Submission


def create_app(
    *,
    rules: ProgramRules | None = None,
    engine: Engine | None = None,
    client: Client | None = None,
    key: str | None = None,
    maildir: Path | None = None,
    smtp: SmtpSettings | None = None,
    rate_limit: str | RateLimiter | None = None,
    trusted_proxies: str | Iterable[str] | None = None,
    metrics: WebMetrics | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> FastAPI:
    """The app; `maildir` (dev mode only) enables `/dev/mail`; `smtp` (default from the
    environment) sends the sign-in links.

    `rate_limit` caps the public POST routes per client address (`10/minute`, `off`, or a
    `RateLimiter`); when not given, `REFERRALS_RATE_LIMIT` decides and, unset, there is no cap
    in process: the served app (`served_app`) applies the 10/minute default, while in-process
    callers (tests, an embedding app behind its own limits) choose theirs. `trusted_proxies`
    (default `REFERRALS_TRUSTED_PROXIES`, else none) are the peers whose `X-Forwarded-For`
    is believed. `metrics` (default: new ones, in a registry of their own) count the requests;
    `app.state.metrics` holds them, and `run_web` serves them on REFERRALS_WEB_METRICS_PORT.
    `clock` says when "now" is for the dashboard's figures of the month (tests pin it).
    """
    if rate_limit is None:
        rate_limit = os.environ.get(RATE_LIMIT_ENV) or "off"
    limiter = RateLimiter.from_setting(rate_limit) if isinstance(rate_limit, str) else rate_limit
    if trusted_proxies is None:
        trusted_proxies = os.environ.get(TRUSTED_PROXIES_ENV)
    site = Site(
        rules=rules or load_program(),
        engine=engine or open_database(),
        key=key or secret_key(),
        smtp=smtp or SmtpSettings.from_env(),
        maildir=maildir,
        client=client,
        limiter=limiter,
        proxies=parse_networks(trusted_proxies),
    )
    app = FastAPI(
        title="Referral Desk intake",
        version="1",
        description="Submit opportunity referrals; follow them through a signed status link.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(SecurityHeaders)  # after BodyLimit: outside it, so it also marks 413s
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
    add_staff_routes(app, site, clock=clock)

    @app.get("/healthz", summary="Health: Temporal and the database")
    async def healthz() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            client = await site.temporal()
            await client.workflow_service.get_system_info(
                GetSystemInfoRequest(), timeout=timedelta(seconds=3)
            )
            checks["temporal"] = "ok"
        except Exception as error:  # noqa: BLE001 - any failure is "unavailable"
            checks["temporal"] = f"unavailable: {type(error).__name__}"
        try:
            with site.engine.connect() as connection:
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
        add_dev_mail_routes(app, site.templates, maildir)

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

    metrics_port = web_metrics_port()
    app = served_app()
    if metrics_port is not None:
        # Its own port, on loopback unless REFERRALS_METRICS_HOST says otherwise: not public.
        print(f"metrics on {app.state.metrics.serve(metrics_port)}", flush=True)
    # proxy_headers off: uvicorn must not rewrite the peer address from X-Forwarded-For;
    # the app reads that header itself, and only from REFERRALS_TRUSTED_PROXIES.
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)
