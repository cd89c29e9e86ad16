"""The staff desk's pages: every referral (`/staff/referrals`: filtered, paged, and as CSV)
and one referral's file (`/staff/referrals/{id}`). Read from the database (starter/desk.py):
they answer with no worker running and after a workflow is gone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Annotated
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from activities.i18n import N_, translations
from core.settings import Settings
from starter.desk import (
    FilterError,
    ReferralFilters,
    list_referrals,
    matching_referrals,
    referral_file,
    referrals_csv,
)
from starter.web.deps import Language, SiteDep
from starter.web.signin import PRIVATE, STAFF, StaffEmail, sign_in_page, sign_out_token
from starter.web.site import Site
from workflows.models import Stage

LIST = f"{STAFF.home}/referrals"
STAGES = list(Stage)
# What staff pages (these and the dashboard) call each stage.
STAGE_LABELS = {
    Stage.SUBMITTED: N_("Submitted"),
    Stage.CONTACTED: N_("Contacted"),
    Stage.QUALIFYING: N_("Accepted (qualifying)"),
    Stage.APPROVED: N_("Approved"),
    Stage.WON: N_("Won"),
    Stage.COMMISSION_PAYABLE: N_("Commission payable"),
    Stage.COMMISSION_PAID: N_("Commission paid"),
    Stage.DECLINED: N_("Declined"),
    Stage.REJECTED: N_("Rejected"),
    Stage.LOST: N_("Lost"),
    Stage.EXPIRED: N_("Expired"),
    Stage.CANCELLED: N_("Cancelled"),
}


def temporal_ui_links(settings: Settings) -> Callable[[str], str]:
    """Each referral's workflow (its id is the referral id) in the Temporal UI
    (REFERRALS_TEMPORAL_UI_URL, in the settings' namespace)."""
    base, namespace = settings.temporal_ui_url, quote(settings.namespace, safe="")
    workflows = f"{base}/namespaces/{namespace}/workflows/"
    return lambda referral_id: workflows + quote(referral_id, safe="")


def desk_clock(request: Request) -> Callable[[], datetime]:
    """When "now" is (the dashboard's clock, which tests pin): protections ending within N
    days and breached deadlines depend on it."""
    clock: Callable[[], datetime] = request.app.state.staff_clock
    return clock


Clock = Annotated[Callable[[], datetime], Depends(desk_clock)]
router = APIRouter(include_in_schema=False)


def asked_filters(request: Request) -> tuple[ReferralFilters, dict[str, str]]:
    """The filters of the query string, and what was wrong with any (those are ignored)."""
    try:
        return ReferralFilters.from_query(request.query_params), {}
    except FilterError as error:
        return error.valid, error.errors


def asked_page(request: Request) -> int:
    page = request.query_params.get("page", "1")
    return int(page) if page.isdigit() and int(page) > 0 else 1


def list_url(filters: ReferralFilters, lang: str, page: int | None = None) -> str:
    query = filters.query_string()
    extra = urlencode({"lang": lang} | ({"page": str(page)} if page else {}))
    return f"{LIST}?{query}&{extra}" if query else f"{LIST}?{extra}"


def stage_label(lang: str) -> Callable[[Stage | str], str]:
    gettext = translations(lang).gettext
    return lambda stage: gettext(STAGE_LABELS[Stage(stage)])


def zone_of(site: Site) -> ZoneInfo:
    return ZoneInfo(site.rules.calendar.timezone)


@router.get(LIST, response_class=HTMLResponse)
async def referral_list(
    request: Request, site: SiteDep, lang: Language, email: StaffEmail, clock: Clock
) -> Response:
    """The sign-in form, or one page of the referrals the filters keep, newest first."""
    if email is None:
        return sign_in_page(request, site, STAFF, lang)
    filters, problems = asked_filters(request)
    page = await asyncio.to_thread(
        list_referrals, site.engine, filters, asked_page(request),
        now=clock(), zone=zone_of(site),
    )  # fmt: skip
    response = site.render(
        request,
        "staff_referrals.html",
        lang,
        home=STAFF.home,
        sign_out_csrf=sign_out_token(request, site, STAFF),
        email=email,
        filters=filters,
        problems=problems,
        listing=page,
        stages=STAGES,
        stage_label=stage_label(lang),
        page_url=lambda number: list_url(filters, lang, number),
        csv_url=f"{LIST}.csv?{filters.query_string()}",
        switch_url=list_url(filters, "en" if lang == "fr" else "fr", page.page),
    )
    response.headers.update(PRIVATE)
    return response


@router.get(f"{LIST}.csv")
async def referral_list_csv(
    request: Request, site: SiteDep, lang: Language, email: StaffEmail, clock: Clock
) -> Response:
    """Every referral the filters keep (not one page), as the list shows them."""
    if email is None:
        return RedirectResponse(f"{LIST}?lang={lang}", status_code=303)
    filters, _ = asked_filters(request)
    now = clock()

    def everything() -> str:
        return referrals_csv(matching_referrals(site.engine, filters, now=now, zone=zone_of(site)))

    day = now.astimezone(zone_of(site)).date().isoformat()
    return Response(
        await asyncio.to_thread(everything),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="referrals-{day}.csv"',
            **PRIVATE,
        },
    )


@router.get(f"{LIST}/{{referral_id}}", response_class=HTMLResponse)
async def referral_page(
    request: Request, site: SiteDep, lang: Language, email: StaffEmail, referral_id: str
) -> Response:
    """One referral's file: its facts, timeline, emails, ledger lines and webhook messages."""
    if email is None:
        return sign_in_page(request, site, STAFF, lang)
    found = await asyncio.to_thread(referral_file, site.engine, referral_id)
    if found is None:
        response = site.render(request, "not_found.html", lang, 404)
    else:
        response = site.render(
            request,
            "staff_referral.html",
            lang,
            home=STAFF.home,
            sign_out_csrf=sign_out_token(request, site, STAFF),
            email=email,
            file=found,
            state=found.state,
            zone=zone_of(site),
            stage_label=stage_label(lang),
            list_url=f"{LIST}?lang={lang}",
            workflow_url=temporal_ui_links(site.settings)(found.workflow_id),
            switch_url=f"{LIST}/{referral_id}?lang={'en' if lang == 'fr' else 'fr'}",
        )
    response.headers.update(PRIVATE)
    return response
