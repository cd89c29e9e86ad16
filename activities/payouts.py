"""Payout runs' database side: what a run collects from the ledger (one item per payee, with
its holds) and the run's current facts, written after each change (docs/payouts.md)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import holidays
from pydantic import ValidationError
from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete, select
from temporalio import activity
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.bank_files import BankFileError, Transfer, sepa_transfer, transfer_csv
from activities.db import (
    CommissionLineRow,
    CommissionRow,
    PayeeRow,
    PayoutClaimRow,
    PayoutDocumentRow,
    PayoutItemRow,
    PayoutRunRow,
    ReferralRow,
    StatementCounterRow,
    WebhookDeliveryRow,
    as_utc,
)
from activities.email import EmailActivities
from activities.ledger import ledger_sums
from activities.payees import all_payees, iban_owners, load_payee, reject_bank_details
from activities.statements import Statement, StatementLine, StatementRecovery, render_statement
from activities.webhooks import PENDING, enqueue_payout_deliveries, start_deliveries
from core.payees import PayeeProfile, VatRegime, in_sepa_zone, mask_iban
from workflows.models.ledger import LineKind
from workflows.models.program import PayoutRules, ProgramRules
from workflows.models.values import round_money
from workflows.payout_run import (
    COLLECT,
    CONFIRM,
    EXPORT,
    FAIL,
    NOTIFY,
    RECORD,
    ConfirmRequest,
    ExportRequest,
    ExportResult,
    FailRequest,
    Notice,
    PayoutRunWorkflow,
    run_workflow_id,
)
from workflows.payout_schedule import PREPARE_SCHEDULED
from workflows.payouts import (
    LIVE,
    HoldReason,
    ItemReferral,
    PayoutItem,
    Recovery,
    RunInput,
    RunState,
    payout_referral,
)
from workflows.referral import ReferralWorkflow

_LINE: Any = CommissionLineRow.__table__.c  # type: ignore[attr-defined]


def payable_items(
    session: Session,
    engine: Engine,
    rules: PayoutRules,
    now: datetime,
    *,
    zone: ZoneInfo | None = None,
    currency: str | None = None,
    email: str | None = None,
    last_day: date | None = None,
    taken: frozenset[str] = frozenset(),
) -> list[PayoutItem]:
    """What would be paid, per payee and currency, with what would hold it: every payable
    commission (of `currency`, of `email`; payable on or before `last_day` in `zone`; not in
    `taken`), less what the payee owes from clawbacks after earlier payouts."""
    where = []
    if currency is not None:
        where.append(_LINE.currency == currency)
    if email is not None:
        where.append(_LINE.referrer_email == email)
    payable_since = dict(
        session.execute(
            sa_select(_LINE.referral_id, func.min(_LINE.at))
            .where(_LINE.kind == LineKind.PAYABLE.value, *where)
            .group_by(_LINE.referral_id)
        ).all()
    )
    sums = session.execute(
        ledger_sums(_LINE.referrer_email, _LINE.currency, _LINE.referral_id).where(*where)
    ).all()
    due: dict[tuple[str, str], list[ItemReferral]] = defaultdict(list)
    owed: dict[tuple[str, str], list[Recovery]] = defaultdict(list)
    for payee_email, code, referral_id, earned, clawed, paid, payable in sums:
        if referral_id in taken:
            continue
        # Sums as the database keeps money (4 places), in the currency's minor unit.
        balance = round_money(Decimal(earned) + Decimal(clawed) - Decimal(paid), code)
        amount = round_money(Decimal(payable), code)
        if amount > 0 and referral_id in payable_since:
            since = as_utc(payable_since[referral_id])
            if last_day is None or zone is None or since.astimezone(zone).date() <= last_day:
                due[payee_email, code].append(
                    ItemReferral(referral_id=referral_id, amount=amount, payable_at=since)
                )
        elif balance < 0:
            owed[payee_email, code].append(Recovery(referral_id=referral_id, amount=-balance))
    payees = all_payees(engine)
    accounts = iban_owners(engine)
    items = []
    for payee_email, code in sorted(due):
        referrals = sorted(due[payee_email, code], key=lambda r: (r.payable_at, r.referral_id))
        item = PayoutItem(
            payee_email=payee_email,
            currency=code,
            referrals=referrals,
            gross=sum((r.amount for r in referrals), Decimal(0)),
            recoveries=owed.get((payee_email, code), []),
        )
        payee = payees.get(payee_email)
        if isinstance(payee, PayeeProfile) and payee.vat_regime is VatRegime.FR_VAT:
            item.vat_rate = payee.vat_rate
        item.holds = holds(item, payee, accounts, rules, now)
        items.append(item)
    return items


def collect_items(
    engine: Engine, rules: PayoutRules, zone: ZoneInfo, run: RunState, now: datetime
) -> list[PayoutItem]:
    """The run's items: per payee, every commission in the run's currency payable on or
    before the cutoff less the holding period and in no other live run, less what the payee
    owes from clawbacks after earlier payouts. Claims what it takes, in one transaction;
    repeated (a retried activity), it collects the same."""
    with Session(engine) as session:
        taken = frozenset(
            claim.referral_id
            for claim in session.exec(
                select(PayoutClaimRow).where(PayoutClaimRow.run_id != run.run_id)
            )
        )
        items = payable_items(
            session,
            engine,
            rules,
            now,
            zone=zone,
            currency=run.currency,
            last_day=run.cutoff - timedelta(days=rules.holding_days),
            taken=taken,
        )
        session.exec(delete(PayoutClaimRow).where(col(PayoutClaimRow.run_id) == run.run_id))
        for item in items:
            for referral_id in [r.referral_id for r in item.referrals] + [
                r.referral_id for r in item.recoveries
            ]:
                session.add(PayoutClaimRow(referral_id=referral_id, run_id=run.run_id))
        session.commit()
    return items


def held_now(engine: Engine, rules: PayoutRules, now: datetime) -> dict[tuple[str, str], Decimal]:
    """Payable but held, by currency and reason, were a run prepared now (an item held for
    several reasons counts under each): what the dashboard shows finance."""
    with Session(engine) as session:
        items = payable_items(session, engine, rules, now)
    held: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for item in items:
        for reason in item.holds:
            held[item.currency, reason.value] += item.gross
    return dict(held)


def holds(
    item: PayoutItem,
    payee: PayeeProfile | ValidationError | None,
    accounts: dict[str, set[str]],
    rules: PayoutRules,
    now: datetime,
) -> list[HoldReason]:
    """Every reason `item` may not be paid now, most fundamental first."""
    if payee is None:
        return [HoldReason.NO_PROFILE]
    if isinstance(payee, ValidationError):
        return [HoldReason.INVALID_BANK_DETAILS]
    found = []
    if not payee.mandate_in_force:
        found.append(HoldReason.NO_MANDATE)
    if payee.bank_rejection is not None:
        found.append(HoldReason.BANK_REJECTED)
    if len(accounts.get(payee.iban, ())) > 1:
        found.append(HoldReason.SHARED_IBAN)
    cooldown = timedelta(days=rules.iban_change_cooldown_days)
    if payee.iban_changed_at is not None and as_utc(payee.iban_changed_at) + cooldown > now:
        found.append(HoldReason.IBAN_COOLDOWN)
    if item.net <= 0:
        found.append(HoldReason.NEGATIVE_BALANCE)
    else:
        minimum = payee.minimum.get(item.currency, rules.minimum_for(item.currency))
        waited = now - min(r.payable_at for r in item.referrals)
        long_enough = rules.pay_below_minimum_after_days is not None and waited >= timedelta(
            days=rules.pay_below_minimum_after_days
        )
        if item.net < minimum and not long_enough:
            found.append(HoldReason.BELOW_MINIMUM)
    return found


@dataclass(frozen=True)
class Outlook:
    """When a payable commission may be paid, as its referrer is told: in which run, from
    which day, or why it waits."""

    expected_on: date | None
    run_id: str | None
    holds: tuple[HoldReason, ...]


def payout_outlook(
    engine: Engine, rules: PayoutRules, zone: ZoneInfo, email: str, now: datetime
) -> dict[str, Outlook]:
    """For each payable commission of `email`: the live run that has it (and that run's view
    of it), or the first day a run may take it and what would hold it then."""
    email = email.strip().lower()
    today = now.astimezone(zone).date()
    with Session(engine) as session:
        items = payable_items(session, engine, rules, now, email=email)
        payable_ids = [r.referral_id for item in items for r in item.referrals]
        claims = dict(
            session.exec(
                select(PayoutClaimRow.referral_id, PayoutClaimRow.run_id).where(
                    col(PayoutClaimRow.referral_id).in_(payable_ids)
                )
            ).all()
        )
    runs = {run_id: load_run(engine, run_id) for run_id in set(claims.values())}
    outlook: dict[str, Outlook] = {}
    for item in items:
        for referral in item.referrals:
            run = runs.get(claims.get(referral.referral_id, ""))
            in_run = run.item(email) if run is not None else None
            if run is not None and in_run is not None:
                outlook[referral.referral_id] = Outlook(
                    run.execution_date, run.run_id, () if in_run.paid else tuple(in_run.holds)
                )
                continue
            first = referral.payable_at.astimezone(zone).date() + timedelta(days=rules.holding_days)
            outlook[referral.referral_id] = Outlook(max(first, today), None, tuple(item.holds))
    return outlook


def item_status(item: PayoutItem) -> str:
    if item.excluded is not None:
        return "excluded"
    return "included" if item.paid else "held"


def save_run(engine: Engine, state: RunState, at: datetime) -> bool:
    """Bring the run's rows to `state`; False if a later revision is already there. A run
    that is no longer live releases its claims, so what it did not pay goes to the next."""
    with Session(engine) as session:
        row = session.get(PayoutRunRow, state.run_id)
        if row is not None and row.revision > state.revision:
            return False
        row = row or PayoutRunRow(
            run_id=state.run_id,
            currency=state.currency,
            cutoff=state.cutoff.isoformat(),
            status=state.status.value,
            total=state.total,
            revision=state.revision,
            state="",
            created_at=at,
            updated_at=at,
        )
        row.status = state.status.value
        row.total = state.total
        row.revision = state.revision
        row.state = state.model_dump_json()
        row.updated_at = at
        session.add(row)
        existing = {
            item.payee_email: item
            for item in session.exec(
                select(PayoutItemRow).where(PayoutItemRow.run_id == state.run_id)
            )
        }
        for item in state.items:
            item_row = existing.get(item.payee_email) or PayoutItemRow(
                run_id=state.run_id,
                payee_email=item.payee_email,
                currency=item.currency,
                gross=item.gross,
                recovered=item.recovered,
                net=item.net,
                status="",
                holds="",
                referral_ids="[]",
            )
            item_row.gross, item_row.recovered, item_row.net = item.gross, item.recovered, item.net
            item_row.status = item_status(item)
            item_row.holds = ",".join(h.value for h in item.holds)
            item_row.referral_ids = json.dumps([r.referral_id for r in item.referrals])
            session.add(item_row)
        if state.status not in LIVE:
            session.exec(delete(PayoutClaimRow).where(col(PayoutClaimRow.run_id) == state.run_id))
        session.commit()
    return True


def load_run(engine: Engine, run_id: str) -> RunState | None:
    with Session(engine) as session:
        row = session.get(PayoutRunRow, run_id)
    return RunState.model_validate_json(row.state) if row else None


def list_runs(engine: Engine, status: str | None = None) -> list[PayoutRunRow]:
    with Session(engine) as session:
        query = select(PayoutRunRow).order_by(col(PayoutRunRow.created_at).desc())
        if status:
            query = query.where(PayoutRunRow.status == status)
        return list(session.exec(query))


# --- export, failure, confirmation ---------------------------------------------------------


def _refuse(message: str) -> ApplicationError:
    """What staff must fix before trying again: the update's one-line refusal."""
    return ApplicationError(message, type="PayoutRefused", non_retryable=True)


