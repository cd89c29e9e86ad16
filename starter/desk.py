"""What the staff desk reads from the database: the referral list (`/staff/referrals`, its
filters, its CSV) and one referral's file (`/staff/referrals/{id}`).

Served from the system of record only, never from Temporal: the desk works with no worker
running and after a closed workflow has been deleted (retention, erasure). The filters the
dashboard links to are defined by starter.figures' own conditions, so a figure and the list
it links to count the same referrals.

Personal data is stored in the clear in the database (only Temporal payloads are encrypted,
core/encryption.py); an erased referral holds pseudonyms, which is what is shown.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import Select, exists, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.sql import ColumnElement

from activities.db import (
    CommissionLineRow,
    ReferralEventRow,
    ReferralRow,
    SentEmail,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    as_utc,
)
from activities.queries import load_referral
from core.actor_assertions import UNAUTHENTICATED
from starter.domains import registrable_domain
from starter.figures import (
    ENTERED_BY,
    EXPIRING_WITHIN,
    FUNNEL,
    ProgramFigures,
    breach_month,
    contact_breached_between,
    day_start,
    protection_ending,
)
from starter.spreadsheet import spreadsheet_row
from workflows.models.ledger import LineKind
from workflows.models.referral import PROTECTING_STAGES, ReferralState, Stage
from workflows.models.values import normalize_domain

PER_PAGE = 50
MAX_PER_PAGE = 500
# Rows fetched at a time for the CSV, which holds every matching referral.
CSV_BATCH = 500
# The days a date filter may name, and the last page asked for that is taken as asked.
FIRST_DAY, LAST_DAY = date(1900, 1, 1), date(9998, 12, 31)
LAST_PAGE = 1_000_000

_referral: Any = ReferralRow.__table__  # type: ignore[attr-defined]
_event: Any = ReferralEventRow.__table__  # type: ignore[attr-defined]
_line: Any = CommissionLineRow.__table__  # type: ignore[attr-defined]
_email: Any = SentEmail.__table__  # type: ignore[attr-defined]
_delivery: Any = WebhookDeliveryRow.__table__  # type: ignore[attr-defined]
_attempt: Any = WebhookAttemptRow.__table__  # type: ignore[attr-defined]

# The history action by which a referral enters each stage (the figures' funnel).
_ENTERING_ACTION: dict[Stage, str] = {stage: action for action, stage in ENTERED_BY.items()}


# --- the filters ----------------------------------------------------------------------------


class FilterError(ValueError):
    """Some query parameters are not valid: `errors` says why for each (by field name), and
    `valid` holds the filters without them, for a page that lists anyway and says so."""

    def __init__(self, errors: dict[str, str], valid: ReferralFilters) -> None:
        super().__init__("; ".join(f"{name}: {why}" for name, why in errors.items()))
        self.errors = errors
        self.valid = valid


class ReferralFilters(BaseModel):
    """Which referrals the staff list shows; every field optional, all given must hold.

    Days (`submitted_*`, `contact_deadline_*`) are dates in the program's time zone, both
    ends included. `reached` and the contact-deadline days exist for the dashboard's links
    (`figure_filters`): a funnel step counts the referrals whose log reached a stage, and the
    breaches figure those of one month."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Stage | None = None
    product: str | None = None
    referrer: str | None = Field(default=None, max_length=320)
    contact_breached: bool | None = None
    protection_ending_within_days: int | None = Field(default=None, ge=0, le=3650)
    submitted_from: date | None = None
    submitted_to: date | None = None
    search: str | None = Field(default=None, max_length=200)
    reached: Stage | None = None
    contact_deadline_from: date | None = None
    contact_deadline_to: date | None = None

    @field_validator("product", "referrer", "search", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator(
        "submitted_from", "submitted_to", "contact_deadline_from", "contact_deadline_to"
    )
    @classmethod
    def _in_range(cls, value: date | None) -> date | None:
        """Days the database can compare (year 9999 has no next day to end a period)."""
        if value is not None and not FIRST_DAY <= value <= LAST_DAY:
            raise ValueError(f"a date from {FIRST_DAY} to {LAST_DAY} is expected")
        return value

    @field_validator("referrer")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        """Addresses are stored lower-cased: the filter matches whatever the case typed."""
        return value.lower() if value else value

    @model_validator(mode="after")
    def _ordered(self) -> ReferralFilters:
        for start, end in (
            ("submitted_from", "submitted_to"),
            ("contact_deadline_from", "contact_deadline_to"),
        ):
            first, last = getattr(self, start), getattr(self, end)
            if first is not None and last is not None and first > last:
                raise ValueError(f"{end} is before {start}")
        return self

    def query_string(self) -> str:
        """The filters given, as the list page's query string (fields in a fixed order), so a
        view can be bookmarked and `from_query` reads it back."""
        values: list[tuple[str, str]] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, date):
                text = value.isoformat()
            else:
                text = str(value)
            values.append((name, text))
        return urlencode(values)

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> ReferralFilters:
        """The filters of a query string (a mapping, such as Starlette's `query_params`).
        Empty values mean "any" (a GET form sends its empty fields); keys that are not
        filters (`page`, `lang`…) are ignored. Invalid values raise FilterError, one message
        per field."""
        given = {
            name: params[name]
            for name in cls.model_fields
            if name in params and str(params[name]).strip() != ""
        }
        try:
            return cls.model_validate(given)
        except ValidationError as error:
            errors: dict[str, str] = {}
            for problem in error.errors():
                name = str(problem["loc"][0]) if problem["loc"] else _pair_of(problem["msg"])
                errors.setdefault(name, problem["msg"].removeprefix("Value error, "))
            kept = {k: v for k, v in given.items() if k not in errors}
            try:
                valid = cls.model_validate(kept)
            except ValidationError:
                valid = cls()
            raise FilterError(errors, valid) from None


