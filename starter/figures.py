"""The program's figures, for staff: the funnel, time in each stage, the contact promise,
protections about to end, commission owed and the top referrers.

Read from the system of record (`referral`, `referral_event`, `commission`, `commission_line`)
and aggregated by the database with portable SQL (SQLite and PostgreSQL alike), so the
dashboard and `referrals report` answer without a worker and after Temporal has forgotten a
referral. docs/dashboard.md defines each figure; the docstrings below say the same briefly.

Every figure covers the *selected* referrals: those submitted on or after `since` (a date in
the program's time zone) and of `product`, when given.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel
from sqlalchemy import Float, and_, case, distinct, func, literal, select, union_all
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement, Select
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from activities.db import (
    CommissionEvent,
    CommissionLineRow,
    CommissionRow,
    ReferralEventRow,
    ReferralRow,
    as_utc,
)
from workflows.models.ledger import ENTITLEMENT_KINDS, CommissionStatus, LineKind
from workflows.models.program import ProgramRules
from workflows.models.referral import PROTECTING_STAGES, Stage
from workflows.models.values import round_money

# The funnel's steps, in order: a referral counts at a step once its event log reached it.
FUNNEL: list[Stage] = [
    Stage.SUBMITTED,
    Stage.CONTACTED,
    Stage.QUALIFYING,
    Stage.APPROVED,
    Stage.WON,
    Stage.COMMISSION_PAYABLE,
    Stage.COMMISSION_PAID,
]
# Where a referral leaves the program without a commission.
ENDED: list[Stage] = [Stage.DECLINED, Stage.REJECTED, Stage.LOST, Stage.EXPIRED, Stage.CANCELLED]
# The stages a referral leaves by a stage change, so a time can be measured in them.
TIMED: list[Stage] = FUNNEL[:-1]
# The history action by which a referral enters each stage. `commission_payable` has none of
# its own (the `payment` that completes it looks like any other): its ledger `payable` line
# marks it.
ENTERED_BY: dict[str, Stage] = {
    "submitted": Stage.SUBMITTED,
    "contacted": Stage.CONTACTED,
    "accept": Stage.QUALIFYING,
    "approve": Stage.APPROVED,
    "won": Stage.WON,
    "payout": Stage.COMMISSION_PAID,
    "decline": Stage.DECLINED,
    "reject": Stage.REJECTED,
    "lost": Stage.LOST,
    "cancel": Stage.CANCELLED,
    "expire": Stage.EXPIRED,
}
# The ledger lines that sum to what a referrer earned (accrual, clawback, void).
ENTITLEMENT: list[str] = sorted(kind.value for kind in ENTITLEMENT_KINDS)
EXPIRING_WITHIN = timedelta(days=30)
TOP = 10
SHARE = Decimal("0.0001")
DAYS = Decimal("0.01")
SECONDS_PER_DAY = 86400

_referral: Any = ReferralRow.__table__  # type: ignore[attr-defined]
_event: Any = ReferralEventRow.__table__  # type: ignore[attr-defined]
_commission: Any = CommissionRow.__table__  # type: ignore[attr-defined]
_line: Any = CommissionLineRow.__table__  # type: ignore[attr-defined]
_commission_event: Any = CommissionEvent.__table__  # type: ignore[attr-defined]


# --- the figures --------------------------------------------------------------------------


class FunnelStep(BaseModel):
    stage: Stage
    referrals: int
    # Share of the previous step's referrals that reached this one (None: first step, or
    # nobody reached the previous one).
    conversion: Decimal | None


class StageCount(BaseModel):
    stage: Stage
    referrals: int


class StageTime(BaseModel):
    """Time spent in a stage by the referrals that have left it (those still in it are not
    counted: their time is not known yet)."""

    stage: Stage
    referrals: int
    median_days: Decimal | None
    p90_days: Decimal | None


class ContactBreach(BaseModel):
    referral_id: str
    product: str
    prospect_company: str
    stage: Stage
    contact_deadline: datetime


class ContactCompliance(BaseModel):
    """The promise to contact the referrer within the business days of program.yaml."""

    contacted: int
    before_reminder: int
    before_deadline: int
    before_reminder_share: Decimal | None
    before_deadline_share: Decimal | None
    month: str
    breaches: list[ContactBreach]


class ExpiringProtection(BaseModel):
    referral_id: str
    product: str
    prospect_company: str
    stage: Stage
    protected_until: datetime


class CommissionMonth(BaseModel):
    """Net commission (accruals less clawbacks and voids) of the referrals won in `month`,
    by the commission's status now."""

    month: str
    currency: str
    pending: Decimal
    payable: Decimal
    paid: Decimal