def take_numbers(session: Session, series: str, year: int, count: int) -> list[str]:
    """The next `count` numbers of `series` in `year`, in the caller's transaction (rows
    locked on PostgreSQL): committed with the documents they number, or not at all."""
    query = select(StatementCounterRow).where(
        StatementCounterRow.series == series, StatementCounterRow.year == year
    )
    counter = session.exec(query.with_for_update()).first()
    if counter is None:
        counter = StatementCounterRow(series=series, year=year, last=0)
    first = counter.last + 1
    counter.last += count
    session.add(counter)
    return [f"{series}-{year}-{n:06d}" for n in range(first, first + count)]


def _document(
    run_id: str,
    kind: str,
    filename: str,
    media_type: str,
    content: bytes,
    at: datetime,
    number: str | None = None,
    payee_email: str | None = None,
) -> PayoutDocumentRow:
    suffix = f"/{payee_email}" if payee_email else ""
    return PayoutDocumentRow(
        id=f"{run_id}/{kind}{suffix}",
        run_id=run_id,
        kind=kind,
        number=number,
        payee_email=payee_email,
        filename=filename,
        media_type=media_type,
        content=content,
        sha256=hashlib.sha256(content).hexdigest(),
        created_at=at,
    )


def _statement(
    session: Session,
    program: ProgramRules,
    item: PayoutItem,
    payee: PayeeProfile,
    kind: str,
    number: str,
    issued_on: date,
    execution_date: date | None = None,
    original: str | None = None,
    reason: str | None = None,
) -> Statement:
    """What the statement (or its credit note) of `item` prints, from the system of record."""
    company = program.payouts.company
    assert company is not None and payee.mandate is not None
    lines = []
    for referral in item.referrals:
        row = session.get(ReferralRow, referral.referral_id)
        ledger = session.get(CommissionRow, referral.referral_id)
        product = program.product(row.product) if row else None
        lines.append(
            StatementLine(
                referral_id=referral.referral_id,
                prospect_company=row.prospect_company if row else "",
                product=product.name if product else (row.product if row else ""),
                basis=round_money(ledger.basis_amount, item.currency) if ledger else Decimal(0),
                rate=ledger.rate if ledger else Decimal(0),
                commission=referral.amount,
            )
        )
    return Statement(
        kind="credit_note" if kind == "credit_note" else "statement",
        number=number,
        issued_on=issued_on,
        currency=item.currency,
        company=company,
        payee=payee,
        mandate_reference=payee.mandate.reference,
        lines=lines,
        recoveries=[
            StatementRecovery(referral_id=r.referral_id, amount=r.amount) for r in item.recoveries
        ],
        base=item.base,
        vat_rate=item.vat_rate,
        vat=item.vat,
        total=item.net,
        execution_date=execution_date,
        original=original,
        reason=reason,
    )


