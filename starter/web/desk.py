"""The staff desk's pages: every referral (`/staff/referrals`: filtered, paged, and as CSV)
and one referral's file (`/staff/referrals/{id}`). Read from the database (starter/desk.py):
they answer with no worker running and after a workflow is gone.

The file also holds a form for each staff action the referral's stage and the member's roles
allow; `POST /staff/referrals/{id}/actions/{action}` applies it as the CLI does
(starter/actions.py: the same values, the same checks, the same `act` update), recorded as
the signed-in address. Each form carries a request id minted with the page: the update's id,
so a form sent twice (a double click, a retry after no worker answered) applies once."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from temporalio.service import RPCError, RPCStatusCode

from activities.i18n import N_, translations
from core.roles import may, refusal, roles_of
from core.settings import Settings
from starter.actions import (
    Field,
    InvalidValue,
    Kind,
    Problem,
    Refused,
    fields_of,
    staff_action,
)
from starter.desk import (
    FilterError,
    ReferralFile,
    ReferralFilters,
    list_referrals,
    matching_referrals,
    referral_file,
    referrals_csv,
)
from starter.staff_client import NotAnswered, send_action
from starter.web.deps import FormLanguage, Language, PostedForm, SiteDep, csrf_checked
from starter.web.signin import PRIVATE, STAFF, StaffEmail, sign_in_page, signed_in_page
from starter.web.site import Site
from workflows.models.ledger import CommissionStatus
from workflows.models.referral import Stage
from workflows.models.values import Action
from workflows.transitions import allowed_actions

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
COMMISSION_STATUS_LABELS = {
    CommissionStatus.PENDING: N_("Pending"),
    CommissionStatus.PAYABLE: N_("Payable"),
    CommissionStatus.PAID: N_("Paid"),
    CommissionStatus.VOID: N_("Void"),
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
        **signed_in_page(request, site, STAFF),
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


# The staff actions' forms: the cookie their CSRF tokens are tied to, what each button and
# field is called, and what a value the CLI would refuse is told.
DESK_CSRF = "referrals_desk"
DeskCsrf = Annotated[bool, Depends(csrf_checked(DESK_CSRF))]
ACTION_LABELS = {
    Action.CONTACTED: N_("Referrer contacted"),
    Action.ACCEPT: N_("Accept"),
    Action.DECLINE: N_("Decline"),
    Action.APPROVE: N_("Approve"),
    Action.REJECT: N_("Reject"),
    Action.WON: N_("Deal won"),
    Action.LOST: N_("Deal lost"),
    Action.PAYMENT: N_("Record a customer payment"),
    Action.PAYOUT: N_("Commission paid out"),
    Action.CANCEL: N_("Cancel the referral"),
    Action.EXTEND: N_("Extend the protection"),
    Action.REFUND: N_("Record a refund or credit note"),
}
FIELD_LABELS = {
    "note": N_("Note (optional)"),
    "reason": N_("Reason"),
    "amount": N_("Amount"),
    "currency": N_("Currency (ISO 4217, e.g. EUR)"),
    "payment_terms_days": N_("Payment terms in days (optional: the program's)"),
    "reference": N_("Reference"),
    "days": N_("Days the protection gains (1 to 365)"),
}
AMOUNT_LABELS = {
    Action.WON: N_("First-year subscription value"),
    Action.PAYMENT: N_("Amount paid"),
    Action.REFUND: N_("Amount refunded"),
}
PROBLEMS = {
    Problem.REQUIRED: N_("Required."),
    Problem.DECIMAL: N_("A decimal number, like 1234.50."),
    Problem.FINITE: N_("A finite decimal number, like 1234.50."),
    Problem.INTEGER: N_("A whole number, like 30."),
}
# A request id from a form is the update's id: kept only if it looks like one we mint.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,80}")


def new_request_id() -> str:
    return f"web-{uuid.uuid4()}"


@dataclass
class FormField:
    name: str
    label: str
    required: bool
    kind: Kind
    value: str = ""
    error: str | None = None


@dataclass
class ActionForm:
    """One action's form as the page shows it: its fields, with what was typed and what was
    wrong when it comes back, and the request id it sends."""

    action: Action
    label: str
    url: str
    request_id: str
    fields: list[FormField] = field(default_factory=list)
    posted: bool = False  # the form just sent, shown again


def action_form(
    action: Action,
    referral_id: str,
    lang: str,
    *,
    request_id: str | None = None,
    typed: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None,
    defaults: Mapping[str, str] | None = None,
    currency: str | None = None,
) -> ActionForm:
    """`currency`: the deal's, which a payment or refund amount is in."""
    gettext = translations(lang).gettext

    def label(spec: Field) -> str:
        if spec.name == "amount" and action in AMOUNT_LABELS:
            text = gettext(AMOUNT_LABELS[action])
            return f"{text} ({currency})" if currency and action is not Action.WON else text
        return gettext(FIELD_LABELS[spec.name])

    values = typed if typed is not None else (defaults or {})
    return ActionForm(
        action=action,
        label=gettext(ACTION_LABELS[action]),
        url=f"{LIST}/{quote(referral_id, safe='')}/actions/{action.value}",
        request_id=request_id or new_request_id(),
        fields=[
            FormField(
                spec.name,
                label(spec),
                spec.required,
                spec.kind,
                values.get(spec.name, ""),
                (errors or {}).get(spec.name),
            )
            for spec in fields_of(action)
        ],
        posted=typed is not None,
    )


