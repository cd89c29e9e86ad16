"""The intake: the referral form, its JSON API, and the referrer's page for one referral
(reached by its signed status link)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from temporalio.service import RPCError

from activities.i18n import N_, countries, format_date, translations
from activities.queries import load_referral
from activities.receipts import referrer_copy
from core.links import referral_from_token, status_token
from core.receipts import fingerprint, readable
from starter.consent import consent_statement
from starter.intake import (
    DuplicateReferral,
    FieldError,
    SubmissionRefused,
    parse_submission,
    submit_referral,
)
from starter.web.deps import (
    FormLanguage,
    Language,
    PostedForm,
    SiteDep,
    csrf_checked,
    install,
)
from starter.web.security import ApiError, ApiRefusal, RateLimiter
from starter.web.site import Site, pick_language
from workflows.models.referral import ReferralState, Stage, Submission

CSRF_COOKIE = "referral_form"
CURRENCIES = ("EUR", "USD", "GBP", "CHF", "CAD")
# A form field no person sees or fills (see `form_post`); a name bots like to fill.
HONEYPOT = "subject"
# Referrals (so acknowledgements) for one referrer address per hour, whoever sends them (per
# web process, with the per-connection limit): that one alone lets many connections flood
# one mailbox.
ACKNOWLEDGEMENTS_PER_ADDRESS = (10, 3600)


class ReferralCreated(BaseModel):
    referral_id: str
    status_url: str


# A refusal's code (starter.intake.FieldError) to what the visitor reads.
ERROR_MESSAGES = {
    "required": N_("This field is required."),
    "invalid": N_("This value is not valid."),
    "public_sector": N_(
        "Thank you for this referral. Public-sector opportunities are not eligible for this "
        "program's commissions."
    ),
    "product_not_eligible": N_(
        "This product is not a multi-tenant cloud product; only those are eligible for the program."
    ),
    "unknown_product": N_("Choose a product from the list."),
    "consent_required": N_("We need the contact's permission before receiving their details."),
    "control_characters": N_(
        "This field must be plain text, on one line, without control characters."
    ),
    "control_characters_multiline": N_(
        "This text contains control characters that are not allowed."
    ),
    "public_sector_domain": N_(
        "This website belongs to the public sector, whose opportunities are not eligible for "
        "this program's commissions."
    ),
    "self_referral": N_("You cannot refer your own company."),
}
# A field's own message for an invalid value, more helpful than "not valid".
FIELD_MESSAGES = {
    "referrer.email": N_("Enter a valid email address, for example name@company.com."),
    "contact.email": N_("Enter a valid email address, for example name@company.com."),
    "prospect.website": N_("Enter the company's website, for example www.example.com."),
    "prospect.country": N_("Choose a country from the list."),
    "prospect.sector": N_("Say whether the company is in the private or public sector."),
    "referrer.language": N_("Choose a language from the list."),
    "opportunity.estimated_annual_value": N_("Enter a positive amount, for example 120000."),
    "opportunity.currency": N_("Choose a currency from the list."),
}
# What the referrer reads for each stage, and for each step of the status page's history.
STAGE_NAMES = {
    Stage.SUBMITTED: N_("Received, awaiting contact"),
    Stage.CONTACTED: N_("You have been contacted"),
    Stage.QUALIFYING: N_("Accepted, being qualified by sales"),
    Stage.APPROVED: N_("Approved, in the sales cycle"),
    Stage.WON: N_("Deal won, awaiting the customer's payment"),
    Stage.COMMISSION_PAYABLE: N_("Customer paid, commission payable"),
    Stage.COMMISSION_PAID: N_("Commission paid"),
    Stage.DECLINED: N_("Not accepted"),
    Stage.REJECTED: N_("Not approved"),
    Stage.LOST: N_("Deal lost"),
    Stage.CANCELLED: N_("Cancelled"),
    Stage.EXPIRED: N_("Protection ended"),
}
STEP_NAMES = {
    "submitted": N_("Referral received"),
    "contacted": N_("You were contacted"),
    "accept": N_("Referral accepted and passed to sales"),
    "decline": N_("Referral not accepted"),
    "approve": N_("Opportunity approved"),
    "reject": N_("Opportunity not approved"),
    "won": N_("Deal won"),
    "lost": N_("Deal lost"),
    "cancel": N_("Referral cancelled"),
    "commission_payable": N_("Customer paid in full; commission payable"),
    "payout": N_("Commission paid"),
    "extend": N_("Protection extended"),
    "expire": N_("Protection ended; the company can be referred again"),
    "refund": N_("Customer refunded; commission adjusted"),
}


def duplicate_message(duplicate: DuplicateReferral, lang: str) -> str:
    """Until when the prospect is protected, or that it is under review; never by whom."""
    _ = translations(lang).gettext
    if duplicate.protected_until is None:
        return _(
            "This company is already referred, and that referral is being reviewed. Thank you "
            "all the same: only one referral per company can be open at a time."
        )
    return _(
        "This company is already referred, and protected for that referral until %(date)s. "
        "Thank you all the same: only one referral per company can be open at a time."
    ) % {"date": format_date(duplicate.protected_until.date(), lang)}


def form_to_submission(form: dict[str, str]) -> dict[str, Any]:
    """`prospect.website=…` form fields to the nested submission; blanks mean absent."""
    data: dict[str, Any] = {"referrer": {}, "prospect": {}, "contact": {}, "opportunity": {}}
    for name, value in form.items():
        section, _, key = name.partition(".")
        if section in data and key and value.strip():
            data[section][key] = value
    data["consent"] = form.get("consent") in ("on", "true", "yes", "1")
    return data


def localized_errors(errors: list[FieldError], lang: str) -> dict[str, str]:
    """One message per field, in the visitor's language."""
    result: dict[str, str] = {}
    for error in errors:
        if error.field in result:
            continue
        if error.code in ERROR_MESSAGES:
            message = ERROR_MESSAGES[error.code]
        elif error.code in ("missing", "string_too_short"):
            message = ERROR_MESSAGES["required"]
        else:
            message = FIELD_MESSAGES.get(error.field, ERROR_MESSAGES["invalid"])
        result[error.field] = translations(lang).gettext(message)
    return result


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


