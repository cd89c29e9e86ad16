"""Payout runs' database side: what a run collects from the ledger (one item per payee, with
its holds) and the run's current facts, written after each change (docs/payouts.md)."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError
from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete, select
from temporalio import activity

from activities.db import CommissionLineRow, PayoutClaimRow, PayoutItemRow, PayoutRunRow, as_utc
from activities.ledger import ledger_sums
from activities.payees import all_payees, iban_owners
from core.payees import PayeeProfile
from workflows.models import LineKind, PayoutRules, round_money
from workflows.payout_run import COLLECT, RECORD
from workflows.payouts import (
    LIVE,
    HoldReason,
    ItemReferral,
    PayoutItem,
    Recovery,
    RunState,
)

_LINE: Any = CommissionLineRow.__table__.c  # type: ignore[attr-defined]


def collect_items(
    engine: Engine, rules: PayoutRules, zone: ZoneInfo, run: RunState, now: datetime
) -> list[PayoutItem]:
    """The run's items: per payee, every commission in the run's currency payable on or
    before the cutoff less the holding period and in no other live run, less what the payee
    owes from clawbacks after earlier payouts. Claims what it takes, in one transaction;
    repeated (a retried activity), it collects the same."""
    currency = run.currency
    last_day = run.cutoff - timedelta(days=rules.holding_days)
    with Session(engine) as session:
        taken = {
            claim.referral_id
            for claim in session.exec(
                select(PayoutClaimRow).where(PayoutClaimRow.run_id != run.run_id)
            )
        }
        payable_since = dict(
            session.execute(
                sa_select(_LINE.referral_id, func.min(_LINE.at))
                .where(_LINE.kind == LineKind.PAYABLE.value, _LINE.currency == currency)
                .group_by(_LINE.referral_id)
            ).all()
        )
        sums = session.execute(
            ledger_sums(_LINE.referrer_email, _LINE.referral_id, _LINE.currency).where(
                _LINE.currency == currency
            )
        ).all()
        due: dict[str, list[ItemReferral]] = defaultdict(list)
        owed: dict[str, list[Recovery]] = defaultdict(list)
        for email, referral_id, _, earned, clawed, paid, payable in sums:
            if referral_id in taken:
                continue
            # Sums as the database keeps money (4 places), in the currency's minor unit.
            balance = round_money(Decimal(earned) + Decimal(clawed) - Decimal(paid), currency)
            payable = round_money(Decimal(payable), currency)
            if payable > 0 and referral_id in payable_since:
                since = as_utc(payable_since[referral_id])
                if since.astimezone(zone).date() <= last_day:
                    due[email].append(
                        ItemReferral(referral_id=referral_id, amount=payable, payable_at=since)
                    )
            elif balance < 0:
                owed[email].append(Recovery(referral_id=referral_id, amount=-balance))
        payees = all_payees(engine)
        accounts = iban_owners(engine)
        items = []
        for email in sorted(due):
            referrals = sorted(due[email], key=lambda r: (r.payable_at, r.referral_id))
            item = PayoutItem(
                payee_email=email,
                currency=currency,
                referrals=referrals,
                gross=sum((r.amount for r in referrals), Decimal(0)),
                recoveries=owed.get(email, []),
            )
            item.holds = holds(item, payees.get(email), accounts, rules, now)
            items.append(item)
        session.exec(delete(PayoutClaimRow).where(col(PayoutClaimRow.run_id) == run.run_id))
        for item in items:
            for referral_id in [r.referral_id for r in item.referrals] + [
                r.referral_id for r in item.recoveries
            ]:
                session.add(PayoutClaimRow(referral_id=referral_id, run_id=run.run_id))
        session.commit()
    return items


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


class PayoutActivities:
    def __init__(self, engine: Engine, rules: PayoutRules, zone: ZoneInfo) -> None:
        self._engine = engine
        self._rules = rules
        self._zone = zone

    @activity.defn(name=COLLECT)
    def collect_payout_items(self, run: RunState) -> list[PayoutItem]:
        return collect_items(self._engine, self._rules, self._zone, run, datetime.now(UTC))

    @activity.defn(name=RECORD)
    def record_payout_run(self, state: RunState) -> bool:
        return save_run(self._engine, state, datetime.now(UTC))