def _payee_for_export(session: Session, email: str) -> PayeeProfile:
    row = session.get(PayeeRow, email)
    try:
        payee = PayeeProfile.model_validate_json(row.profile) if row else None
    except ValidationError:
        payee = None
    if payee is None or not payee.mandate_in_force or payee.bank_rejection:
        raise _refuse(
            f"{email}'s payee profile or mandate changed since the run was prepared: exclude "
            "them, or cancel the run and prepare another"
        )
    return payee


def export_run(
    engine: Engine, program: ProgramRules, request: ExportRequest, at: datetime
) -> ExportResult:
    """The run's bank file and one numbered statement per paid item, in one transaction: a
    retry after a crash finds them written and numbers nothing again."""
    state = request.state
    company = program.payouts.company
    if company is None:
        raise _refuse("program.yaml sets no payouts.company: who pays is on every file")
    day = date.fromisoformat(request.execution_date)
    issued_on = at.astimezone(ZoneInfo(program.calendar.timezone)).date()
    with Session(engine) as session:
        written = session.exec(
            select(PayoutDocumentRow).where(PayoutDocumentRow.run_id == state.run_id)
        ).all()
        # The SEPA file first, then the CSV, as the export wrote them.
        bank = sorted((d for d in written if d.kind in ("sepa", "csv")), key=lambda d: d.kind)
        if bank:
            numbers = {
                d.payee_email or "": d.number or "" for d in written if d.kind == "statement"
            }
            return ExportResult(numbers=numbers, bank_file=", ".join(d.id for d in bank[::-1]))
        items = [item for item in state.items if item.paid]
        payees = {item.payee_email: _payee_for_export(session, item.payee_email) for item in items}
        numbers = dict(
            zip(
                [item.payee_email for item in items],
                take_numbers(session, program.payouts.statement_prefix, issued_on.year, len(items)),
                strict=True,
            )
        )
        transfers = []
        for item in items:
            payee, number = payees[item.payee_email], numbers[item.payee_email]
            statement = _statement(
                session, program, item, payee, "statement", number, issued_on, day
            )
            session.add(
                _document(
                    state.run_id,
                    "statement",
                    f"{number}.pdf",
                    "application/pdf",
                    render_statement(statement),
                    at,
                    number,
                    item.payee_email,
                )
            )
            transfers.append(
                Transfer(
                    name=payee.legal_name,
                    iban=payee.iban,
                    bic=payee.bic,
                    amount=item.net,
                    currency=item.currency,
                    statement_number=number,
                    description=f"{program.name[:60]} {number}",
                )
            )
        # SEPA carries euros to accounts in the SEPA zone; the rest goes in the CSV.
        sepa = [t for t in transfers if t.currency == "EUR" and in_sepa_zone(t.iban)]
        other = [t for t in transfers if t not in sepa]
        files = []
        try:
            if sepa:
                content = sepa_transfer(
                    company, sepa, day, program.payouts.sepa_schema, state.run_id
                )
                files.append(
                    _document(
                        state.run_id, "sepa", f"{state.run_id}.xml", "application/xml",
                        content, at,
                    )
                )  # fmt: skip
            if other:
                content = transfer_csv(other, day)
                files.append(
                    _document(state.run_id, "csv", f"{state.run_id}.csv", "text/csv", content, at)
                )
        except BankFileError as error:
            raise _refuse(str(error)) from error
        for file in files:
            session.add(file)
        bank_file = ", ".join(file.id for file in files)
        session.commit()
    return ExportResult(numbers=numbers, bank_file=bank_file)