def status_words(state: ReferralState, lang: str) -> dict[str, Any]:
    """The status page's stage and dated steps, in the referrer's words and language."""
    _ = translations(lang).gettext
    return {
        "stage_name": _(STAGE_NAMES[state.stage]),
        "steps": [(at, step, _(STEP_NAMES[step])) for at, step in timeline(state)],
    }


class TooManyForAddress(Exception):
    """The referrer's address got ACKNOWLEDGEMENTS_PER_ADDRESS acknowledgements lately."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


def add_intake_routes(app: FastAPI, site: Site) -> None:
    install(app, site)
    # With the per-connection limit, or not at all (REFERRALS_RATE_LIMIT=off: a load test).
    app.state.acknowledgements = (
        RateLimiter(*ACKNOWLEDGEMENTS_PER_ADDRESS) if site.limiter is not None else None
    )
    app.include_router(router)


def acknowledgements_limit(request: Request) -> RateLimiter | None:
    """Acknowledgements per referrer address (ACKNOWLEDGEMENTS_PER_ADDRESS), one limiter per app."""
    limiter: RateLimiter | None = request.app.state.acknowledgements
    return limiter


Acknowledgements = Annotated[RateLimiter | None, Depends(acknowledgements_limit)]
FormCsrf = Annotated[bool, Depends(csrf_checked(CSRF_COOKIE))]
router = APIRouter()


def render_form(
    site: Site,
    request: Request,
    lang: str,
    values: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    problem: str | None = None,
    status: int = 200,
    refusal: dict[str, Any] | None = None,
) -> HTMLResponse:
    return site.render_with_csrf(
        request,
        CSRF_COOKIE,
        "form.html",
        lang,
        status,
        values=values or {"referrer.language": lang},
        errors=errors or {},
        problem=problem,
        products=[
            (p, site.rules.commission_for(p.id).rate)
            for p in site.rules.products
            if p.multi_tenant_cloud
        ],
        countries=countries(lang),
        currencies=CURRENCIES,
        consent_statement=consent_statement(lang)[1],
        honeypot=HONEYPOT,
        refusal=refusal,
    )


def receipt_shown(receipt: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a page says of a receipt (a registration's, a refused duplicate's), and the
    referrer's copy to download."""
    if receipt is None:
        return None
    decision = receipt["decision"]
    earlier_at = decision.get("earlier_at")
    return {
        "seq": receipt["seq"],
        "at": readable(receipt["at"]),
        "earlier_seq": decision.get("earlier_seq"),
        "earlier_at": readable(earlier_at) if earlier_at else None,
        "fingerprint": fingerprint(receipt),
        "json": json.dumps(receipt, indent=2, ensure_ascii=False),
    }


