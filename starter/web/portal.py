"""The referrer portal (`/me`): a referrer signed in by emailed link (starter.web.signin) sees
every referral they submitted, with its key dates and commission, their commission totals per
currency, and can download it all as a CSV statement.

Reads only the system of record, in a few queries whatever the number of referrals: the
referrals, the dates of their applied events, and the ledger's sums per referral and per
currency (activities.ledger, the same sums as `referrals commissions --by-referrer`). An erased
referral is not listed: erasure replaces the referrer's address on its rows by a pseudonym.
"""

from __future__ import annotations

import asyncio
import csv
import io
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from activities.db import ReferralEventRow, ReferralRow, as_utc
from activities.ledger import Balance, balances, referral_balances
from activities.payees import load_payee
from activities.payouts import Outlook, issued_document, issued_to, payout_outlook
from activities.queries import list_referrals
from activities.receipts import registered_among
from core.links import Keys, status_token
from core.payees import PayeeProfile
from starter.spreadsheet import spreadsheet_text
from starter.web import payee
from starter.web.deps import Language, SiteDep
from starter.web.intake import STAGE_NAMES
from starter.web.signin import (
    PRIVATE,
    REFERRER,
    ReferrerEmail,
    add_sign_in_routes,
    sign_in_page,
    signed_in_page,
)
from starter.web.site import Site
from workflows.models.program import PayoutRules
from workflows.models.referral import ReferralState
from workflows.models.values import round_money

# The history actions whose (applied) date the portal shows beside the submission date.
DATED_ACTIONS = ("contacted", "won")
STATEMENT_COLUMNS = [
    "reference",
    "submitted",
    "prospect",
    "product",
    "stage",
    "contacted",
    "protected_until",
    "won",
    "commission",
    "currency",
    "commission_status",
    "paid",
    "clawed_back",
]
TOTAL_COLUMNS = ["total", "currency", "earned", "payable", "paid", "clawed_back"]


@dataclass(frozen=True)
class StatementRow:
    """One referral as its referrer sees it; days are local dates in the program's zone."""

    referral_id: str
    status_token: str
    prospect: str
    product: str
    stage: str
    submitted: date
    contacted: date | None
    protected_until: date | None  # the last protected day, while the protection runs
    won: date | None
    commission: Decimal | None
    currency: str | None
    commission_status: str | None
    paid: Decimal
    clawed_back: Decimal
    # A payable commission: when a payout run may pay it, or why it waits.
    payout: Outlook | None = None


@dataclass(frozen=True)
class Issued:
    """A statement or credit note issued to the referrer, to download."""

    number: str
    kind: str
    issued_on: date


@dataclass(frozen=True)
class Statement:
    """Every referral of one referrer, newest first, and their ledger totals per currency
    (`Balance`: earned, payable, paid, clawed back); how they are paid."""

    email: str
    rows: list[StatementRow]
    totals: list[Balance]
    payee: PayeeProfile | None = None
    issued: list[Issued] = field(default_factory=list)