def action_forms(
    site: Site, email: str, found: ReferralFile, lang: str, posted: ActionForm | None = None
) -> list[ActionForm]:
    """A form for each action the stage allows and the member's roles too; the form just
    sent first (even if the stage no longer allows it: what was typed stays)."""
    roles = roles_of(site.rules.staff, email)
    state = found.state
    defaults = {"currency": site.rules.commission_for(state.opportunity.product).currency}
    currency = state.commission.currency if state.commission else None
    forms = [posted] if posted is not None else []
    for action in allowed_actions(state):
        if may(roles, action) and (posted is None or action is not posted.action):
            forms.append(
                action_form(action, found.referral_id, lang, defaults=defaults, currency=currency)
            )
    return forms


def file_page(
    request: Request,
    site: Site,
    lang: str,
    email: str,
    found: ReferralFile,
    status: int = 200,
    *,
    posted: ActionForm | None = None,
    problem: str | None = None,
    retry: bool = False,
) -> HTMLResponse:
    """The referral's file; `problem` says why a form came back, `retry` that sending it
    again (with the same request id) is safe."""
    referral_id = found.referral_id
    response = site.render_with_csrf(
        request,
        DESK_CSRF,
        "staff_referral.html",
        lang,
        status,
        **signed_in_page(request, site, STAFF),
        email=email,
        file=found,
        state=found.state,
        zone=zone_of(site),
        stage_label=stage_label(lang),
        commission_status=COMMISSION_STATUS_LABELS,
        list_url=f"{LIST}?lang={lang}",
        workflow_url=temporal_ui_links(site.settings)(found.workflow_id),
        switch_url=f"{LIST}/{quote(referral_id, safe='')}?lang={'en' if lang == 'fr' else 'fr'}",
        forms=action_forms(site, email, found, lang, posted),
        problem=problem,
        retry=retry,
    )
    response.headers.update(PRIVATE)
    return response


@router.get(f"{LIST}/{{referral_id}}", response_class=HTMLResponse)
async def referral_page(
    request: Request, site: SiteDep, lang: Language, email: StaffEmail, referral_id: str
) -> Response:
    """One referral's file: its facts, timeline, emails, ledger lines and webhook messages,
    and the actions the member may take now."""
    if email is None:
        return sign_in_page(request, site, STAFF, lang)
    found = await asyncio.to_thread(referral_file, site.engine, referral_id)
    if found is None:
        response = site.render(request, "not_found.html", lang, 404)
        response.headers.update(PRIVATE)
        return response
    return file_page(request, site, lang, email, found)