def fail_item(engine: Engine, program: ProgramRules, request: FailRequest, at: datetime) -> str:
    """The credit note cancelling one item's statement, and its payee held until their bank
    details change, in one transaction; the credit note's number (the same on a retry)."""
    state = request.state
    item = state.item(request.payee_email)
    assert item is not None and item.statement_number is not None
    with Session(engine) as session:
        written = session.get(PayoutDocumentRow, f"{state.run_id}/credit_note/{item.payee_email}")
        if written is not None:
            return written.number or ""
        row = session.get(PayeeRow, item.payee_email)
        if row is None:
            raise _refuse(f"{item.payee_email} has no payee profile any more")
        payee = PayeeProfile.model_validate_json(row.profile)
        issued_on = at.astimezone(ZoneInfo(program.calendar.timezone)).date()
        (number,) = take_numbers(session, program.payouts.credit_note_prefix, issued_on.year, 1)
        why = f"{request.code}: {request.reason}"
        note = _statement(
            session,
            program,
            item,
            payee,
            "credit_note",
            number,
            issued_on,
            original=item.statement_number,
            reason=why,
        )
        session.add(
            _document(
                state.run_id,
                "credit_note",
                f"{number}.pdf",
                "application/pdf",
                render_statement(note),
                at,
                number,
                item.payee_email,
            )
        )
        reject_bank_details(session, item.payee_email, f"{why} (run {state.run_id})", at)
        session.commit()
    return number