async def start(
    site: Site,
    acknowledgements: RateLimiter | None,
    submission: Submission,
    consent_language: str | None = None,
) -> str:
    """`consent_language`: the language the consent statement was shown in (the form's
    page); the API's callers accept it in the referrer's language. Raises
    TooManyForAddress past ACKNOWLEDGEMENTS_PER_ADDRESS."""
    wait = (
        acknowledgements.hit(str(submission.referrer.email).lower()) if acknowledgements else None
    )
    if wait is not None:
        raise TooManyForAddress(max(1, math.ceil(wait)))
    return await submit_referral(
        await site.temporal(),
        site.engine,
        site.rules,
        submission,
        site.settings,
        submitted_by=f"web:{submission.referrer.email}",
        consent_language=consent_language,
    )


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def form_page(request: Request, site: SiteDep, lang: Language) -> HTMLResponse:
    return render_form(site, request, lang)


@router.post("/referrals", response_class=HTMLResponse, include_in_schema=False)
async def form_post(
    request: Request,
    site: SiteDep,
    form: PostedForm,
    lang: FormLanguage,
    csrf_ok: FormCsrf,
    acknowledgements: Acknowledgements,
) -> Response:
    """The form post. A filled honeypot (a field hidden from people, see form.html) gets
    the form back with a generic "could not be sent" and no reason, and nothing starts: a
    bot learns nothing it could adapt to, and a person whose browser filled the hidden
    field by mistake still has everything typed and can send it again (the honeypot comes
    back empty)."""
    _ = translations(lang).gettext
    values = {k: v for k, v in form.items() if k not in ("csrf", "lang", HONEYPOT)}
    retry = site.over_limit(request)
    if retry is not None:
        problem = _(
            "Too many referrals were sent from your connection in a short time. What you "
            "typed is kept; please wait a moment, then send it again."
        )
        response = render_form(site, request, lang, values, problem=problem, status=429)
        response.headers.update(retry)
        return response
    if not csrf_ok:
        problem = _(
            "The form expired or could not be verified. What you typed is kept; please send "
            "it again."
        )
        return render_form(site, request, lang, values, problem=problem, status=403)
    if form.get(HONEYPOT, "").strip():
        problem = _(
            "Your referral could not be sent. What you typed is kept; please check it and "
            "send it again."
        )
        return render_form(site, request, lang, values, problem=problem, status=400)
    fix = _("Please correct the fields marked below; what you typed is kept.")
    try:
        submission = parse_submission(form_to_submission(form), site.rules)
        referral_id = await start(site, acknowledgements, submission, consent_language=lang)
    except SubmissionRefused as refused:
        errors = localized_errors(refused.errors, lang)
        return render_form(site, request, lang, values, errors, fix, 422)
    except DuplicateReferral as duplicate:
        errors = {"prospect.website": duplicate_message(duplicate, lang)}
        refusal = receipt_shown(duplicate.receipt)
        return render_form(site, request, lang, values, errors, fix, 409, refusal=refusal)
    except TooManyForAddress as limited:
        problem = _(
            "Too many referrals were sent for this email address in a short time. What "
            "you typed is kept; please send it again later."
        )
        response = render_form(site, request, lang, values, problem=problem, status=429)
        response.headers["Retry-After"] = str(limited.retry_after)
        return response
    except (RuntimeError, RPCError, OSError):
        problem = _(
            "The service is briefly unavailable. What you typed is kept; please try again shortly."
        )
        return render_form(site, request, lang, values, problem=problem, status=503)
    token = status_token(referral_id, site.key)
    return RedirectResponse(f"/confirmation/{token}?lang={lang}", status_code=303)


async def referral_page(
    site: Site,
    request: Request,
    token: str,
    template: str,
    extra: Callable[[ReferralState, str], dict[str, Any]],
) -> Response:
    """A page about one referral, in the referrer's language unless `?lang=` says else."""
    referral_id = referral_from_token(token, site.key)
    state = (
        None
        if referral_id is None
        else await asyncio.to_thread(load_referral, site.engine, referral_id)
    )
    if state is None:
        return site.render(request, "not_found.html", pick_language(request), 404)
    lang = pick_language(request) if "lang" in request.query_params else state.referrer.language
    response = site.render(request, template, lang, state=state, **extra(state, lang))
    # One referral's details, behind a secret link: never kept by a shared cache.
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/confirmation/{token}", response_class=HTMLResponse, include_in_schema=False)
async def confirmation(request: Request, site: SiteDep, token: str) -> Response:
    """With the registration's receipt, to download at once."""
    link = f"{site.settings.public_url}/status/{token}"
    shown = receipt_shown(await _referrer_copy(site, token))
    if shown is not None:
        shown["download"] = f"/status/{token}/receipt"
    return await referral_page(
        site,
        request,
        token,
        "confirmation.html",
        lambda state, lang: {"status_link": link, "receipt": shown},
    )


