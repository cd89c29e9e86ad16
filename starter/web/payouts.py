"""The staff area's payout runs (`/staff/payouts`): every run with its totals and its items
held by reason, and each run's page (`/staff/payouts/{run}`) with its items, its documents
and a form for each step its status allows, applied as the CLI applies it (the same update,
request id and checks), signed for the signed-in member of staff (docs/payouts.md). Read
from the database; finance and managers only."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from activities.db import PayoutItemRow, PayoutRunRow
from activities.i18n import N_, translations
from activities.payouts import documents, load_run
from core.roles import Task, may, refusal, roles_of
from starter.actions import Refused
from starter.payouts import act_on_run
from starter.web.deps import FormLanguage, Language, PostedForm, SiteDep, csrf_checked
from starter.web.signin import PRIVATE, STAFF, StaffEmail, sign_in_page, signed_in_page
from starter.web.site import Site
from workflows.models.values import round_money
from workflows.payouts import (
    NEEDS,
    HoldReason,
    RunAction,
    RunRequest,
    RunState,
    payout_referral,
    payout_requests,
)

PAGE = f"{STAFF.home}/payouts"
CSRF_COOKIE = "referrals_payouts"
RunsCsrf = Annotated[bool, Depends(csrf_checked(CSRF_COOKIE))]
# The form fields of each step (beside the request id): the item's payee, and what it needs.
STEP_FIELDS: dict[RunAction, tuple[str, ...]] = {
    RunAction.APPROVE: (),
    RunAction.EXCLUDE: ("payee_email", "reason"),
    RunAction.INCLUDE: ("payee_email", "reason"),
    RunAction.EXPORT: ("execution_date",),
    RunAction.MARK_SENT: (),
    RunAction.FAIL: ("payee_email", "code", "reason"),
    RunAction.CONFIRM: (),
    RunAction.CANCEL: ("reason",),
}
# What staff pages call each hold (the portal words them for the referrer).
HOLD_LABELS = {
    HoldReason.NO_PROFILE: N_("no payee profile"),
    HoldReason.NO_MANDATE: N_("no self-billing mandate"),
    HoldReason.INVALID_BANK_DETAILS: N_("invalid bank details"),
    HoldReason.BANK_REJECTED: N_("rejected by the bank"),
    HoldReason.SHARED_IBAN: N_("IBAN shared with another payee"),
    HoldReason.IBAN_COOLDOWN: N_("IBAN changed recently"),
    HoldReason.NEGATIVE_BALANCE: N_("negative balance"),
    HoldReason.BELOW_MINIMUM: N_("below the minimum"),
}
router = APIRouter()


def hold_label(lang: str) -> Callable[[HoldReason | str], str]:
    gettext = translations(lang).gettext
    return lambda reason: gettext(HOLD_LABELS[HoldReason(reason)])


@dataclass(frozen=True)
class RunLine:
    """One run as finance scans it: what it pays, and what it holds back and why."""

    run: PayoutRunRow
    total: Decimal
    paid_items: int
    held_items: int
    excluded_items: int
    held_by_reason: dict[str, Decimal]


def run_lines(engine: Engine) -> list[RunLine]:
    with Session(engine) as session:
        runs = list(
            session.exec(select(PayoutRunRow).order_by(col(PayoutRunRow.created_at).desc()))
        )
        items: dict[str, list[PayoutItemRow]] = defaultdict(list)
        for item in session.exec(select(PayoutItemRow)):
            items[item.run_id].append(item)
    lines = []
    for run in runs:
        counts = Counter(item.status for item in items[run.run_id])
        held: dict[str, Decimal] = defaultdict(Decimal)
        for item in items[run.run_id]:
            if item.status == "held":
                for reason in item.holds.split(","):
                    held[reason] += item.net
        lines.append(
            RunLine(
                run,
                round_money(run.total, run.currency),
                counts["included"],
                counts["held"],
                counts["excluded"],
                {reason: round_money(amount, run.currency) for reason, amount in held.items()},
            )
        )
    return lines


@router.get(PAGE, response_class=HTMLResponse, include_in_schema=False)
async def payout_runs(
    request: Request, site: SiteDep, lang: Language, email: StaffEmail
) -> Response:
    if email is None:
        return sign_in_page(request, site, STAFF, lang)
    roles = roles_of(site.rules.staff, email)
    if not may(roles, Task.PAYOUT_RUNS):
        return Response(refusal(Task.PAYOUT_RUNS), status_code=403, headers=PRIVATE)
    response = site.render(
        request,
        "staff_payouts.html",
        lang,
        **signed_in_page(request, site, STAFF),
        email=email,
        lines=await asyncio.to_thread(run_lines, site.engine),
        hold_label=hold_label(lang),
        switch_url=f"{PAGE}?lang={'en' if lang == 'fr' else 'fr'}",
    )
    response.headers.update(PRIVATE)
    return response


def _allowed(site: Site, email: str) -> Response | None:
    if may(roles_of(site.rules.staff, email), Task.PAYOUT_RUNS):
        return None
    return Response(refusal(Task.PAYOUT_RUNS), status_code=403, headers=PRIVATE)


def run_page(
    request: Request,
    site: Site,
    lang: str,
    email: str,
    state: RunState,
    status: int = 200,
    problem: str | None = None,
    typed: tuple[str, dict[str, str]] | None = None,
) -> Response:
    """`typed`: the step whose form was refused and what was typed in it, shown again."""
    steps = [action for action in RunAction if state.status in NEEDS[action]]
    response = site.render_with_csrf(
        request,
        CSRF_COOKIE,
        "staff_payout_run.html",
        lang,
        status,
        **signed_in_page(request, site, STAFF),
        email=email,
        run=state,
        files=documents(site.engine, state.run_id),
        steps=steps,
        hold_label=hold_label(lang),
        request_id=f"web-{uuid.uuid4().hex}",
        problem=problem,
        typed_step=typed[0] if typed else None,
        typed=typed[1] if typed else {},
        switch_url=f"{PAGE}/{quote(state.run_id)}?lang={'en' if lang == 'fr' else 'fr'}",
    )
    response.headers.update(PRIVATE)
    return response


@router.get(f"{PAGE}/{{run_id}}", response_class=HTMLResponse, include_in_schema=False)
async def payout_run(
    request: Request, site: SiteDep, lang: Language, email: StaffEmail, run_id: str
) -> Response:
    if email is None:
        return sign_in_page(request, site, STAFF, lang)
    if (refused := _allowed(site, email)) is not None:
        return refused
    state = await asyncio.to_thread(load_run, site.engine, run_id)
    if state is None:
        return site.render(request, "not_found.html", lang, 404)
    return run_page(request, site, lang, email, state)


@router.get(f"{PAGE}/{{run_id}}/files/{{filename}}", include_in_schema=False)
async def payout_file(
    site: SiteDep, lang: Language, email: StaffEmail, run_id: str, filename: str
) -> Response:
    if email is None:
        return RedirectResponse(f"{STAFF.home}?lang={lang}", status_code=303)
    if (refused := _allowed(site, email)) is not None:
        return refused
    found = [
        d for d in await asyncio.to_thread(documents, site.engine, run_id) if d.filename == filename
    ]
    if not found:
        return Response(status_code=404, headers=PRIVATE)
    return Response(
        found[0].content,
        media_type=found[0].media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"', **PRIVATE},
    )


@router.post(
    f"{PAGE}/{{run_id}}/actions/{{step}}", response_class=HTMLResponse, include_in_schema=False
)
async def payout_step(
    request: Request,
    site: SiteDep,
    lang: FormLanguage,
    email: StaffEmail,
    form: PostedForm,
    csrf_ok: RunsCsrf,
    run_id: str,
    step: str,
) -> Response:
    """Apply one step to the run as the signed-in member of staff: 303 back to the run when
    done; the run's page saying why otherwise (403 a stale form, 409 the run refused it, 503
    no worker answered: sending the same form again applies it once)."""
    if email is None:
        return sign_in_page(request, site, STAFF, lang, 403)
    if (refused := _allowed(site, email)) is not None:
        return refused
    state = await asyncio.to_thread(load_run, site.engine, run_id)
    if state is None or step not in set(RunAction):
        return site.render(request, "not_found.html", lang, 404)
    gettext = translations(lang).gettext
    action = RunAction(step)
    values = {name: (form.get(name) or "").strip() or None for name in STEP_FIELDS[action]}
    typed = (step, {name: value or "" for name, value in values.items()})
    if not csrf_ok:
        expired = gettext("This form had expired: check it and send it again.")
        return run_page(request, site, lang, email, state, 403, expired, typed)
    signer = site.settings.actor_signing_key
    payouts = []
    if action is RunAction.CONFIRM and signer is not None:
        payouts = [signer.sign(payout_referral(p), p) for p in payout_requests(state, email)]
    try:
        typed_day = values.get("execution_date")
        day = date.fromisoformat(typed_day) if typed_day else None
        request_id = form.get("request_id") or f"web-{uuid.uuid4().hex}"
        run_request = RunRequest(
            action=action,
            actor=email,
            request_id=request_id,
            payee_email=values.get("payee_email"),
            reason=values.get("reason"),
            code=values.get("code"),
            execution_date=day,
            payouts=payouts,
        )
        client = await site.temporal()
        await act_on_run(
            client, run_id, run_request, site.settings.cli_timeout_s, signer, site.engine
        )
    except ValueError:
        wrong = gettext("Check the value marked below: nothing was done.")
        return run_page(request, site, lang, email, state, 422, wrong, typed)
    except Refused as refused_step:
        now = await asyncio.to_thread(load_run, site.engine, run_id) or state
        return run_page(request, site, lang, email, now, 409, str(refused_step), typed)
    except RuntimeError:
        # Not sent, or sent and not answered: the same request again applies it once.
        away = gettext("Temporal cannot be reached just now.")
        kept = (step, {**typed[1], "request_id": request_id})
        return run_page(request, site, lang, email, state, 503, away, kept)
    return RedirectResponse(f"{PAGE}/{quote(run_id)}?lang={lang}", status_code=303)
