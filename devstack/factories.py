"""Realistic data built from the shipped example and program: submissions, inputs, and
referrals as they stand at a stage."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from devstack.settings import ROOT
from starter.contact_window import contact_window
from starter.intake import parse_submission
from workflows.models.ledger import Commission, CommissionStatus
from workflows.models.program import ProgramRules
from workflows.models.referral import HistoryEntry, ReferralInput, ReferralState, Stage, Submission

RECEIVED = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
# The submission's free-text fields that hold one line (the notes may hold several).
ONE_LINE_FIELDS = [
    "referrer.name",
    "referrer.company",
    "referrer.phone",
    "prospect.company",
    "prospect.industry",
    "contact.name",
    "contact.title",
    "contact.phone",
]


def submission_data(**changes: Any) -> dict[str, Any]:
    """The example referral as a dict; `changes` maps 'section.field' to a new value."""
    data: dict[str, Any] = json.loads((ROOT / "examples" / "referral.json").read_text())
    for path, value in changes.items():
        section, _, field = path.partition(".")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return data


def submission(**changes: Any) -> Submission:
    return parse_submission(submission_data(**changes))


def referral_input(
    rules: ProgramRules,
    referral_id: str = "R-TEST000001",
    received_at: datetime = RECEIVED,
    **changes: Any,
) -> ReferralInput:
    return ReferralInput(
        referral_id=referral_id,
        submission=submission(**changes),
        rules=rules,
        contact_window=contact_window(received_at, rules.calendar, rules.contact),
    )


def state_at(stage: Stage, rules: ProgramRules, basis: str = "180000.00") -> ReferralState:
    """A referral already in `stage`, with a commission from `won` on."""
    given = referral_input(rules)
    window = given.contact_window
    sub = given.submission
    state = ReferralState(
        referral_id=given.referral_id,
        stage=stage,
        referrer=sub.referrer,
        prospect=sub.prospect,
        prospect_domain=sub.prospect.domain,
        contact=sub.contact,
        opportunity=sub.opportunity,
        product_name="CloudSuite Financials",
        submitted_at=window.received_at,
        contact_reminder_at=window.reminder_at,
        contact_deadline=window.deadline,
        contact_calendar=window,
        history=[HistoryEntry(at=window.received_at, action="submitted", actor="referrer")],
    )
    if stage in (Stage.QUALIFYING, Stage.APPROVED):
        state.protected_until = window.received_at + timedelta(days=rules.protection.days)
    if stage in (Stage.WON, Stage.COMMISSION_PAYABLE):
        paid = Decimal(basis) if stage is Stage.COMMISSION_PAYABLE else Decimal("0")
        state.commission = Commission(
            basis_amount=Decimal(basis),
            rate=rules.commission.rate,
            amount=Decimal(basis) * rules.commission.rate,
            currency="EUR",
            customer_paid=paid,
            status=CommissionStatus.PAYABLE if paid else CommissionStatus.PENDING,
        )
    return state


def fire_contact_timers(state: ReferralState, moment: datetime) -> ReferralState:
    """What the workflow's contact reminder and escalation do once `moment` is reached."""
    if state.stage is not Stage.SUBMITTED:
        return state
    state = state.model_copy(deep=True)
    timers = [
        (state.contact_reminder_at, "contact_reminder", "contact_reminder_sent"),
        (state.contact_deadline, "contact_sla_breached", "contact_sla_breached"),
    ]
    for instant, action, flag in timers:
        if instant <= moment and not getattr(state, flag):
            setattr(state, flag, True)
            state.history.append(
                HistoryEntry(
                    at=instant, action=action, actor="system", outcome="system",
                    seq=state.next_seq(),
                )
            )  # fmt: skip
    return state