def _pair_of(message: str) -> str:
    """The field a check of two fields names first (`submitted_to is before …`)."""
    return message.removeprefix("Value error, ").split(" ", 1)[0]


# --- the dashboard's figures, as filters ----------------------------------------------------


def figure_filters(figures: ProgramFigures) -> dict[str, ReferralFilters]:
    """For each figure of the dashboard that counts referrals, the filters that list exactly
    those referrals (read `protection_ending_within_days` with the figures' `generated_at` as
    `now`). Keys:

    - `funnel.<stage>`: the referrals whose log reached the step (`referrals` of the step);
    - `ended.<stage>`: the referrals now in that ending stage;
    - `contact.contacted`: the referrals contacted (the contact promise's denominator);
    - `contact.breaches`: contact deadlines breached this month (one row per breach);
    - `protections.ending`: protections ending within 30 days;
    - `referrer.<address>` and `referrer.<address>.won`: a top referrer's referrals, and
      those of them that reached `won`.

    Each carries the dashboard's period and product."""
    zone = ZoneInfo(figures.timezone)
    scope = ReferralFilters(submitted_from=figures.since, product=figures.product)

    def within(**changes: Any) -> ReferralFilters:
        return scope.model_copy(update=changes)

    links: dict[str, ReferralFilters] = {}
    for stage in FUNNEL:
        links[f"funnel.{stage.value}"] = within(reached=None if stage is FUNNEL[0] else stage)
    for ended in figures.ended:
        links[f"ended.{ended.stage.value}"] = within(stage=ended.stage)
    links["contact.contacted"] = within(reached=Stage.CONTACTED)
    start, end = breach_month(figures.generated_at, zone)
    links["contact.breaches"] = within(
        contact_breached=True,
        contact_deadline_from=start.date(),
        contact_deadline_to=(end - timedelta(days=1)).date(),
    )
    links["protections.ending"] = within(protection_ending_within_days=EXPIRING_WITHIN.days)
    for top in figures.top_referrers:
        links[f"referrer.{top.referrer_email}"] = within(referrer=top.referrer_email)
        links[f"referrer.{top.referrer_email}.won"] = within(
            referrer=top.referrer_email, reached=Stage.WON
        )
    return links


# --- the list -------------------------------------------------------------------------------


class ReferralListRow(BaseModel):
    """One referral as the staff list shows it. `protection_end`: the end of a protection
    that still runs (qualifying, approved), as ReferralState.protection_end."""

    referral_id: str
    submitted_at: datetime
    prospect_company: str
    prospect_domain: str
    product: str
    referrer_name: str
    referrer_email: str
    stage: Stage
    contact_deadline: datetime
    contact_breached: bool
    protection_end: datetime | None
    commission_amount: Decimal | None
    commission_currency: str | None
    commission_status: str | None
    erased: bool


class ReferralPage(BaseModel):
    """One page of the list, newest first; `total` counts every matching referral."""

    filters: ReferralFilters
    rows: list[ReferralListRow]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))

    @property
    def has_previous(self) -> bool:
        return self.page > 1

    @property
    def has_next(self) -> bool:
        return self.page < self.pages