@router.get("/status/{token}/receipt", include_in_schema=False)
async def receipt_download(site: SiteDep, token: str) -> Response:
    """The referrer's copy of the registration's receipt, the file the email attaches."""
    copy = await _referrer_copy(site, token)
    if copy is None:
        return JSONResponse({"detail": "no receipt"}, status_code=404)
    return Response(
        json.dumps(copy, indent=2, ensure_ascii=False) + "\n",
        media_type="application/json",
        headers={
            "Content-Disposition": f'attachment; filename="receipt-{copy["seq"]}.json"',
            "Cache-Control": "no-store",
        },
    )


async def _referrer_copy(site: Site, token: str) -> dict[str, Any] | None:
    referral_id = referral_from_token(token, site.key)
    if referral_id is None:
        return None
    return await asyncio.to_thread(referrer_copy, site.engine, referral_id)


@router.get("/status/{token}", response_class=HTMLResponse, include_in_schema=False)
async def status_page(request: Request, site: SiteDep, token: str) -> Response:
    return await referral_page(site, request, token, "status.html", status_words)


@router.post(
    "/api/referrals",
    status_code=201,
    response_model=ReferralCreated,
    responses={
        409: {"model": ApiRefusal, "description": "the prospect already has an open referral"},
        413: {"model": ApiRefusal, "description": "request body over 64 KiB"},
        415: {"model": ApiRefusal, "description": "the body is not application/json"},
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
async def api_submit(request: Request, site: SiteDep, acknowledgements: Acknowledgements) -> Any:
    """Body: the submission of DESIGN.md section 4 (the `Submission` schema)."""

    def refused(
        status: int,
        detail: str,
        errors: list[FieldError],
        receipt: dict[str, Any] | None = None,
    ) -> JSONResponse:
        body = ApiRefusal(
            detail=detail,
            errors=[ApiError(field=e.field, code=e.code, message=e.message) for e in errors],
            receipt=receipt,
        )
        return JSONResponse(body.model_dump(exclude_none=True), status_code=status)

    retry = site.over_limit(request)
    if retry is not None:
        wait = f"try again in {retry['Retry-After']} seconds"
        limited = refused(
            429,
            f"too many submissions from this address; {wait}",
            [FieldError("body", f"rate limit reached; {wait}", "rate_limited")],
        )
        limited.headers.update(retry)
        return limited
    # A browser posts text/plain across sites without asking (no CORS preflight): only
    # a JSON body, which a foreign page cannot send unasked, starts a referral.
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        return refused(
            415,
            "the body must be sent as application/json",
            [FieldError("body", "Content-Type must be application/json", "media_type")],
        )
    not_an_object = FieldError("body", "the body must be a JSON object", "invalid_json")
    try:
        data = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        data = None
    if not isinstance(data, dict):
        return refused(422, "the body must be a JSON object", [not_an_object])
    try:
        referral_id = await start(site, acknowledgements, parse_submission(data, site.rules))
    except SubmissionRefused as error:
        return refused(422, "invalid submission", error.errors)
    except TooManyForAddress as limited:
        wait = f"try again in {limited.retry_after} seconds"
        too_many = refused(
            429,
            f"too many submissions for this referrer address; {wait}",
            [FieldError("referrer.email", f"rate limit reached; {wait}", "rate_limited")],
        )
        too_many.headers["Retry-After"] = str(limited.retry_after)
        return too_many
    except DuplicateReferral as duplicate:
        message = duplicate_message(duplicate, "en")
        return refused(
            409,
            f"prospect {duplicate.domain} already has an open referral",
            [FieldError("prospect.website", message, "duplicate")],
            duplicate.receipt,
        )
    except (RuntimeError, RPCError, OSError):
        return refused(503, "the referral service is unavailable; try again shortly", [])
    token = status_token(referral_id, site.key)
    return ReferralCreated(
        referral_id=referral_id, status_url=f"{site.settings.public_url}/status/{token}"
    )