def recover(engine: Engine, state: RunState, actor: str, at: datetime) -> list[WebhookDeliveryRow]:
    """In one transaction, the `recovered` ledger lines of a confirmed run (each clawback
    deducted, on the referral that owed it, the statement's number as reference) and its
    `payout.confirmed` webhook messages; each written once (by key). The messages not yet
    delivered, to start."""
    with Session(engine) as session:
        for item in state.items:
            if not item.settled:
                continue
            for recovery in item.recoveries:
                key = f"payout-run-{state.run_id}/{recovery.referral_id}/recovered"
                if session.exec(
                    select(CommissionLineRow).where(CommissionLineRow.line_key == key)
                ).first():
                    continue
                session.add(
                    CommissionLineRow(
                        line_key=key,
                        referral_id=recovery.referral_id,
                        referrer_email=item.payee_email,
                        kind=LineKind.RECOVERED.value,
                        amount=-recovery.amount,
                        currency=item.currency,
                        reference=item.statement_number,
                        at=at,
                        actor=actor,
                    )
                )
        ids = enqueue_payout_deliveries(session, state, at)
        session.commit()
        query = select(WebhookDeliveryRow).where(
            col(WebhookDeliveryRow.id).in_(ids), WebhookDeliveryRow.status == PENDING
        )
        return list(session.exec(query))


