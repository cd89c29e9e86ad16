"""The staff area's payout runs (`/staff/payouts`): every run with its totals and its items
held by reason, from the database (docs/payouts.md). Finance and managers; runs are moved
with `referrals payouts …`."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from dataclasses import dataclass
from decimal import Decimal

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from activities.db import PayoutItemRow, PayoutRunRow
from core.roles import Task, may, refusal, roles_of
from starter.web.deps import Language, SiteDep
from starter.web.signin import PRIVATE, STAFF, StaffEmail, sign_in_page, signed_in_page
from workflows.models import round_money

PAGE = f"{STAFF.home}/payouts"
router = APIRouter()


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
        switch_url=f"{PAGE}?lang={'en' if lang == 'fr' else 'fr'}",
    )
    response.headers.update(PRIVATE)
    return response
