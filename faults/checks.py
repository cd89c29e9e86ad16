"""What "nothing lost, nothing duplicated" means, checked against what really happened.

Evidence comes from outside the product wherever it exists: emails from what the SMTP
server accepted (a second delivery of one Message-ID is a duplicate, whatever the product
believes it sent), the ledger and the system of record from the database read directly,
and each referral's final state from its workflow's result. Expected values (stages,
amounts, email keys) are derived from the contract, not from the product's code.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from activities.db import CommissionEvent, CommissionRow, WebhookDeliveryRow
from activities.email import message_id
from activities.queries import load_referral
from faults.driver import CURRENCY, DEAL_AMOUNT, FINAL_STAGE, Batch, lifecycle
from faults.smtp import RecordingSmtpServer
from faults.webhooks import BACKLOG_KEY, LIFECYCLE_EVENTS
from workflows.models.program import ProgramRules
from workflows.models.referral import HistoryEntry, ReferralState

REFERRER_STAGES = (
    "submitted",
    "contacted",
    "qualifying",
    "approved",
    "won",
    "commission_payable",
    "commission_paid",
)
STAFF_TEMPLATES = (
    "staff_new_referral",
    "staff_sales_handoff",
    "staff_deal_won",
    "staff_commission_payable",
)
LEDGER_EVENTS = ("won", "payment", "payout")


@dataclass
class Findings:
    lost: int = 0
    duplicated: int = 0
    problems: list[str] = field(default_factory=list)

    def add_lost(self, what: str, count: int = 1) -> None:
        self.lost += count
        self.problems.append(f"LOST {what}")

    def add_duplicated(self, what: str, count: int = 1) -> None:
        self.duplicated += count
        self.problems.append(f"DUPLICATED {what}")


def expected_commission(rules: ProgramRules) -> Decimal:
    amount = DEAL_AMOUNT * rules.commission.rate
    if rules.commission.cap is not None:
        amount = min(amount, rules.commission.cap)
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def verify(
    batch: Batch,
    engine: Engine,
    smtp: RecordingSmtpServer,
    rules: ProgramRules,
    refused_addresses: frozenset[str] = frozenset(),
) -> Findings:
    findings = Findings()
    commission = expected_commission(rules)
    with Session(engine) as session:
        rows = {row.referral_id: row for row in session.exec(select(CommissionRow)).all()}
        events = list(session.exec(select(CommissionEvent)).all())
    deliveries = smtp.deliveries_by_message_id()
    expected_ids: set[str] = set()

    for referral in batch.referrals:
        rid = referral.referral_id
        final = referral.final
        if final is None or final.stage != FINAL_STAGE:
            stage = final.stage.value if final is not None else "no result"
            findings.add_lost(
                f"{rid}: workflow ended {stage}, not {FINAL_STAGE.value}"
                + (f" ({referral.error})" if referral.error else "")
            )
        recorded = load_referral(engine, rid)
        _check_record(findings, rid, final, recorded)
        if final is not None:
            _check_history(findings, batch, rid, final)
        _check_ledger(findings, rid, rows.get(rid), commission)
        _check_ledger_events(findings, rid, [e for e in events if e.referral_id == rid])
        refused = referral.referrer_email.lower() in refused_addresses
        expected_ids |= _check_emails(findings, rules, rid, final, deliveries, refused)

    ours = {r.referral_id for r in batch.referrals}
    for rid in set(rows) - ours:
        findings.add_duplicated(f"ledger row for unknown referral {rid}")
    for mid, count in deliveries.items():
        if mid not in expected_ids:
            keys = {d.idempotency_key for d in smtp.deliveries if d.message_id == mid}
            findings.add_duplicated(
                f"unexpected email {mid} (key {', '.join(sorted(keys))}) delivered {count}x",
                count,
            )
    return findings


def _check_record(
    findings: Findings, rid: str, final: ReferralState | None, recorded: ReferralState | None
) -> None:
    """The system of record must say what the workflow ended with."""
    if recorded is None:
        findings.add_lost(f"{rid}: not in the system of record")
        return
    if final is None:  # already counted lost; the record cannot be compared
        return
    if recorded.stage != final.stage or recorded.revision != final.revision:
        findings.add_lost(
            f"{rid}: system of record at {recorded.stage.value} rev {recorded.revision}, "
            f"workflow at {final.stage.value} rev {final.revision}"
        )
    ours, theirs = final.commission, recorded.commission
    if (ours is None) != (theirs is None) or (
        ours is not None
        and theirs is not None
        and (
            ours.amount != theirs.amount
            or ours.currency != theirs.currency
            or ours.status != theirs.status
            or ours.customer_paid != theirs.customer_paid
            or ours.basis_amount != theirs.basis_amount
        )
    ):
        findings.add_lost(f"{rid}: commission in the system of record {theirs} != {ours}")
    wanted = Counter(_entry_key(e) for e in final.history)
    stored = Counter(_entry_key(e) for e in recorded.history)
    missing, extra = wanted - stored, stored - wanted
    if missing:
        findings.add_lost(
            f"{rid}: history entries missing from the system of record: {sorted(missing)}",
            sum(missing.values()),
        )
    if extra:
        findings.add_duplicated(
            f"{rid}: history entries only in the system of record: {sorted(extra)}",
            sum(extra.values()),
        )


def _entry_key(entry: HistoryEntry) -> tuple[int, str, str, str]:
    return (-1 if entry.seq is None else entry.seq, entry.action, entry.actor, entry.outcome)


def _check_history(findings: Findings, batch: Batch, rid: str, final: ReferralState) -> None:
    """Each staff action applied exactly once, and no delivery of it refused."""
    referral = next(r for r in batch.referrals if r.referral_id == rid)
    ours = set(referral.request_ids)
    applied = Counter(
        e.action for e in final.history if e.outcome == "applied" and e.request_id in ours
    )
    for request in lifecycle(rid):
        count = applied[request.action.value]
        if count == 0:
            findings.add_lost(f"{rid}: staff action {request.action.value} not in the history")
        elif count > 1:
            findings.add_duplicated(
                f"{rid}: staff action {request.action.value} applied {count}x", count - 1
            )
    refused = [e for e in final.history if e.outcome == "refused"]
    if refused:
        findings.add_duplicated(
            f"{rid}: repeated deliveries recorded as refused: "
            + "; ".join(f"{e.action} ({e.note})" for e in refused),
            len(refused),
        )


def _check_ledger(
    findings: Findings, rid: str, row: CommissionRow | None, commission: Decimal
) -> None:
    if row is None:
        findings.add_lost(f"{rid}: no commission ledger row")
        return
    if (
        Decimal(row.amount) != commission
        or row.currency != CURRENCY
        or row.status != "paid"
        or Decimal(row.customer_paid) != DEAL_AMOUNT
    ):
        findings.add_lost(
            f"{rid}: ledger row {row.amount} {row.currency} {row.status} "
            f"(customer paid {row.customer_paid}), expected {commission} {CURRENCY} paid"
        )


def _check_ledger_events(findings: Findings, rid: str, events: list[CommissionEvent]) -> None:
    """One audit event per business event: won, the one payment, payout."""
    counts = Counter(e.event for e in events)
    for event in LEDGER_EVENTS:
        if counts[event] == 0:
            findings.add_lost(f"{rid}: no ledger event {event}")
        elif counts[event] > 1:
            keys = sorted(e.event_key for e in events if e.event == event)
            findings.add_duplicated(
                f"{rid}: ledger event {event} recorded {counts[event]}x ({keys})",
                counts[event] - 1,
            )
    for event in set(counts) - set(LEDGER_EVENTS):
        findings.add_duplicated(f"{rid}: unexpected ledger event {event}", counts[event])


def _check_emails(
    findings: Findings,
    rules: ProgramRules,
    rid: str,
    final: ReferralState | None,
    deliveries: Counter[str],
    refused: bool,
) -> set[str]:
    """Every expected email delivered once; those refused for good recorded as failed, with
    the desk told once. Returns the Message-IDs this referral may account for."""
    sender = str(rules.sender)
    to_deliver = [f"{rid}/{template}" for template in STAFF_TEMPLATES]
    referrer = [(f"{rid}/referrer/{stage}", f"referrer_{stage}") for stage in REFERRER_STAGES]
    must_fail = referrer if refused else []
    to_deliver += [f"{key}/failure-notice" for key, _ in must_fail]
    to_deliver += [] if refused else [key for key, _ in referrer]
    allowed: set[str] = set()
    for key in to_deliver:
        mid = message_id(key, sender)
        allowed.add(mid)
        count = deliveries.get(mid, 0)
        if count == 0:
            findings.add_lost(f"{rid}: email {key} never delivered")
        elif count > 1:
            findings.add_duplicated(f"{rid}: email {key} delivered {count}x", count - 1)
    failures = Counter(
        _failed_template(e)
        for e in (final.history if final is not None else [])
        if e.action == "email_failed"
    )
    for key, template in must_fail:
        mid = message_id(key, sender)
        allowed.add(mid)
        if deliveries.get(mid, 0):
            findings.add_duplicated(f"{rid}: email {key} delivered although refused")
        if failures[template] == 0:
            findings.add_lost(f"{rid}: refused email {key} not recorded as failed")
        elif failures[template] > 1:
            findings.add_duplicated(
                f"{rid}: failure of {key} recorded {failures[template]}x",
                failures[template] - 1,
            )
    keys = {template: key for key, template in referrer} | {
        template: f"{rid}/{template}" for template in STAFF_TEMPLATES
    }
    for template in sorted(set(failures) - {template for _, template in must_fail}):
        key = keys.get(template, template)
        if deliveries.get(message_id(key, sender), 0):  # (undelivered: counted lost above)
            findings.add_duplicated(f"{rid}: email {key} delivered but recorded as failed")
        else:
            findings.problems.append(f"NOTE {rid}: {key} given up on after transient failures")
    return allowed


def _failed_template(entry: HistoryEntry) -> str:
    """`email to X failed (TEMPLATE): reason` -> TEMPLATE."""
    note = entry.note or ""
    start = note.find("(")
    end = note.find(")", start)
    return note[start + 1 : end] if 0 <= start < end else note


def verify_outbox(batch: Batch, engine: Engine, url: str, backlog: set[str]) -> Findings:
    """Each lifecycle event of each referral has one message for `url` in the outbox, and the
    backlog's messages are all still there. Whether they were delivered is not checked: an
    endpoint that never answers can take none of them."""
    findings = Findings()
    with Session(engine) as session:
        rows = list(
            session.exec(select(WebhookDeliveryRow).where(WebhookDeliveryRow.endpoint_url == url))
        )
    for referral in batch.referrals:
        rid = referral.referral_id
        counts = Counter(
            row.event_type
            for row in rows
            if row.referral_id == rid and f"/{BACKLOG_KEY}-" not in row.event_key
        )
        for event in LIFECYCLE_EVENTS:
            if counts[event] == 0:
                findings.add_lost(f"{rid}: no webhook message for {event}")
            elif counts[event] > 1:
                findings.add_duplicated(
                    f"{rid}: {counts[event]} webhook messages for {event}", counts[event] - 1
                )
        for event in set(counts) - set(LIFECYCLE_EVENTS):
            findings.add_duplicated(f"{rid}: unexpected webhook message {event}", counts[event])
    missing = backlog - {row.id for row in rows}
    if missing:
        findings.add_lost(f"{len(missing)} backlog webhook messages gone", len(missing))
    return findings
