"""Sign-in by emailed link, shared by the referrer portal (`/me`) and the staff dashboard
(`/staff`).

A visitor gives an address. If it may sign in, it receives a link that is encrypted (it
reveals nothing, not even the address), valid 30 minutes and usable once. The page answers
at once, the same either way: whether the address may sign in is looked up afterwards, so
the form tells nobody who refers or who works here, not even by its timing. Opening the link
shows a page whose button signs in (a POST): a mail scanner that fetches every link spends
nothing. Signing in sets a signed, httponly, SameSite session cookie of that audience only:
a referrer's session never opens the dashboard. The session is the link's: signing out marks
the link's row, so a copy of the cookie is worth nothing afterwards; and every request checks
the address may still sign in, so removing it from the staff list ends its sessions.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import secrets
import smtplib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from enum import StrEnum
from typing import Annotated, TypedDict

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from pydantic import EmailStr, TypeAdapter, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from activities.db import ReferralRow, SignInLinkRow, as_utc
from activities.email import deliver
from core.links import Keys, signer_keys
from core.roles import staff_addresses
from starter.web.deps import (
    FormLanguage,
    Language,
    PostedForm,
    SiteDep,
    csrf_checked,
    install,
)
from starter.web.security import RateLimiter
from starter.web.site import Site

log = logging.getLogger(__name__)

LINK_MAX_AGE_SECONDS = 30 * 60
SESSION_MAX_AGE_SECONDS = 8 * 3600
CSRF_COOKIE = "referrals_sign_in"
# What a signed-in page answers with: one person's figures stay out of shared caches.
PRIVATE = {"Cache-Control": "no-store"}
# A failed send is tried again this many times, after 1, 2, 4… seconds.
SEND_ATTEMPTS = 4
# Links sent to one address in a quarter of an hour, whoever asks (per web process): the
# form must not be a way to flood someone's mailbox from many connections.
LINKS_PER_ADDRESS = (3, 15 * 60)

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


@functools.lru_cache(maxsize=64)
def _link_key(secret: str, audience: str) -> Fernet:
    """A key of its own for each secret and audience, derived, so a link is never readable
    or forgeable with what signs status links or sessions."""
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"sign-in-link:{audience}".encode()
    ).derive(secret.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def _links(site: Site, audience: Audience) -> MultiFernet:
    """The first secret's key encrypts; every secret's decrypts (a rotation)."""
    return MultiFernet([_link_key(k, audience.name) for k in reversed(signer_keys(site.key))])


def _sessions(site: Site, audience: Audience) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(signer_keys(site.key), salt=f"session:{audience.name}")


def link_token(site: Site, audience: Audience, email: str) -> str:
    """The token of a sign-in link, encrypted: it shows nobody the address it signs in. Its
    random nonce is what makes it usable once."""
    value = json.dumps({"email": email, "nonce": secrets.token_urlsafe(18)}).encode()
    return _links(site, audience).encrypt(value).decode()


def read_link(site: Site, audience: Audience, token: str) -> SignedIn | LinkRefused:
    """Who a link would sign in, or why it would not; spends nothing."""
    links = _links(site, audience)
    try:
        value = json.loads(links.decrypt(token.encode()))
        issued = links.extract_timestamp(token.encode())
    except (InvalidToken, ValueError):
        return LinkRefused.INVALID
    if not isinstance(value, dict) or not {"email", "nonce"} <= value.keys():
        return LinkRefused.INVALID
    if time.time() - issued > LINK_MAX_AGE_SECONDS:
        return LinkRefused.EXPIRED
    link = SignedIn(email=str(value["email"]), nonce=str(value["nonce"]))
    with Session(site.engine) as session:
        if session.get(SignInLinkRow, link.nonce) is not None:
            return LinkRefused.USED
    return link


def redeem(site: Site, audience: Audience, token: str) -> SignedIn | LinkRefused:
    """Who a link signs in, or why it does not. The first use records the link's nonce;
    the primary key refuses a second use, whichever web process sees it."""
    value = read_link(site, audience, token)
    if isinstance(value, LinkRefused):
        return value
    try:
        with Session(site.engine) as session:
            session.add(
                SignInLinkRow(nonce=value.nonce, audience=audience.name, used_at=datetime.now(UTC))
            )
            session.commit()
    except IntegrityError:
        return LinkRefused.USED
    return value


def may_sign_in(site: Site, audience: Audience, email: str) -> bool:
    """Staff: an address with a role in `staff`. A referrer: one who submitted a referral."""
    if audience == STAFF:
        return email.lower() in staff_addresses(site.rules.staff)
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
    """Not signed out, and the address may still sign in (a staff address removed from the
    program, a referrer whose data was erased: their sessions end with it)."""
    with Session(site.engine) as db:
        link = db.get(SignInLinkRow, session.nonce)
    if link is None or link.audience != audience.name or link.signed_out_at is not None:
        return False
    return may_sign_in(site, audience, session.email)


def signed_in_at(request: Request, site: Site, audience: Audience) -> datetime | None:
    """When this session's link was used: how recently its holder proved they read the
    address's mail (a change of bank details asks for a recent proof)."""
    session = _session(request, site, audience)
    if session is None:
        return None
    with Session(site.engine) as db:
        link = db.get(SignInLinkRow, session.nonce)
    return as_utc(link.used_at) if link is not None else None