@router.post(f"{LIST}/{{referral_id}}/actions/{{action_name}}", response_class=HTMLResponse)
async def referral_action(
    request: Request,
    site: SiteDep,
    lang: FormLanguage,
    email: StaffEmail,
    form: PostedForm,
    csrf_ok: DeskCsrf,
    referral_id: str,
    action_name: str,
) -> Response:
    """Apply one staff action, recorded as the signed-in address: 303 back to the file when
    done; otherwise the file again, the form as it was typed, saying why: 403 (the form's
    token, or a role that may not: nothing is sent), 422 (a value the CLI would refuse:
    nothing is sent), 409 (the workflow refuses: its one-line reason), 503 (no worker
    answered in time: the form keeps its request id, so sending it again applies once)."""
    if email is None:
        return sign_in_page(request, site, STAFF, lang, 403)
    found = await asyncio.to_thread(referral_file, site.engine, referral_id)
    if found is None or action_name not in set(Action):
        response = site.render(request, "not_found.html", lang, 404)
        response.headers.update(PRIVATE)
        return response
    action = Action(action_name)
    gettext = translations(lang).gettext
    typed = {spec.name: form.get(spec.name, "") for spec in fields_of(action)}
    asked_id = form.get("request_id", "")
    request_id = asked_id if REQUEST_ID.fullmatch(asked_id) else new_request_id()

    async def again(
        status: int,
        problem: str,
        *,
        errors: Mapping[str, str] | None = None,
        same_request: bool = True,
        retry: bool = False,
    ) -> HTMLResponse:
        """The file as it is now (the workflow may have moved on), the form as it came."""
        now = await asyncio.to_thread(referral_file, site.engine, referral_id) or found
        assert now is not None
        posted = action_form(
            action, referral_id, lang, typed=typed, errors=errors,
            request_id=request_id if same_request else None,
            currency=now.state.commission.currency if now.state.commission else None,
        )  # fmt: skip
        shown = posted if may(roles_of(site.rules.staff, email), action) else None
        return file_page(
            request, site, lang, email, now, status, posted=shown, problem=problem, retry=retry
        )

    if not csrf_ok:
        return await again(403, gettext("This form had expired: check it and send it again."))
    if not may(roles_of(site.rules.staff, email), action):
        return await again(403, refusal(action, gettext))
    try:
        staff_request = staff_action(
            action,
            {name: value.strip() or None for name, value in typed.items()},
            actor=email,
            request_id=request_id,
        )
    except InvalidValue as invalid:
        return await again(
            422,
            gettext("Check the value marked below: nothing was done."),
            errors={invalid.field: gettext(PROBLEMS[invalid.problem])},
        )
    seconds = site.settings.cli_timeout_s
    try:
        client = await site.temporal()
        await send_action(
            client,
            referral_id,
            staff_request,
            seconds,
            site.engine,
            site.settings.actor_signing_key,
        )
    except NotAnswered as late:
        text = (
            N_("A worker took the action but it was not recorded within {seconds} s.")
            if late.accepted
            else N_("No worker answered within {seconds} s.")
        )
        return await again(503, gettext(text).format(seconds=f"{late.seconds:g}"), retry=True)
    except RuntimeError:  # the client could not connect
        return await again(503, gettext("Temporal cannot be reached just now."), retry=True)
    except RPCError as error:
        if error.status not in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
            raise
        return await again(503, gettext("Temporal cannot be reached just now."), retry=True)
    except Refused as refused:
        # Nothing was applied: the next try, whatever is changed, is a new request.
        return await again(409, str(refused), same_request=False)
    return RedirectResponse(
        f"{LIST}/{quote(referral_id, safe='')}?lang={lang}#timeline", status_code=303
    )