class TopReferrer(BaseModel):
    referrer_email: str
    referrals: int
    won: int


class TopEarner(BaseModel):
    referrer_email: str
    currency: str
    earned: Decimal


class ProgramFigures(BaseModel):
    generated_at: datetime
    timezone: str
    since: date | None
    product: str | None
    referrals: int
    funnel: list[FunnelStep]
    ended: list[StageCount]
    time_in_stage: list[StageTime]
    contact: ContactCompliance
    expiring_protections: list[ExpiringProtection]
    commission_by_month: list[CommissionMonth]
    top_referrers: list[TopReferrer]
    top_earners: list[TopEarner]


# --- portable SQL -------------------------------------------------------------------------


class epoch_seconds(FunctionElement[float]):
    """Seconds since 1970 of an instant, a timestamp column or ISO 8601 text: instants
    compare and subtract the same way on SQLite (julianday) and PostgreSQL (EXTRACT)."""

    type = Float()
    name = "epoch_seconds"
    inherit_cache = True


@compiles(epoch_seconds, "sqlite")
def _epoch_seconds_sqlite(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    return f"((julianday({compiler.process(element.clauses, **kw)}) - 2440587.5) * 86400.0)"


@compiles(epoch_seconds, "postgresql")
def _epoch_seconds_postgresql(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    instant = compiler.process(element.clauses, **kw)
    return f"EXTRACT(EPOCH FROM CAST({instant} AS TIMESTAMP WITH TIME ZONE))"


class state_field(FunctionElement[str]):
    """One top-level field of the `referral.state` JSON text, as text."""

    name = "state_field"
    inherit_cache = True


@compiles(state_field, "sqlite")
def _state_field_sqlite(element: state_field, compiler: SQLCompiler, **kw: Any) -> str:
    column, key = list(element.clauses)
    return f"json_extract({compiler.process(column, **kw)}, '$.' || {compiler.process(key, **kw)})"


@compiles(state_field, "postgresql")
def _state_field_postgresql(element: state_field, compiler: SQLCompiler, **kw: Any) -> str:
    column, key = list(element.clauses)
    return f"(CAST({compiler.process(column, **kw)} AS JSON) ->> {compiler.process(key, **kw)})"


def _utc(moment: datetime) -> datetime:
    """Bound as UTC: SQLite stores instants as UTC text without their zone."""
    return moment.astimezone(UTC)


def day_start(day: date, zone: ZoneInfo) -> datetime:
    """00:00 of `day` in the program's zone: where "submitted since" a day begins."""
    return datetime.combine(day, time(0), tzinfo=zone)


def _month_start(moment: datetime, zone: ZoneInfo) -> datetime:
    local = moment.astimezone(zone)
    return datetime.combine(local.date().replace(day=1), time(0), tzinfo=zone)


def _next_month(start: datetime) -> datetime:
    after = (start.date().replace(day=28) + timedelta(days=4)).replace(day=1)
    return datetime.combine(after, time(0), tzinfo=start.tzinfo)


def _share(part: int, whole: int) -> Decimal | None:
    if not whole:
        return None
    return (Decimal(part) / Decimal(whole)).quantize(SHARE, rounding=ROUND_HALF_UP)


def percentile(ordered: list[int], fraction: Decimal) -> Decimal:
    """The `fraction` percentile of ascending values, interpolated linearly between the two
    closest ranks (PostgreSQL's percentile_cont, Excel's PERCENTILE.INC): the median of
    1, 2, 3, 4 is 2.5."""
    position = (len(ordered) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def _days(seconds: Decimal) -> Decimal:
    return (seconds / SECONDS_PER_DAY).quantize(DAYS, rounding=ROUND_HALF_UP)


class _Selection:
    """The referrals a report covers, and the SQL that picks them."""

    def __init__(self, zone: ZoneInfo, since: date | None, product: str | None) -> None:
        self.conditions: list[ColumnElement[bool]] = []
        if since is not None:
            self.conditions.append(_referral.c.submitted_at >= _utc(day_start(since, zone)))
        if product is not None:
            self.conditions.append(_referral.c.product == product)

    def joined(self, query: Select[Any], referral_id: ColumnElement[str]) -> Select[Any]:
        """`query` limited to the selected referrals, joined on `referral_id`."""
        return query.join(_referral, _referral.c.referral_id == referral_id).where(*self.conditions)

    def of(self, query: Select[Any]) -> Select[Any]:
        """`query` over the referral table, limited to the selected referrals."""
        return query.where(*self.conditions)


def contact_breached_between(start: datetime, end: datetime) -> list[ColumnElement[bool]]:
    """The referrals whose contact deadline, in [start, end), passed with nobody having
    contacted the referrer (the workflow's `contact_sla_breached`). The dashboard's breaches
    and the staff list's filter (starter.desk) both use it, so both count the same."""
    return [
        _referral.c.contact_sla_breached.is_(True),
        _referral.c.contact_deadline >= _utc(start),
        _referral.c.contact_deadline < _utc(end),
    ]


def protection_ending(now: datetime, within: timedelta) -> list[ColumnElement[bool]]:
    """Protections still running (qualifying or approved: a won or closed referral keeps its
    old date) that end in [now, now + within). Shared with the staff list's filter."""
    return [
        _referral.c.stage.in_([s.value for s in PROTECTING_STAGES]),
        _referral.c.protected_until >= _utc(now),
        _referral.c.protected_until < _utc(now + within),
    ]


def breach_month(now: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The month of `now` in the program's zone, [first instant, first of the next): the
    period of the dashboard's "contact deadlines breached"."""
    start = _month_start(now, zone)
    return start, _next_month(start)


def _entries() -> Any:
    """Each time a referral entered a stage: (referral_id, stage, at, seconds, rank), from its
    applied history entries and its ledger's `payable` line; `seconds` is `at` since 1970,
    `rank` orders entries at one instant."""
    rank = {stage.value: number for number, stage in enumerate(FUNNEL + ENDED)}
    from_events = select(
        _event.c.referral_id,
        case(
            {action: stage.value for action, stage in ENTERED_BY.items()}, value=_event.c.action
        ).label("stage"),
        _event.c.at,
    ).where(_event.c.action.in_(list(ENTERED_BY)), _event.c.outcome != "refused")
    from_ledger = select(
        _line.c.referral_id,
        literal(Stage.COMMISSION_PAYABLE.value).label("stage"),
        _line.c.at,
    ).where(_line.c.kind == LineKind.PAYABLE.value)
    entries = union_all(from_events, from_ledger).subquery("entry")
    return select(
        entries.c.referral_id,
        entries.c.stage,
        entries.c.at,
        epoch_seconds(entries.c.at).label("seconds"),
        case(rank, value=entries.c.stage).label("rank"),
    ).subquery("ranked_entry")


# --- the queries --------------------------------------------------------------------------


def change_stamp(engine: Engine) -> tuple[Any, ...]:
    """What changes whenever the figures' data does: the referral rows (how many, and the
    latest `updated_at`, which every write sets) and the newest event, ledger event and
    ledger line. Read from indexes, so it costs next to nothing beside the figures."""
    with engine.connect() as connection:
        row = connection.execute(
            select(
                select(func.count()).select_from(_referral).scalar_subquery(),
                select(func.max(_referral.c.updated_at)).scalar_subquery(),
                select(func.max(_event.c.id)).scalar_subquery(),
                select(func.max(_commission_event.c.id)).scalar_subquery(),
                select(func.max(_line.c.id)).scalar_subquery(),
            )
        ).one()
    return tuple(row)


def program_figures(
    engine: Engine,
    rules: ProgramRules,
    *,
    since: date | None = None,
    product: str | None = None,
    now: datetime | None = None,
) -> ProgramFigures:
    """All the figures for the referrals submitted since `since` of `product` (both optional),
    `now` being when the report is made (default: now)."""
    zone = ZoneInfo(rules.calendar.timezone)
    now = now or datetime.now(UTC)
    selection = _Selection(zone, since, product)
    with engine.connect() as connection:
        referrals = connection.execute(
            selection.of(select(func.count()).select_from(_referral))
        ).scalar_one()
        reached = _reached(connection, selection)
        reached[Stage.SUBMITTED] = referrals
        funnel = [
            FunnelStep(
                stage=stage,
                referrals=reached.get(stage, 0),
                conversion=_share(reached.get(stage, 0), reached.get(FUNNEL[n - 1], 0))
                if n
                else None,
            )
            for n, stage in enumerate(FUNNEL)
        ]
        by_stage: dict[str, int] = dict(
            connection.execute(
                selection.of(select(_referral.c.stage, func.count()).group_by(_referral.c.stage))
            ).all()
        )
        return ProgramFigures(
            generated_at=now,
            timezone=rules.calendar.timezone,
            since=since,
            product=product,
            referrals=referrals,
            funnel=funnel,
            ended=[StageCount(stage=s, referrals=by_stage.get(s.value, 0)) for s in ENDED],
            time_in_stage=_time_in_stage(connection, selection),
            contact=_contact(connection, selection, zone, now),
            expiring_protections=_expiring(connection, selection, now),
            commission_by_month=_commission_by_month(connection, selection, zone),
            top_referrers=_top_referrers(connection, selection),
            top_earners=_top_earners(connection, selection),
        )


def _reached(connection: Any, selection: _Selection) -> dict[Stage, int]:
    """Referrals whose log entered each stage, however far they went since: the entries of
    `_entries`, counted by the action that enters each stage (one action per stage) and the
    ledger's `payable` lines, so the database reads the event log by its action index."""
    by_action = selection.joined(
        select(_event.c.action, func.count(distinct(_event.c.referral_id)))
        .where(_event.c.action.in_(list(ENTERED_BY)), _event.c.outcome != "refused")
        .group_by(_event.c.action),
        _event.c.referral_id,
    )
    reached = {ENTERED_BY[action]: count for action, count in connection.execute(by_action)}
    payable = connection.execute(
        selection.joined(
            select(func.count(distinct(_line.c.referral_id))).where(
                _line.c.kind == LineKind.PAYABLE.value
            ),
            _line.c.referral_id,
        )
    ).scalar_one()
    if payable:
        reached[Stage.COMMISSION_PAYABLE] = payable
    return reached


def _time_in_stage(connection: Any, selection: _Selection) -> list[StageTime]:
    """From entering a stage to entering the next one, for each stage left: median and 90th
    percentile (see `percentile`), in days."""
    entry = _entries()
    timeline = selection.joined(
        select(
            entry.c.stage,
            entry.c.seconds,
            func.lead(entry.c.seconds)
            .over(partition_by=entry.c.referral_id, order_by=(entry.c.at, entry.c.rank))
            .label("left_at"),
        ),
        entry.c.referral_id,
    ).subquery("timeline")
    rows = connection.execute(
        select(timeline.c.stage, timeline.c.left_at - timeline.c.seconds).where(
            timeline.c.left_at.is_not(None)
        )
    )
    durations: dict[str, list[int]] = {}
    for stage, spent in rows:
        durations.setdefault(stage, []).append(round(spent))
    figures = []
    for stage in TIMED:
        spent = sorted(durations.get(stage.value, []))
        figures.append(
            StageTime(
                stage=stage,
                referrals=len(spent),
                median_days=_days(percentile(spent, Decimal("0.5"))) if spent else None,
                p90_days=_days(percentile(spent, Decimal("0.9"))) if spent else None,
            )
        )
    return figures


def _contact(
    connection: Any, selection: _Selection, zone: ZoneInfo, now: datetime
) -> ContactCompliance:
    """Of the referrals contacted (an applied `contacted`), how many were contacted strictly
    before their reminder instant and before their deadline; and the referrals whose contact
    deadline, in the month of `now`, passed with nobody having contacted the referrer."""
    contacted = (
        select(_event.c.referral_id, func.min(_event.c.at).label("at"))
        .where(_event.c.action == "contacted", _event.c.outcome != "refused")
        .group_by(_event.c.referral_id)
        .subquery("contacted")
    )
    at = epoch_seconds(contacted.c.at)
    reminder = epoch_seconds(state_field(_referral.c.state, "contact_reminder_at"))
    deadline = epoch_seconds(_referral.c.contact_deadline)
    counts = connection.execute(
        selection.joined(
            select(
                func.count(),
                func.coalesce(func.sum(case((at < reminder, 1), else_=0)), 0),
                func.coalesce(func.sum(case((at < deadline, 1), else_=0)), 0),
            ),
            contacted.c.referral_id,
        )
    ).one()
    total, before_reminder, before_deadline = (int(n) for n in counts)
    start, end = breach_month(now, zone)
    breached = connection.execute(
        selection.of(
            select(
                _referral.c.referral_id,
                _referral.c.product,
                _referral.c.prospect_company,
                _referral.c.stage,
                _referral.c.contact_deadline,
            )
            .where(*contact_breached_between(start, end))
            .order_by(_referral.c.contact_deadline, _referral.c.referral_id)
        )
    )
    return ContactCompliance(
        contacted=total,
        before_reminder=before_reminder,
        before_deadline=before_deadline,
        before_reminder_share=_share(before_reminder, total),
        before_deadline_share=_share(before_deadline, total),
        month=f"{start:%Y-%m}",
        breaches=[
            ContactBreach(
                referral_id=row.referral_id,
                product=row.product,
                prospect_company=row.prospect_company,
                stage=Stage(row.stage),
                contact_deadline=as_utc(row.contact_deadline),
            )
            for row in breached
        ],
    )


def _expiring(connection: Any, selection: _Selection, now: datetime) -> list[ExpiringProtection]:
    """Protections still running (qualifying or approved: a won or closed referral keeps its
    old date) that end within 30 days of `now`, soonest first."""
    rows = connection.execute(
        selection.of(
            select(
                _referral.c.referral_id,
                _referral.c.product,
                _referral.c.prospect_company,
                _referral.c.stage,
                _referral.c.protected_until,
            )
            .where(*protection_ending(now, EXPIRING_WITHIN))
            .order_by(_referral.c.protected_until, _referral.c.referral_id)
        )
    )
    return [
        ExpiringProtection(
            referral_id=row.referral_id,
            product=row.product,
            prospect_company=row.prospect_company,
            stage=Stage(row.stage),
            protected_until=as_utc(row.protected_until),
        )
        for row in rows
    ]


def _commission_by_month(
    connection: Any, selection: _Selection, zone: ZoneInfo
) -> list[CommissionMonth]:
    """Net commission per commission (its accrual, clawback and void lines summed) grouped by
    the month of its accrual (the `won` date, program time zone), currency and status. Void
    commissions net to nothing and are left out."""
    accrual = _line.alias("accrual")
    first, last = connection.execute(
        selection.joined(
            select(func.min(accrual.c.at), func.max(accrual.c.at)).where(
                accrual.c.kind == LineKind.ACCRUAL.value
            ),
            accrual.c.referral_id,
        )
    ).one()
    if first is None:
        return []
    months = []
    start = _month_start(as_utc(first), zone)
    while start <= as_utc(last):
        months.append(start)
        start = _next_month(start)
    month = case(
        *[
            (
                and_(accrual.c.at >= _utc(m), accrual.c.at < _utc(_next_month(m))),
                f"{m:%Y-%m}",
            )
            for m in months
        ]
    )
    net = (
        selection.joined(
            select(
                month.label("month"),
                _commission.c.currency,
                _commission.c.status,
                func.sum(_line.c.amount).label("net"),
            )
            .select_from(_commission)
            .join(accrual, accrual.c.referral_id == _commission.c.referral_id)
            .join(_line, _line.c.referral_id == _commission.c.referral_id)
            .where(
                accrual.c.kind == LineKind.ACCRUAL.value,
                _line.c.kind.in_(ENTITLEMENT),
                _commission.c.status != CommissionStatus.VOID.value,
            )
            .group_by(
                _commission.c.referral_id,
                accrual.c.at,
                _commission.c.currency,
                _commission.c.status,
            ),
            _commission.c.referral_id,
        )
    ).subquery("net")

    def total(status: CommissionStatus) -> ColumnElement[Decimal]:
        return func.coalesce(func.sum(case((net.c.status == status.value, net.c.net), else_=0)), 0)

    rows = connection.execute(
        select(
            net.c.month,
            net.c.currency,
            total(CommissionStatus.PENDING),
            total(CommissionStatus.PAYABLE),
            total(CommissionStatus.PAID),
        )
        .group_by(net.c.month, net.c.currency)
        .order_by(net.c.month, net.c.currency)
    )
    return [
        CommissionMonth(
            month=row[0],
            currency=row[1],
            pending=round_money(Decimal(row[2]), row[1]),
            payable=round_money(Decimal(row[3]), row[1]),
            paid=round_money(Decimal(row[4]), row[1]),
        )
        for row in rows
    ]


def _top_referrers(connection: Any, selection: _Selection) -> list[TopReferrer]:
    """The referrers with the most selected referrals (then the most won, then by address)."""
    won = (  # the entries of `_entries` into `won`: applied `won` history entries
        select(_event.c.referral_id)
        .where(_event.c.action == "won", _event.c.outcome != "refused")
        .group_by(_event.c.referral_id)
        .subquery("won")
    )
    referrals = func.count(_referral.c.referral_id)
    won_count = func.count(won.c.referral_id)
    rows = connection.execute(
        selection.of(
            select(_referral.c.referrer_email, referrals, won_count)
            .select_from(_referral)
            .outerjoin(won, won.c.referral_id == _referral.c.referral_id)
            .group_by(_referral.c.referrer_email)
            .order_by(referrals.desc(), won_count.desc(), _referral.c.referrer_email)
            .limit(TOP)
        )
    )
    return [TopReferrer(referrer_email=e, referrals=n, won=w) for e, n, w in rows]


def _top_earners(connection: Any, selection: _Selection) -> list[TopEarner]:
    """The referrers with the most commission earned in each currency: accruals less
    clawbacks and voids, whatever has been paid out yet."""
    earned = func.sum(_line.c.amount)
    ranked = selection.joined(
        select(
            _line.c.referrer_email,
            _line.c.currency,
            earned.label("earned"),
            func.row_number()
            .over(partition_by=_line.c.currency, order_by=(earned.desc(), _line.c.referrer_email))
            .label("place"),
        )
        .where(_line.c.kind.in_(ENTITLEMENT))
        .group_by(_line.c.referrer_email, _line.c.currency)
        .having(earned > 0),
        _line.c.referral_id,
    ).subquery("ranked")
    rows = connection.execute(
        select(ranked.c.referrer_email, ranked.c.currency, ranked.c.earned)
        .where(ranked.c.place <= TOP)
        .order_by(ranked.c.currency, ranked.c.place)
    )
    return [
        TopEarner(referrer_email=e, currency=c, earned=round_money(Decimal(v), c))
        for e, c, v in rows
    ]


# --- in a terminal ------------------------------------------------------------------------


def _percent(share: Decimal | None) -> str:
    return "—" if share is None else f"{share * 100:.1f} %"


def as_text(figures: ProgramFigures) -> str:
    """The figures as `referrals report` prints them: aligned sections, days and percents."""
    zone = ZoneInfo(figures.timezone)

    def local(moment: datetime) -> str:
        return f"{moment.astimezone(zone):%Y-%m-%d %H:%M %Z}"

    scope = [f"product {figures.product}" if figures.product else "all products"]
    if figures.since:
        scope.append(f"submitted since {figures.since:%Y-%m-%d}")
    contact = figures.contact
    lines = [
        f"Referral program figures: {', '.join(scope)}; {figures.referrals} referrals "
        f"(as of {local(figures.generated_at)})",
        "",
        "Funnel",
        f"  {'STEP':<20}{'REFERRALS':>9}{'CONVERSION':>12}",
        *(
            f"  {s.stage.value:<20}{s.referrals:>9}{_percent(s.conversion) if n else '':>12}"
            for n, s in enumerate(figures.funnel)
        ),
        "",
        "Ended",
        *(f"  {s.stage.value:<20}{s.referrals:>9}" for s in figures.ended),
        "",
        "Time in stage, in days (referrals that have left the stage)",
        f"  {'STAGE':<20}{'LEFT':>9}{'MEDIAN':>9}{'P90':>9}",
        *(
            f"  {t.stage.value:<20}{t.referrals:>9}{t.median_days or '—':>9}{t.p90_days or '—':>9}"
            for t in figures.time_in_stage
        ),
        "",
        f"Contact promise ({contact.contacted} referrals contacted)",
        f"  {'before the reminder':<20}{contact.before_reminder:>9}"
        f"{_percent(contact.before_reminder_share):>12}",
        f"  {'before the deadline':<20}{contact.before_deadline:>9}"
        f"{_percent(contact.before_deadline_share):>12}",
        f"  deadlines breached in {contact.month}: {len(contact.breaches)}",
        *(
            f"    {b.referral_id:<14}{b.product:<26}{b.stage.value:<20}"
            f"deadline {local(b.contact_deadline)}"
            for b in contact.breaches
        ),
        "",
        f"Protections ending within {EXPIRING_WITHIN.days} days: "
        f"{len(figures.expiring_protections)}",
        *(
            f"    {p.referral_id:<14}{p.product:<26}{p.stage.value:<20}"
            f"ends {local(p.protected_until)}  {p.prospect_company}"
            for p in figures.expiring_protections
        ),
        "",
        "Commission by month won (net of clawbacks)",
        f"  {'MONTH':<10}{'CUR':<5}{'PENDING':>12}{'PAYABLE':>13}{'PAID':>13}",
        *(
            f"  {m.month:<10}{m.currency:<5}{m.pending:>12}{m.payable:>13}{m.paid:>13}"
            for m in figures.commission_by_month
        ),
        "",
        "Top referrers, by referrals",
        f"  {'REFERRER':<40}{'REFERRALS':>10}{'WON':>6}",
        *(f"  {r.referrer_email:<40}{r.referrals:>10}{r.won:>6}" for r in figures.top_referrers),
        "",
        "Top referrers, by commission earned (net of clawbacks and voids)",
        f"  {'REFERRER':<40}{'CUR':<5}{'EARNED':>12}",
        *(f"  {e.referrer_email:<40}{e.currency:<5}{e.earned:>12}" for e in figures.top_earners),
    ]
    return "\n".join(line.rstrip() for line in lines)
