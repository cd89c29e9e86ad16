"""Sign-in by emailed link, shared by the referrer portal (`/me`) and the staff dashboard
(`/staff`).

A visitor gives an address. If it may sign in, it receives a link that is signed, valid 30
minutes and usable once; the page answers the same either way and is sent before any email
goes out, so the form tells nobody who refers or who works here, not even by its timing.
Opening the link sets a signed, httponly, SameSite session cookie of that audience only: a
referrer's session never opens the dashboard. The session is the link's: signing out marks
the link's row, so a copy of the cookie is worth nothing afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import smtplib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from pydantic import EmailStr, TypeAdapter, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from activities.db import ReferralRow, SignInLinkRow
from activities.email import deliver
from core.links import csrf_valid, signer_keys
from starter.web.site import Site, pick_language

log = logging.getLogger(__name__)

LINK_MAX_AGE_SECONDS = 30 * 60
SESSION_MAX_AGE_SECONDS = 8 * 3600
CSRF_COOKIE = "referrals_sign_in"
# What a signed-in page answers with: one person's figures stay out of shared caches.
PRIVATE = {"Cache-Control": "no-store"}
# A failed send is tried again this many times, after 1, 2, 4… seconds.
SEND_ATTEMPTS = 4

_email = TypeAdapter(EmailStr)


@dataclass(frozen=True)
class Audience:
    """Who signs in where: each audience has its own home, cookie and signing salts."""

    name: str
    home: str
    cookie: str


REFERRER = Audience(name="referrer", home="/me", cookie="referrals_me")
STAFF = Audience(name="staff", home="/staff", cookie="referrals_staff")


@dataclass(frozen=True)
class SignedIn:
    email: str
    nonce: str  # the link's, which names the session


class LinkRefused(StrEnum):
    INVALID = "invalid"
    EXPIRED = "expired"
    USED = "used"


def _links(site: Site, audience: Audience) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(signer_keys(site.key), salt=f"sign-in-link:{audience.name}")


def _sessions(site: Site, audience: Audience) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(signer_keys(site.key), salt=f"session:{audience.name}")


def link_token(site: Site, audience: Audience, email: str) -> str:
    """The token of a sign-in link; its random nonce is what makes it usable once."""
    return _links(site, audience).dumps({"email": email, "nonce": secrets.token_urlsafe(18)})


def redeem(site: Site, audience: Audience, token: str) -> SignedIn | LinkRefused:
    """Who a link signs in, or why it does not. The first use records the link's nonce;
    the primary key refuses a second use, whichever web process sees it."""
    try:
        value = _links(site, audience).loads(token, max_age=LINK_MAX_AGE_SECONDS)
    except SignatureExpired:
        return LinkRefused.EXPIRED
    except BadSignature:
        return LinkRefused.INVALID
    if not isinstance(value, dict) or not {"email", "nonce"} <= value.keys():
        return LinkRefused.INVALID
    try:
        with Session(site.engine) as session:
            session.add(
                SignInLinkRow(
                    nonce=str(value["nonce"]), audience=audience.name, used_at=datetime.now(UTC)
                )
            )
            session.commit()
    except IntegrityError:
        return LinkRefused.USED
    return SignedIn(email=str(value["email"]), nonce=str(value["nonce"]))


def may_sign_in(site: Site, audience: Audience, email: str) -> bool:
    """Staff: an address listed in `staff.emails`. A referrer: one who submitted a referral."""
    if audience == STAFF:
        return email in {str(e).lower() for e in site.rules.staff.emails}
    with Session(site.engine) as session:
        found = session.exec(
            select(ReferralRow.referral_id).where(ReferralRow.referrer_email == email).limit(1)
        ).first()
    return found is not None


def _session(request: Request, site: Site, audience: Audience) -> SignedIn | None:
    """What this audience's cookie says, if we signed it and it is not over 8 hours old."""
    cookie = request.cookies.get(audience.cookie)
    if not cookie:
        return None
    try:
        value = _sessions(site, audience).loads(cookie, max_age=SESSION_MAX_AGE_SECONDS)
    except BadSignature:  # SignatureExpired included
        return None
    if not isinstance(value, dict) or not {"email", "nonce"} <= value.keys():
        return None
    return SignedIn(email=str(value["email"]), nonce=str(value["nonce"]))


def _still_open(site: Site, audience: Audience, session: SignedIn) -> bool:
    with Session(site.engine) as db:
        link = db.get(SignInLinkRow, session.nonce)
    return link is not None and link.audience == audience.name and link.signed_out_at is None


async def signed_in(request: Request, site: Site, audience: Audience) -> str | None:
    """The address of this audience's session, or None: no cookie, or one not ours, too old,
    or of a session signed out since."""
    session = _session(request, site, audience)
    if session is None or not await asyncio.to_thread(_still_open, site, audience, session):
        return None
    return session.email