def documents(engine: Engine, run_id: str) -> list[PayoutDocumentRow]:
    with Session(engine) as session:
        query = select(PayoutDocumentRow).where(PayoutDocumentRow.run_id == run_id)
        return list(session.exec(query.order_by(col(PayoutDocumentRow.id))))


def issued_to(engine: Engine, email: str) -> list[tuple[str, str, datetime]]:
    """The statements and credit notes issued to a payee, newest first: number, kind and
    when (their contents are read only when downloaded)."""
    with Session(engine) as session:
        query = (
            select(PayoutDocumentRow.number, PayoutDocumentRow.kind, PayoutDocumentRow.created_at)
            .where(PayoutDocumentRow.payee_email == email.strip().lower())
            .order_by(col(PayoutDocumentRow.created_at).desc())
        )
        return [(number or "", kind, at) for number, kind, at in session.exec(query)]


def issued_document(engine: Engine, email: str, number: str) -> PayoutDocumentRow | None:
    """A payee's own statement or credit note by its number (another's is not found)."""
    with Session(engine) as session:
        query = select(PayoutDocumentRow).where(
            PayoutDocumentRow.number == number,
            PayoutDocumentRow.payee_email == email.strip().lower(),
        )
        return session.exec(query).first()


def document(engine: Engine, document_id: str) -> PayoutDocumentRow | None:
    with Session(engine) as session:
        return session.get(PayoutDocumentRow, document_id)


async def start_run(
    client: Client,
    rules: PayoutRules,
    queue: str,
    run_id: str,
    currency: str,
    cutoff: date,
    prepared_by: str,
) -> WorkflowHandle[Any, Any]:
    """Start the run's workflow; WorkflowAlreadyStartedError if `run_id` was ever started."""
    return await client.start_workflow(
        PayoutRunWorkflow.run,
        RunInput(
            run_id=run_id,
            currency=currency,
            cutoff=cutoff,
            approvals_required=rules.approvals_required,
            prepared_by=prepared_by,
        ),
        id=run_workflow_id(run_id),
        task_queue=queue,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        static_summary=f"Payout run {run_id}",
    )


def payable_currencies(engine: Engine, rules: PayoutRules, now: datetime) -> list[str]:
    with Session(engine) as session:
        return sorted({item.currency for item in payable_items(session, engine, rules, now)})


def first_business_day(year: int, month: int, country: str) -> date:
    """The month's first day that is neither a weekend nor a public holiday of `country`."""
    off = holidays.country_holidays(country, years=year)
    day = date(year, month, 1)
    while day.weekday() >= 5 or day in off:
        day += timedelta(days=1)
    return day


def scheduled_run_id(currency: str, day: date) -> str:
    """One monthly run per currency and day, whoever starts it and however often."""
    return f"{currency.lower()}-{day.isoformat()}-monthly"