def _event_dates(engine: Engine, email: str) -> dict[tuple[str, str], datetime]:
    """When each referral of `email` was contacted and won (the first applied entry)."""
    event = ReferralEventRow.__table__.c  # type: ignore[attr-defined]
    referral = ReferralRow.__table__.c  # type: ignore[attr-defined]
    mine = select(referral.referral_id).where(referral.referrer_email == email)
    query = (
        select(event.referral_id, event.action, func.min(event.at))
        .where(
            event.referral_id.in_(mine),
            event.action.in_(DATED_ACTIONS),
            event.outcome == "applied",
        )
        .group_by(event.referral_id, event.action)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return {(referral_id, action): as_utc(at) for referral_id, action, at in rows}


def referrer_statement(
    engine: Engine, key: Keys, zone: ZoneInfo, email: str, payouts: PayoutRules | None = None
) -> Statement:
    """`key` signs each referral's status link; `zone` (the program's) dates the days;
    `payouts`: the program's rules, to tell when a payable commission may be paid."""
    email = email.strip().lower()
    dates = _event_dates(engine, email)
    amounts = referral_balances(engine, email)
    now = datetime.now(UTC)
    outlook = payout_outlook(engine, payouts, zone, email, now) if payouts else {}

    def day(moment: datetime) -> date:
        return as_utc(moment).astimezone(zone).date()

    def day_of(referral_id: str, action: str) -> date | None:
        at = dates.get((referral_id, action))
        return day(at) if at else None

    rows = []
    for row in list_referrals(engine, referrer_email=email):
        state = ReferralState.model_validate_json(row.state)
        ends = state.protection_end
        ledger = amounts.get(row.referral_id)
        rows.append(
            StatementRow(
                referral_id=row.referral_id,
                status_token=status_token(row.referral_id, key),
                prospect=state.prospect.company,
                product=state.product_name,
                stage=row.stage,
                submitted=day(row.submitted_at),
                contacted=day_of(row.referral_id, "contacted"),
                # It ends at an instant; the day before a midnight end is the last one.
                protected_until=day(ends - timedelta(seconds=1)) if ends else None,
                won=day_of(row.referral_id, "won"),
                commission=row.commission_amount,
                currency=row.commission_currency,
                commission_status=row.commission_status,
                paid=ledger.paid if ledger else Decimal(0),
                clawed_back=ledger.clawed_back if ledger else Decimal(0),
                payout=outlook.get(row.referral_id),
            )
        )
    issued = [Issued(number, kind, day(at)) for number, kind, at in issued_to(engine, email)]
    return Statement(
        email, rows, balances(engine, referrer_email=email), load_payee(engine, email), issued
    )


def _amount(amount: Decimal | None, currency: str | None) -> str:
    return "" if amount is None or currency is None else str(round_money(amount, currency))


def statement_csv(statement: Statement) -> str:
    """One row per referral, then a blank row and the totals per currency. Stable column
    names and codes (stages and commission statuses as `referrals` prints them), ISO dates
    and plain decimal amounts, so a spreadsheet or a script reads it in any language; a BOM,
    so Excel takes it for UTF-8."""
    out = io.StringIO()
    out.write("\ufeff")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(STATEMENT_COLUMNS)
    for row in statement.rows:
        has_commission = row.commission is not None
        writer.writerow(
            [
                row.referral_id,
                row.submitted.isoformat(),
                spreadsheet_text(row.prospect),
                spreadsheet_text(row.product),
                row.stage,
                row.contacted.isoformat() if row.contacted else "",
                row.protected_until.isoformat() if row.protected_until else "",
                row.won.isoformat() if row.won else "",
                _amount(row.commission, row.currency),
                row.currency or "",
                row.commission_status or "",
                _amount(row.paid, row.currency) if has_commission else "",
                _amount(row.clawed_back, row.currency) if has_commission else "",
            ]
        )
    writer.writerow([])
    writer.writerow(TOTAL_COLUMNS)
    for total in statement.totals:
        currency = total.currency
        writer.writerow(
            [
                "total",
                currency,
                _amount(total.earned, currency),
                _amount(total.payable, currency),
                _amount(total.paid, currency),
                _amount(total.clawed_back, currency),
            ]
        )
    return out.getvalue()


def add_portal_routes(app: FastAPI, site: Site) -> None:
    add_sign_in_routes(app, site, REFERRER)
    app.include_router(router)
    app.include_router(payee.router)


router = APIRouter()


async def statement_of(site: Site, email: str) -> Statement:
    zone = ZoneInfo(site.rules.calendar.timezone)
    return await asyncio.to_thread(
        referrer_statement, site.engine, site.key, zone, email, site.rules.payouts
    )


@router.get(REFERRER.home, response_class=HTMLResponse, include_in_schema=False)
async def portal(request: Request, site: SiteDep, lang: Language, email: ReferrerEmail) -> Response:
    """The sign-in form, or the signed-in referrer's referrals and totals."""
    if email is None:
        return sign_in_page(request, site, REFERRER, lang)
    statement = await statement_of(site, email)
    ids = [row.referral_id for row in statement.rows]
    response = site.render(
        request,
        "portal.html",
        lang,
        **signed_in_page(request, site, REFERRER),
        statement=statement,
        stage_names=STAGE_NAMES,  # as the status page names them
        receipted=await asyncio.to_thread(registered_among, site.engine, ids),
    )
    response.headers.update(PRIVATE)
    return response


@router.get(f"{REFERRER.home}/statement.csv", include_in_schema=False)
async def statement_download(site: SiteDep, lang: Language, email: ReferrerEmail) -> Response:
    if email is None:
        return RedirectResponse(f"{REFERRER.home}?lang={lang}", status_code=303)
    today = datetime.now(ZoneInfo(site.rules.calendar.timezone)).date().isoformat()
    return Response(
        statement_csv(await statement_of(site, email)),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="referrals-statement-{today}.csv"',
            **PRIVATE,
        },
    )


@router.get(f"{REFERRER.home}/documents/{{number}}.pdf", include_in_schema=False)
async def issued_download(
    number: str, site: SiteDep, lang: Language, email: ReferrerEmail
) -> Response:
    """One of the referrer's own statements or credit notes, as issued."""
    if email is None:
        return RedirectResponse(f"{REFERRER.home}?lang={lang}", status_code=303)
    found = await asyncio.to_thread(issued_document, site.engine, email, number)
    if found is None:
        return Response(status_code=404, headers=PRIVATE)
    return Response(
        found.content,
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="{found.filename}"', **PRIVATE},
    )