def _conditions(
    filters: ReferralFilters, now: datetime, zone: ZoneInfo
) -> list[ColumnElement[bool]]:
    """Every filter as SQL on the referral table's own columns (plus the event log and the
    ledger for `reached`): none needs the `state` JSON, so the database filters, counts and
    pages, with the indexes on stage, product, referrer, submission time and protection."""
    r = _referral.c
    where: list[ColumnElement[bool]] = []
    if filters.stage is not None:
        where.append(r.stage == filters.stage.value)
    if filters.product is not None:
        where.append(r.product == filters.product)
    if filters.referrer is not None:
        where.append(r.referrer_email == filters.referrer)
    if filters.protection_ending_within_days is not None:
        within = timedelta(days=filters.protection_ending_within_days)
        where.extend(protection_ending(now, within))
    if filters.submitted_from is not None:
        where.append(r.submitted_at >= _utc(day_start(filters.submitted_from, zone)))
    if filters.submitted_to is not None:
        where.append(r.submitted_at < _utc(_day_after(filters.submitted_to, zone)))
    first, last = filters.contact_deadline_from, filters.contact_deadline_to
    if filters.contact_breached and first is not None and last is not None:
        # The dashboard's "contact deadlines breached" of a month, by its own definition.
        where.extend(contact_breached_between(day_start(first, zone), _day_after(last, zone)))
    else:
        if filters.contact_breached is not None:
            where.append(r.contact_sla_breached.is_(filters.contact_breached))
        if first is not None:
            where.append(r.contact_deadline >= _utc(day_start(first, zone)))
        if last is not None:
            where.append(r.contact_deadline < _utc(_day_after(last, zone)))
    if filters.reached is not None and filters.reached is not FUNNEL[0]:
        where.append(_reached(filters.reached))
    if filters.search is not None:
        where.append(_search(filters.search))
    return where


def _reached(stage: Stage) -> ColumnElement[bool]:
    """The referral's log entered `stage` (an applied, not refused, entering action), or, for
    commission payable, its ledger has a payable line: the figures' funnel, per referral."""
    if stage is Stage.COMMISSION_PAYABLE:
        return exists().where(
            _line.c.referral_id == _referral.c.referral_id,
            _line.c.kind == LineKind.PAYABLE.value,
        )
    return exists().where(
        _event.c.referral_id == _referral.c.referral_id,
        _event.c.action == _ENTERING_ACTION[stage],
        _event.c.outcome != "refused",
    )


def _search(term: str) -> ColumnElement[bool]:
    """A referral id (exact or its start), part of the prospect's company name (any case;
    on SQLite only ASCII letters fold case), or the prospect's domain (a website or address
    typed as the intake normalises it). The company match cannot use an index (a substring):
    the database scans the referral rows left by the other filters, still in SQL."""
    r = _referral.c
    matches = [
        r.referral_id.startswith(term, autoescape=True),
        r.referral_id.startswith(term.upper(), autoescape=True),
        func.lower(r.prospect_company).contains(term.lower(), autoescape=True),
        r.prospect_domain == term.lower(),
    ]
    for domain_of in (normalize_domain, registrable_domain):
        try:
            matches.append(r.prospect_domain == domain_of(term))
        except ValueError:
            pass  # not a website: the other matches stand
    return or_(*matches)


def _utc(moment: datetime) -> datetime:
    """Bound as UTC: SQLite stores instants as UTC text without their zone."""
    return moment.astimezone(UTC)


def _day_after(day: date, zone: ZoneInfo) -> datetime:
    """00:00 of the day after `day`: the end, excluded, of a period that includes `day`."""
    return day_start(day + timedelta(days=1), zone)


_COLUMNS = (
    "referral_id",
    "submitted_at",
    "prospect_company",
    "prospect_domain",
    "product",
    "referrer_email",
    "stage",
    "contact_deadline",
    "contact_sla_breached",
    "protected_until",
    "commission_amount",
    "commission_currency",
    "commission_status",
    "erased_at",
    "state",
)


def _listed(filters: ReferralFilters, now: datetime, zone: ZoneInfo) -> Select[Any]:
    """Newest first, ties by id (as `referrals list`: the ix_referral_submitted_at index)."""
    return (
        select(*(_referral.c[name] for name in _COLUMNS))
        .where(*_conditions(filters, now, zone))
        .order_by(_referral.c.submitted_at.desc(), _referral.c.referral_id.desc())
    )