async def signed_in(request: Request, site: Site, audience: Audience) -> str | None:
    """The address of this audience's session, or None: no cookie, or one not ours, too old,
    of a session signed out since, or of an address that may no longer sign in."""
    session = _session(request, site, audience)
    if session is None or not await asyncio.to_thread(_still_open, site, audience, session):
        return None
    return session.email


def _sign_out_token(nonce: str, key: str) -> str:
    return hmac.new(key.encode(), f"sign-out:{nonce}".encode(), hashlib.sha256).hexdigest()


def sign_out_token(request: Request, site: Site, audience: Audience) -> str:
    """The sign-out form's token, tied to the session it ends: another site cannot make a
    visitor's browser sign them out."""
    session = _session(request, site, audience)
    return "" if session is None else _sign_out_token(session.nonce, signer_keys(site.key)[-1])


class SignedInPage(TypedDict):
    """What every signed-in page renders with (sign_out.html)."""

    home: str
    sign_out_csrf: str


def signed_in_page(request: Request, site: Site, audience: Audience) -> SignedInPage:
    """The audience's home, and the sign-out form's token of this visitor's session."""
    return {"home": audience.home, "sign_out_csrf": sign_out_token(request, site, audience)}


def _sign_out_allowed(token: str | None, session: SignedIn, keys: Keys) -> bool:
    return bool(token) and any(
        hmac.compare_digest(str(token), _sign_out_token(session.nonce, key))
        for key in signer_keys(keys)
    )


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


async def _send_if_allowed(
    site: Site, audience: Audience, email: str, lang: str, sent_to: RateLimiter
) -> None:
    """After the page has answered: whether the address may sign in is no business of the
    answer, nor of its timing."""
    if not await asyncio.to_thread(may_sign_in, site, audience, email):
        return
    if sent_to.hit(f"{audience.name}:{email}") is not None:
        log.warning("sign-in link not sent: %d already sent to this address", sent_to.limit)
        return
    await send_message(site, _link_message(site, audience, email, lang))


async def send_message(site: Site, message: EmailMessage) -> None:
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


@dataclass
class LinkSending:
    """One app's links to one audience: how many each address got lately, and the sends
    still under way (kept alive until they end)."""

    sent_to: RateLimiter = field(default_factory=lambda: RateLimiter(*LINKS_PER_ADDRESS))
    sending: set[asyncio.Task[None]] = field(default_factory=set)


def add_sign_in_routes(app: FastAPI, site: Site, audience: Audience) -> None:
    """The sign-in routes under the audience's home."""
    install(app, site)
    if not hasattr(app.state, "link_sending"):
        app.state.link_sending = {}
    app.state.link_sending[audience.name] = LinkSending()
    app.include_router(ROUTERS[audience.name])


AUDIENCES = (REFERRER, STAFF)


def audience_of(request: Request) -> Audience:
    """The audience under whose home the sign-in routes answer this request."""
    path: str = request.scope["path"]
    return next(a for a in AUDIENCES if path.startswith(f"{a.home}/"))


def link_sending(request: Request, audience: AudienceDep) -> LinkSending:
    sending: LinkSending = request.app.state.link_sending[audience.name]
    return sending


