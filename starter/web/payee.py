"""The referrer's payment details (`/me/payee`): their payee profile and the self-billing
mandate, in the portal (docs/payouts.md). A change of bank details needs a sign-in link used
in the last few minutes, and the address on file is told of it; every value is checked as
the CLI checks it, and a refused form comes back as it was typed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from activities.i18n import translations
from activities.payees import accept_mandate, load_payee, save_payee
from core.payees import (
    PayeeKind,
    PayeeProfile,
    VatRegime,
    mandate_accepted,
    mandate_hash,
    mandate_of,
    mask_iban,
    problems,
)
from starter.web.deps import FormLanguage, Language, PostedForm, SiteDep, csrf_checked
from starter.web.signin import (
    PRIVATE,
    REFERRER,
    ReferrerEmail,
    send_message,
    sign_in_page,
    signed_in_at,
    signed_in_page,
)
from starter.web.site import Site

PAGE = f"{REFERRER.home}/payee"
CSRF_COOKIE = "referrals_payee"
# A change of bank details needs a sign-in this recent: proof the address's mail was read.
FRESH_SIGN_IN = timedelta(minutes=10)
FIELDS = ("legal_name", "kind", "country", "address", "siret", "vat_id", "vat_regime",
          "vat_rate", "iban", "bic", "language")  # fmt: skip
PayeeCsrf = Annotated[bool, Depends(csrf_checked(CSRF_COOKIE))]
router = APIRouter()


def _page(
    request: Request,
    site: Site,
    lang: str,
    email: str,
    profile: PayeeProfile | None,
    typed: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
    notice: str | None = None,
) -> Response:
    company = site.rules.payouts.company
    mandate = None
    if profile is not None and company is not None:
        mandate = mandate_of(profile, company)
    shown = typed
    if shown is None:
        shown = {name: "" for name in FIELDS}
        if profile is not None:
            shown |= {
                name: str(value)
                for name, value in profile.model_dump(include=set(FIELDS)).items()
                if value is not None
            }
            shown["iban"] = ""  # typed only to change it
    response = site.render_with_csrf(
        request,
        CSRF_COOKIE,
        "portal_payee.html",
        lang,
        status,
        **signed_in_page(request, site, REFERRER),
        email=email,
        profile=profile,
        account=mask_iban(profile.iban) if profile else None,
        typed=shown,
        errors=errors or {},
        kinds=list(PayeeKind),
        regimes=list(VatRegime),
        mandate=mandate,
        mandate_sha256=mandate_hash(mandate) if mandate else None,
        notice=notice,
    )
    response.headers.update(PRIVATE)
    return response


@router.get(PAGE, response_class=HTMLResponse, include_in_schema=False)
async def payee_page(
    request: Request, site: SiteDep, lang: Language, email: ReferrerEmail
) -> Response:
    if email is None:
        return sign_in_page(request, site, REFERRER, lang)
    profile = await asyncio.to_thread(load_payee, site.engine, email)
    notice = {"saved": "saved", "accepted": "accepted"}.get(request.query_params.get("done", ""))
    return _page(request, site, lang, email, profile, notice=notice)


@router.post(PAGE, response_class=HTMLResponse, include_in_schema=False)
async def save_payee_page(
    request: Request,
    site: SiteDep,
    lang: FormLanguage,
    email: ReferrerEmail,
    form: PostedForm,
    csrf_ok: PayeeCsrf,
) -> Response:
    """Save the profile (303 back), or the form as typed with what is wrong (422; 403 for a
    stale form or a change of bank details without a recent sign-in)."""
    if email is None:
        return sign_in_page(request, site, REFERRER, lang, 403)
    gettext = translations(lang).gettext
    current = await asyncio.to_thread(load_payee, site.engine, email)
    typed = {name: form.get(name, "").strip() for name in FIELDS}
    if not csrf_ok:
        problem = {"form": gettext("This form has expired: please send it again.")}
        return _page(request, site, lang, email, current, typed, problem, 403)
    data: dict[str, Any] = {name: value for name, value in typed.items() if value}
    if not typed["iban"] and current is not None:
        data["iban"] = current.iban  # left blank: unchanged
    if data.get("iban") and current is not None and current.iban != data["iban"].replace(" ", ""):
        since = await asyncio.to_thread(signed_in_at, request, site, REFERRER)
        if since is None or datetime.now(UTC) - since > FRESH_SIGN_IN:
            problem = {
                "iban": gettext(
                    "To change your bank details, sign in again with a new link: it proves "
                    "the change comes from you."
                )
            }
            return _page(request, site, lang, email, current, typed, problem, 403)
    if current is not None:
        data["minimum"] = current.minimum
    try:
        profile = PayeeProfile.model_validate({**data, "email": email})
    except ValidationError as error:
        return _page(request, site, lang, email, current, typed, problems(error), 422)
    saved = await asyncio.to_thread(
        save_payee, site.engine, profile, f"web:{email}", datetime.now(UTC), "in the portal"
    )
    if saved.previous_iban is not None:
        await send_message(site, _bank_change_notice(site, email, lang, saved.previous_iban))
    return RedirectResponse(f"{PAGE}?lang={lang}&done=saved", status_code=303)


def _bank_change_notice(site: Site, email: str, lang: str, previous: str) -> EmailMessage:
    """To the address on file: if the change was not theirs, they hear of it before a payment
    goes to the new account (the cooldown holds it meanwhile)."""
    gettext = translations(lang).gettext
    message = EmailMessage()
    message["Subject"] = gettext("Your bank details for commission payments were changed")
    message["From"] = str(site.rules.sender)
    message["To"] = email
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=str(site.rules.sender).rpartition("@")[2])
    message.set_content(
        gettext(
            "The bank account your commissions are paid to was changed in your referrer "
            "space: it replaces {previous}. If you did not make this change, reply to this "
            "email at once: no payment goes to the new account for a few days."
        ).format(previous=previous)
        + "\n"
    )
    message["Content-Language"] = lang
    return message


@router.post(f"{PAGE}/mandate", response_class=HTMLResponse, include_in_schema=False)
async def accept_mandate_page(
    request: Request,
    site: SiteDep,
    lang: FormLanguage,
    email: ReferrerEmail,
    form: PostedForm,
    csrf_ok: PayeeCsrf,
) -> Response:
    """Record the mandate as accepted: the text shown (its hash, sent back with the form) must
    be the text in force, and the box ticked."""
    if email is None:
        return sign_in_page(request, site, REFERRER, lang, 403)
    gettext = translations(lang).gettext
    profile = await asyncio.to_thread(load_payee, site.engine, email)
    company = site.rules.payouts.company
    if profile is None or company is None:
        return RedirectResponse(f"{PAGE}?lang={lang}", status_code=303)
    now = datetime.now(UTC)
    accepted = mandate_accepted(profile, company, email, "portal", now)
    problem = None
    if not csrf_ok:
        problem = gettext("This form has expired: please send it again.")
    elif form.get("accept") != "yes":
        problem = gettext("Tick the box to accept the mandate.")
    elif form.get("mandate_sha256") != accepted.text_sha256:
        problem = gettext("The mandate's text has changed since you opened it: read it again.")
    if problem is not None:
        return _page(request, site, lang, email, profile, errors={"mandate": problem}, status=422)
    await asyncio.to_thread(accept_mandate, site.engine, email, accepted, now)
    return RedirectResponse(f"{PAGE}?lang={lang}&done=accepted", status_code=303)