def _row(row: Any) -> ReferralListRow:
    """The referrer's name is the one fact not in a column: read from the state JSON, for the
    rows of one page (or of the CSV) only."""
    referrer = json.loads(row.state).get("referrer", {})
    stage = Stage(row.stage)
    running = stage in PROTECTING_STAGES and row.protected_until is not None
    return ReferralListRow(
        referral_id=row.referral_id,
        submitted_at=as_utc(row.submitted_at),
        prospect_company=row.prospect_company,
        prospect_domain=row.prospect_domain,
        product=row.product,
        referrer_name=referrer.get("name", ""),
        referrer_email=row.referrer_email,
        stage=stage,
        contact_deadline=as_utc(row.contact_deadline),
        contact_breached=bool(row.contact_sla_breached),
        protection_end=as_utc(row.protected_until) if running else None,
        commission_amount=row.commission_amount,
        commission_currency=row.commission_currency,
        commission_status=row.commission_status,
        erased=row.erased_at is not None,
    )


def list_referrals(
    engine: Engine,
    filters: ReferralFilters,
    page: int = 1,
    per_page: int = PER_PAGE,
    *,
    now: datetime,
    zone: ZoneInfo,
) -> ReferralPage:
    """One page (from 1) of the referrals matching `filters`, newest submission first, and how
    many match in all. `now` places "protection ending within N days"; `zone` (the program's,
    `calendar.timezone`) the days of the date filters. A page past the last is empty. Two
    queries (count, page), both filtered and paged by the database."""
    page = min(max(1, page), LAST_PAGE)
    per_page = min(max(1, per_page), MAX_PER_PAGE)
    where = _conditions(filters, now, zone)
    with engine.connect() as connection:
        total = connection.execute(
            select(func.count()).select_from(_referral).where(*where)
        ).scalar_one()
        rows = connection.execute(
            _listed(filters, now, zone).limit(per_page).offset((page - 1) * per_page)
        ).all()
    return ReferralPage(
        filters=filters,
        rows=[_row(row) for row in rows],
        total=total,
        page=page,
        per_page=per_page,
    )


def matching_referrals(
    engine: Engine, filters: ReferralFilters, *, now: datetime, zone: ZoneInfo
) -> Iterator[ReferralListRow]:
    """Every referral matching `filters`, in the list's order, fetched `CSV_BATCH` rows at a
    time from one query (one consistent read): what the CSV holds."""
    with engine.connect() as connection:
        result = connection.execution_options(yield_per=CSV_BATCH).execute(
            _listed(filters, now, zone)
        )
        for row in result:
            yield _row(row)


CSV_COLUMNS = [
    "referral_id",
    "submitted_at",
    "prospect_company",
    "prospect_domain",
    "product",
    "referrer_name",
    "referrer_email",
    "stage",
    "contact_deadline",
    "contact_breached",
    "protection_end",
    "commission_amount",
    "commission_currency",
    "commission_status",
    "erased",
]


def referrals_csv(rows: ReferralPage | Iterable[ReferralListRow]) -> str:
    """The list as CSV, one line per referral, in the columns of CSV_COLUMNS: instants in
    ISO 8601 (UTC), amounts as decimals, booleans as true/false. Every text cell goes
    through starter.spreadsheet, so a company typed as `=HYPERLINK(…)` stays text. Give it
    `matching_referrals(…)` for the whole list (a ReferralPage is one page only)."""
    listed = rows.rows if isinstance(rows, ReferralPage) else rows
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for row in listed:
        cells: dict[str, Any] = {}
        for name in CSV_COLUMNS:
            value = getattr(row, name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, datetime):
                value = value.isoformat()
            elif value is None:
                value = ""
            cells[name] = value
        writer.writerow(spreadsheet_row(cells))
    return out.getvalue()


# --- one referral's file --------------------------------------------------------------------


class TimelineEntry(BaseModel):
    """One entry of the event log: `applied` (a decision taken), `refused` (asked for, not
    allowed: `note` says why) or `system` (a timer, an email failure, the erasure)."""

    seq: int
    at: datetime
    action: str
    actor: str
    note: str | None
    outcome: str
    request_id: str | None
    # Who proved the actor: the surface that signed, or "unauthenticated" (a signal, a CLI
    # with no identity); None for the workflow's own entries and those before release 0.8.
    surface: str | None = None

    @property
    def unauthenticated(self) -> bool:
        return self.surface == UNAUTHENTICATED

    @property
    def refused(self) -> bool:
        return self.outcome == "refused"


class EmailSent(BaseModel):
    """An email known to be sent (the `sent_email` log: only sent ones are stored; a failed
    one shows in the timeline as `email_failed`). `template` is read from its key."""

    key: str
    template: str
    to: list[str]
    subject: str
    sent_at: datetime
    message_id: str
    state: str = "sent"


class LedgerLine(BaseModel):
    kind: str
    amount: Decimal
    currency: str
    reference: str | None
    reason: str | None
    at: datetime
    actor: str