def sign_out(site: Site, session: SignedIn) -> None:
    with Session(site.engine) as db:
        link = db.get(SignInLinkRow, session.nonce)
        if link is not None and link.signed_out_at is None:
            link.signed_out_at = datetime.now(UTC)
            db.add(link)
            db.commit()


def sign_in_page(
    request: Request,
    site: Site,
    audience: Audience,
    lang: str,
    status: int = 200,
    *,
    email: str = "",
    error: str | None = None,
    problem: str | None = None,
) -> HTMLResponse:
    """The form asking for an address; `problem` says why the visitor is back here."""
    return site.render_with_csrf(
        request,
        CSRF_COOKIE,
        "sign_in.html",
        lang,
        status,
        audience=audience.name,
        home=audience.home,
        email=email,
        error=error,
        problem=problem,
    )


def _link_message(site: Site, audience: Audience, email: str, lang: str) -> EmailMessage:
    token = link_token(site, audience, email)
    link = f"{site.settings.public_url}{audience.home}/sign-in/{token}?lang={lang}"
    template = site.templates.env.get_template("sign_in_email.txt")
    subject, _, body = template.render(audience=audience.name, link=link, lang=lang).partition("\n")
    message = EmailMessage()
    message["Subject"] = subject.removeprefix("Subject:").strip()
    message["From"] = str(site.rules.sender)
    message["To"] = email
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=str(site.rules.sender).rpartition("@")[2])
    message.set_content(body.strip() + "\n")
    message["Content-Language"] = lang
    return message


async def _send(site: Site, message: EmailMessage) -> None:
    """A few tries over some seconds: the link is only good for 30 minutes, and the visitor
    can ask again. A refusal for good (5xx) is not retried."""
    for attempt in range(SEND_ATTEMPTS):
        try:
            await asyncio.to_thread(deliver, site.smtp, message)
            return
        except smtplib.SMTPResponseException as error:
            if error.smtp_code >= 500:
                log.warning("sign-in link refused by SMTP: %s", error.smtp_code)
                return
            failure: Exception = error
        except (smtplib.SMTPException, OSError) as error:
            failure = error
        if attempt + 1 < SEND_ATTEMPTS:
            await asyncio.sleep(2**attempt)
    log.error("sign-in link not sent after %d attempts: %s", SEND_ATTEMPTS, failure)


def add_sign_in_routes(app: FastAPI, site: Site, audience: Audience) -> None:
    sending: set[asyncio.Task[None]] = set()  # keeps each send alive until it ends

    @app.post(f"{audience.home}/sign-in", response_class=HTMLResponse, include_in_schema=False)
    async def ask_for_link(request: Request) -> Response:
        raw = await request.form()
        form = {k: v for k, v in raw.items() if isinstance(v, str)}
        lang = pick_language(request, form)
        typed = form.get("email", "").strip()
        retry = site.over_limit(request)
        if retry is not None:
            response = sign_in_page(
                request, site, audience, lang, 429, email=typed, problem="rate_limited"
            )
            response.headers.update(retry)
            return response
        if not csrf_valid(form.get("csrf"), request.cookies.get(CSRF_COOKIE), site.key):
            return sign_in_page(request, site, audience, lang, 403, email=typed, problem="csrf")
        try:
            email = str(_email.validate_python(typed)).lower()
        except ValidationError:
            return sign_in_page(request, site, audience, lang, 422, email=typed, error="email")
        if await asyncio.to_thread(may_sign_in, site, audience, email):
            task = asyncio.create_task(_send(site, _link_message(site, audience, email, lang)))
            sending.add(task)
            task.add_done_callback(sending.discard)
        return site.render(
            request, "sign_in_sent.html", lang, audience=audience.name, home=audience.home
        )

    @app.get(
        f"{audience.home}/sign-in/{{token}}", response_class=HTMLResponse, include_in_schema=False
    )
    async def open_link(request: Request, token: str) -> Response:
        lang = pick_language(request)
        outcome = await asyncio.to_thread(redeem, site, audience, token)
        if isinstance(outcome, LinkRefused):
            return sign_in_page(request, site, audience, lang, 400, problem=f"link_{outcome}")
        response = RedirectResponse(f"{audience.home}?lang={lang}", status_code=303)
        response.set_cookie(
            audience.cookie,
            _sessions(site, audience).dumps({"email": outcome.email, "nonce": outcome.nonce}),
            max_age=SESSION_MAX_AGE_SECONDS,
            path=audience.home,
            httponly=True,
            samesite="lax",  # the link is opened from a mail client: a cross-site navigation
            secure=site.settings.public_url.startswith("https://"),
        )
        return response

    @app.post(f"{audience.home}/sign-out", include_in_schema=False)
    async def end_session(request: Request) -> Response:
        session = _session(request, site, audience)
        if session is not None:
            await asyncio.to_thread(sign_out, site, session)
        home = f"{audience.home}?lang={pick_language(request)}"
        response = RedirectResponse(home, status_code=303)
        response.delete_cookie(audience.cookie, path=audience.home)
        return response