class PayoutActivities:
    def __init__(
        self,
        engine: Engine,
        program: ProgramRules,
        client: Client | None = None,
        mailer: EmailActivities | None = None,
    ) -> None:
        """`client`: to pay each referral of a confirmed run; `mailer`: to tell payees."""
        self._engine = engine
        self._program = program
        self._zone = ZoneInfo(program.calendar.timezone)
        self._client = client
        self._mailer = mailer

    @activity.defn(name=COLLECT)
    def collect_payout_items(self, run: RunState) -> list[PayoutItem]:
        return collect_items(
            self._engine, self._program.payouts, self._zone, run, datetime.now(UTC)
        )

    @activity.defn(name=RECORD)
    def record_payout_run(self, state: RunState) -> bool:
        return save_run(self._engine, state, datetime.now(UTC))

    @activity.defn(name=EXPORT)
    def export_payout_run(self, request: ExportRequest) -> ExportResult:
        return export_run(self._engine, self._program, request, datetime.now(UTC))

    @activity.defn(name=FAIL)
    def fail_payout_item(self, request: FailRequest) -> str:
        return fail_item(self._engine, self._program, request, datetime.now(UTC))

    @activity.defn(name=CONFIRM)
    async def confirm_payout_run(self, request: ConfirmRequest) -> list[str]:
        """Pay each referral (its `payout`, signed by whoever confirmed), then write the
        recovered lines. A referral that refuses (paid outside the run) is reported back."""
        assert self._client is not None
        problems = []
        for payout in request.payouts:
            referral_id = payout_referral(payout)
            handle = self._client.get_workflow_handle(referral_id)
            try:
                _ = await handle.execute_update(
                    ReferralWorkflow.act,
                    payout,
                    id=payout.request_id,
                    rpc_timeout=timedelta(seconds=30),
                )
            except WorkflowUpdateFailedError as error:
                problems.append(f"{referral_id}: {getattr(error.cause, 'message', error)}")
            except RPCError as error:
                if error.status != RPCStatusCode.NOT_FOUND:
                    raise
                problems.append(f"{referral_id}: no such referral in Temporal")
            activity.heartbeat(referral_id)
        actor = request.payouts[0].actor if request.payouts else "system"
        deliveries = await asyncio.to_thread(
            recover, self._engine, request.state, actor, datetime.now(UTC)
        )
        await start_deliveries(self._client, deliveries, activity.info().task_queue)
        return problems

    @activity.defn(name=PREPARE_SCHEDULED)
    async def prepare_scheduled_runs(self) -> list[str]:
        """On the first business day of the month, with monthly payouts: a run per currency
        that has payable commissions, cut off today. Started under a fixed id, so a second
        start the same day (a retry, the Schedule catching up) starts nothing."""
        assert self._client is not None
        rules = self._program.payouts
        today = datetime.now(self._zone).date()
        first = first_business_day(today.year, today.month, self._program.calendar.country)
        if rules.schedule != "monthly" or today != first:
            return []
        currencies = await asyncio.to_thread(
            payable_currencies, self._engine, rules, datetime.now(UTC)
        )
        started = []
        for currency in currencies:
            run_id = scheduled_run_id(currency, today)
            try:
                await start_run(
                    self._client, rules, activity.info().task_queue, run_id, currency, today,
                    "schedule",
                )  # fmt: skip
            except WorkflowAlreadyStartedError:
                pass
            started.append(run_id)
        return started

    @activity.defn(name=NOTIFY)
    def notify_payees(self, notice: Notice) -> int:
        """Remittance to each payee a confirmed run paid, with their statement; or, for one
        whose payment failed, why and the credit note. Once each (by key)."""
        assert self._mailer is not None
        state, sent = notice.state, 0
        for item in state.items:
            if notice.kind == "confirmed" and not item.settled:
                continue
            if notice.kind == "failed" and item.payee_email != notice.payee_email:
                continue
            payee = load_payee(self._engine, item.payee_email)
            if payee is None:
                continue  # erased meanwhile: nobody to tell
            kind = "statement" if notice.kind == "confirmed" else "credit_note"
            attached = document(self._engine, f"{state.run_id}/{kind}/{item.payee_email}")
            facts = {
                "name": payee.legal_name,
                "number": item.statement_number,
                "credit_note": item.credit_note_number,
                "net": item.net,
                "currency": item.currency,
                "recovered": item.recovered,
                "execution_date": state.execution_date,
                "account": mask_iban(payee.iban),
                "reason": item.failed,
            }
            self._mailer.send_to_payee(
                f"payout-run-{state.run_id}/{item.payee_email}/{notice.kind}",
                payee.email,
                self._program.sender,
                payee.language,
                "payee_remittance" if notice.kind == "confirmed" else "payee_payment_failed",
                facts,
                [(attached.filename, attached.media_type, attached.content)] if attached else [],
            )
            sent += 1
        return sent