class WebhookSent(BaseModel):
    """One event for one endpoint: `status` pending, delivered or failed; `last_answer` what
    the endpoint last answered (an erased referral keeps only its status line)."""

    id: str
    event_type: str
    endpoint_url: str
    status: str
    attempts: int
    last_answer: str | None
    last_attempt_at: datetime | None
    redeliveries: int
    created_at: datetime


class ReferralFile(BaseModel):
    """Everything the database knows of one referral. `state` holds its facts (referrer,
    prospect, contact, opportunity, stage, contact window, protection, commission, payments,
    refunds; pseudonyms once erased), its history left out (see `timeline`). `workflow_id`
    names its workflow for a Temporal UI link, which may no longer exist there."""

    referral_id: str
    workflow_id: str
    state: ReferralState
    timeline: list[TimelineEntry]
    emails: list[EmailSent]
    ledger: list[LedgerLine]
    webhooks: list[WebhookSent]

    @property
    def stage(self) -> Stage:
        return self.state.stage

    @property
    def protection_end(self) -> datetime | None:
        return self.state.protection_end

    @property
    def erased(self) -> bool:
        return self.state.erased is not None


def email_template(key: str, referral_id: str) -> str:
    """The template an email key names (workflows/referral.py builds them):
    `<id>/referrer/<what>[/n]` is `referrer_<what>`, `<id>/<template>[/suffix]` is the
    template, and `<key>/failure-notice` tells the desk another one failed."""
    rest = key.removeprefix(f"{referral_id}/").split("/")
    if rest[-1] == "failure-notice":
        return "staff_email_failed"
    if rest[0] == "referrer" and len(rest) > 1:
        return f"referrer_{rest[1]}"
    return rest[0]


def referral_file(engine: Engine, referral_id: str) -> ReferralFile | None:
    """The referral's file, or None for an unknown id. The referral row and its events (as
    `load_referral` reads them), then its emails, ledger lines and webhook deliveries: a few
    indexed queries, whatever Temporal still holds."""
    state = load_referral(engine, referral_id)
    if state is None:
        return None
    timeline = [  # an entry older than the event log's numbering is numbered by its place
        TimelineEntry.model_validate(
            entry.model_dump() | {"seq": number if entry.seq is None else entry.seq}
        )
        for number, entry in enumerate(state.history)
    ]
    last_attempt = (
        select(_attempt.c.delivery_id, func.max(_attempt.c.at).label("at"))
        .group_by(_attempt.c.delivery_id)
        .subquery("last_attempt")
    )
    with engine.connect() as connection:
        emails = connection.execute(
            select(_email)
            .where(_email.c.key.startswith(f"{referral_id}/", autoescape=True))
            .order_by(_email.c.sent_at, _email.c.key)
        ).all()
        lines = connection.execute(
            select(_line).where(_line.c.referral_id == referral_id).order_by(_line.c.at, _line.c.id)
        ).all()
        deliveries = connection.execute(
            select(_delivery, last_attempt.c.at.label("last_attempt_at"))
            .outerjoin(last_attempt, last_attempt.c.delivery_id == _delivery.c.id)
            .where(_delivery.c.referral_id == referral_id)
            .order_by(_delivery.c.created_at, _delivery.c.event_key, _delivery.c.endpoint_url)
        ).all()
    return ReferralFile(
        referral_id=referral_id,
        workflow_id=referral_id,  # the intake starts each referral's workflow under its id
        state=state.model_copy(update={"history": []}),
        timeline=timeline,
        emails=[
            EmailSent(
                key=email.key,
                template=email_template(email.key, referral_id),
                to=[to.strip() for to in email.recipients.split(",") if to.strip()],
                subject=email.subject,
                sent_at=as_utc(email.sent_at),
                message_id=email.message_id,
            )
            for email in emails
        ],
        ledger=[
            LedgerLine(
                kind=line.kind,
                amount=line.amount,
                currency=line.currency,
                reference=line.reference,
                reason=line.reason,
                at=as_utc(line.at),
                actor=line.actor,
            )
            for line in lines
        ],
        webhooks=[
            WebhookSent(
                id=delivery.id,
                event_type=delivery.event_type,
                endpoint_url=delivery.endpoint_url,
                status=delivery.status,
                attempts=delivery.attempts,
                last_answer=delivery.last_outcome,
                last_attempt_at=as_utc(delivery.last_attempt_at)
                if delivery.last_attempt_at
                else None,
                redeliveries=delivery.redeliveries,
                created_at=as_utc(delivery.created_at),
            )
            for delivery in deliveries
        ],
    )