async def staff_signed_in(request: Request, site: SiteDep) -> str | None:
    return await signed_in(request, site, STAFF)


async def referrer_signed_in(request: Request, site: SiteDep) -> str | None:
    return await signed_in(request, site, REFERRER)


AudienceDep = Annotated[Audience, Depends(audience_of)]
LinkSendingDep = Annotated[LinkSending, Depends(link_sending)]
SignInCsrf = Annotated[bool, Depends(csrf_checked(CSRF_COOKIE))]
# The signed-in address, or None.
StaffEmail = Annotated[str | None, Depends(staff_signed_in)]
ReferrerEmail = Annotated[str | None, Depends(referrer_signed_in)]


async def ask_for_link(
    request: Request,
    site: SiteDep,
    audience: AudienceDep,
    form: PostedForm,
    lang: FormLanguage,
    csrf_ok: SignInCsrf,
    links: LinkSendingDep,
) -> Response:
    typed = form.get("email", "").strip()
    retry = site.over_limit(request)
    if retry is not None:
        response = sign_in_page(
            request, site, audience, lang, 429, email=typed, problem="rate_limited"
        )
        response.headers.update(retry)
        return response
    if not csrf_ok:
        return sign_in_page(request, site, audience, lang, 403, email=typed, problem="csrf")
    try:
        email = str(_email.validate_python(typed)).lower()
    except ValidationError:
        return sign_in_page(request, site, audience, lang, 422, email=typed, error="email")
    task = asyncio.create_task(_send_if_allowed(site, audience, email, lang, links.sent_to))
    links.sending.add(task)
    task.add_done_callback(links.sending.discard)
    return site.render(
        request, "sign_in_sent.html", lang, audience=audience.name, home=audience.home
    )


async def open_link(
    request: Request, site: SiteDep, audience: AudienceDep, lang: Language, token: str
) -> Response:
    """A page with a button that signs in: opening the link spends nothing."""
    outcome = await asyncio.to_thread(read_link, site, audience, token)
    if isinstance(outcome, LinkRefused):
        return sign_in_page(request, site, audience, lang, 400, problem=f"link_{outcome}")
    response = site.render_with_csrf(
        request, CSRF_COOKIE, "sign_in_link.html", lang, audience=audience.name,
        home=audience.home, token=token,
    )  # fmt: skip
    response.headers.update(PRIVATE)
    return response


async def use_link(
    request: Request,
    site: SiteDep,
    audience: AudienceDep,
    lang: FormLanguage,
    csrf_ok: SignInCsrf,
    token: str,
) -> Response:
    if not csrf_ok:
        # Another site posting its own link would sign this visitor in as someone else.
        return sign_in_page(request, site, audience, lang, 403, problem="csrf")
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
        secure=site.https,
    )
    return response


async def end_session(
    request: Request, site: SiteDep, audience: AudienceDep, form: PostedForm, lang: Language
) -> Response:
    session = _session(request, site, audience)
    home = f"{audience.home}?lang={lang}"
    if session is not None and not _sign_out_allowed(form.get("csrf"), session, site.key):
        return RedirectResponse(home, status_code=303)  # still signed in
    if session is not None:
        await asyncio.to_thread(sign_out, site, session)
    response = RedirectResponse(home, status_code=303)
    response.delete_cookie(audience.cookie, path=audience.home)
    return response


def sign_in_router(audience: Audience) -> APIRouter:
    """The routes above under one audience's home (full paths, so that the access log and
    the metrics name each route by its whole template)."""
    router = APIRouter(include_in_schema=False)
    home = audience.home
    router.add_api_route(
        f"{home}/sign-in", ask_for_link, methods=["POST"], response_class=HTMLResponse
    )
    router.add_api_route(
        f"{home}/sign-in/{{token}}", open_link, methods=["GET"], response_class=HTMLResponse
    )
    router.add_api_route(
        f"{home}/sign-in/{{token}}", use_link, methods=["POST"], response_class=HTMLResponse
    )
    router.add_api_route(f"{home}/sign-out", end_session, methods=["POST"])
    return router


ROUTERS = {audience.name: sign_in_router(audience) for audience in AUDIENCES}
