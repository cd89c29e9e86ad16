"""What every page of the web app shares: the program, the database, the signing key, the
templates, the visitor's language and the per-client rate limit."""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from temporalio.client import Client

import core
from activities import i18n
from activities.i18n import LANGUAGES
from core.links import CSRF_MAX_AGE_SECONDS, Keys, csrf_token
from core.payees import mask_iban
from core.settings import Settings, SmtpSettings
from core.temporal import connect
from starter.web.security import Network, RateLimiter, client_address
from workflows.models.program import ProgramRules

TEMPLATES = core.TEMPLATES / "web"
STATIC = TEMPLATES / "static"


def pick_language(request: Request, form: Mapping[str, str] | None = None) -> str:
    """A posted form's `lang` (the language of the page it was filled in) first, then
    `?lang=`, then the browser's Accept-Language, then French."""
    for asked in ((form or {}).get("lang"), request.query_params.get("lang")):
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


@dataclass
class Site:
    """The app's shared parts; routes of each audience (intake, portal, staff) receive it."""

    rules: ProgramRules
    engine: Engine
    key: Keys  # the signing secrets: the first signs, all verify (core/links.py)
    smtp: SmtpSettings
    maildir: Path | None = None
    client: Client | None = None
    limiter: RateLimiter | None = None
    proxies: tuple[Network, ...] = ()
    settings: Settings = field(default_factory=Settings)  # public URL, task queue, Temporal…
    templates: Jinja2Templates = field(init=False)

    def __post_init__(self) -> None:
        keys = (self.key,) if isinstance(self.key, str) else tuple(self.key)
        self.settings = replace(self.settings, secret_keys=keys)
        self.templates = Jinja2Templates(directory=str(TEMPLATES))
        i18n.install(self.templates.env)  # `_()`, `{% trans %}`… in each render's `lang`
        # In the style sheet's URL, so a browser never keeps an old one after an upgrade.
        css = (STATIC / "site.css").read_bytes()
        self.templates.env.globals["asset_version"] = hashlib.sha256(css).hexdigest()[:12]
        self.templates.env.filters.update(
            local_date=self.local_date, deadline_day=self.deadline_day, masked_iban=mask_iban
        )

    @property
    def https(self) -> bool:
        """Served over https (behind the ingress): cookies are then sent over https only."""
        return self.settings.public_url.startswith("https://")

    async def temporal(self) -> Client:
        if self.client is None:
            self.client = await connect(self.settings)
        return self.client

    def local_date(self, moment: datetime | None, lang: str) -> str:
        zone = ZoneInfo(self.rules.calendar.timezone)
        return i18n.format_date(moment.astimezone(zone).date(), lang) if moment else ""

    def deadline_day(self, moment: datetime, lang: str) -> str:
        """Deadlines fall at 00:00 local: the last day allowed is the one before."""
        return self.local_date(moment - timedelta(seconds=1), lang)

    def render(
        self, request: Request, name: str, lang: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        """The page `name` in `lang`: its texts, dates and amounts in that language."""
        return self.templates.TemplateResponse(
            request,
            name,
            {"lang": lang, "rules": self.rules, **context},
            status_code=status,
        )

    def render_with_csrf(
        self, request: Request, cookie: str, name: str, lang: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        """A page whose form posts back here: its `csrf` token is tied to a nonce kept in the
        visitor's `cookie` (see core.links.csrf_valid)."""
        nonce = request.cookies.get(cookie) or secrets.token_urlsafe(16)
        response = self.render(
            request, name, lang, status, csrf=csrf_token(nonce, self.key), **context
        )
        response.set_cookie(
            cookie,
            nonce,
            httponly=True,
            samesite="strict",
            max_age=CSRF_MAX_AGE_SECONDS,
            secure=self.https,
        )
        return response

    def over_limit(self, request: Request) -> dict[str, str] | None:
        """Count this attempt; over the limit, the `Retry-After` header to answer with.

        Every attempt counts, refused or not: a bot's invalid posts cost as much as valid
        ones, and a person rarely needs more than a couple of tries a minute."""
        if self.limiter is None:
            return None
        wait = self.limiter.hit(client_address(request.scope, self.proxies))
        return None if wait is None else {"Retry-After": str(max(1, math.ceil(wait)))}
