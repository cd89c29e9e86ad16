"""Program figures (starter/figures.py) over a database filled with known referrals.

The referrals are walked through the one transition table (`apply_action`) at chosen instants,
with the contact timers firing as the workflow's would, and recorded the way the workflow
records them (`save_referral`, `save_commission` with its ledger lines). Every expected number
below was worked out by hand from the table in `known_referrals`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from activities.ledger import save_commission
from activities.records import save_referral
from devstack.factories import fire_contact_timers, referral_input
from starter.cli import run
from starter.figures import ProgramFigures, percentile, program_figures
from workflows.models.ledger import CommissionRecord
from workflows.models.program import ProgramRules
from workflows.models.referral import HistoryEntry, ReferralRecord, ReferralState, StaffAction
from workflows.models.values import Action
from workflows.transitions import apply_action, commission_lines, expire, initial_state

NOW = datetime(2027, 3, 15, 12, 0, tzinfo=UTC)
ALICE = "alice@partner-a.example"
BOB = "bob@partner-b.example"
CAROL = "carol@partner-c.example"
FINANCIALS = "cloudsuite-financials"
HCM = "hcm-talent"  # 15 %, capped at 20 000 EUR


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


def days(n: float) -> timedelta:
    return timedelta(days=n)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass
class Story:
    """One referral: received at `received`, then each step `after` the previous one."""

    referral_id: str
    product: str
    referrer: str
    received: str
    steps: list[tuple[timedelta, str, dict[str, Any]]] = field(default_factory=list)


def step(after: timedelta, action: str, **options: Any) -> tuple[timedelta, str, dict[str, Any]]:
    return after, action, options


def known_referrals() -> list[Story]:
    """Twelve referrals, all received on a Monday at 09:00 UTC but R2 (a Friday night).
    The contact reminder falls about 85 h after a Monday receipt, the deadline about 181 h.

    time in submitted (h): 24 24 24 48 48 48 72 72 96 120 200  (R11 still waiting)
    time in contacted (h): 24 24 24 24 24 48 48 48 72 96
    time in qualifying (d): 5 10 10 10 20 20 30 180            (R10 still qualifying)
    time in approved (d): 30 30 45 60 90                         (R12 still approved)
    time in won (d): 10 30 45; in commission_payable (d): 15
    """
    won = {"amount": "100000", "currency": "EUR"}
    return [
        Story("R-FIG01", FINANCIALS, ALICE, "2026-10-05 09:00", [
            step(hours(24), "contacted"), step(hours(24), "accept"), step(days(10), "approve"),
            step(days(30), "won", **won),  # 16 Nov: commission 10 000.00
            step(days(30), "payment", amount="100000", reference="PAY-1"),
            step(days(15), "payout", reference="OUT-1"),
        ]),
        # Won at 23:30 UTC on 31 Dec: already January in Paris.
        Story("R-FIG02", FINANCIALS, ALICE, "2026-10-09 23:30", [
            step(hours(48), "contacted"), step(hours(24), "accept"), step(days(20), "approve"),
            step(days(60), "won", amount="200000", currency="EUR"),  # commission 20 000.00
            step(days(45), "payment", amount="200000", reference="PAY-2"),
            step(days(5), "refund", amount="50000", reference="CN-2", reason="one site dropped"),
        ]),
        # Won, commission pending; its protection date (1 Apr 2027) is kept but runs no more.
        Story("R-FIG03", HCM, BOB, "2026-09-28 09:00", [
            step(hours(72), "contacted"), step(hours(48), "accept"), step(days(10), "approve"),
            step(days(45), "won", amount="300000", currency="EUR"),  # 45 000 capped: 20 000
        ]),
        Story("R-FIG04", FINANCIALS, BOB, "2026-09-14 09:00", [
            step(hours(24), "contacted"), step(hours(48), "accept"), step(days(30), "approve"),
            step(days(90), "lost", reason="chose a competitor"),
        ]),
        # Contacted after the reminder, before the deadline.
        Story("R-FIG05", FINANCIALS, CAROL, "2026-09-21 09:00", [
            step(hours(96), "contacted"), step(hours(24), "accept"),
            step(days(5), "reject", reason="no budget"),
        ]),
        Story("R-FIG06", FINANCIALS, CAROL, "2026-10-12 09:00", [
            step(hours(48), "contacted"), step(hours(72), "decline", reason="not a fit"),
        ]),
        # Declined without a contact; a refused `contacted` afterwards counts for nothing.
        Story("R-FIG07", FINANCIALS, ALICE, "2026-10-19 09:00", [
            step(hours(120), "decline", reason="existing customer"),
            step(hours(1), "refused contacted"),
        ]),
        Story("R-FIG08", HCM, ALICE, "2026-09-07 09:00", [
            step(hours(24), "contacted"), step(hours(24), "accept"), step(days(180), "expire"),
        ]),
        Story("R-FIG09", FINANCIALS, BOB, "2026-10-26 09:00", [
            step(hours(48), "contacted"), step(hours(48), "accept"), step(days(10), "approve"),
            step(days(30), "won", amount="50000", currency="EUR"),
            step(days(10), "cancel", reason="customer withdrew"),  # commission void
        ]),
        # Qualifying; protected until 27 Mar 2027 09:00 UTC, 12 days after NOW.
        Story("R-FIG10", FINANCIALS, CAROL, "2026-09-21 09:00", [
            step(hours(72), "contacted"), step(hours(96), "accept"),
        ]),
        # Never contacted: its deadline (8 Mar 2027) passed this month.
        Story("R-FIG11", HCM, BOB, "2027-03-01 09:00"),
        # Contacted after its deadline (January); approved, protected until July.
        Story("R-FIG12", FINANCIALS, ALICE, "2027-01-11 09:00", [
            step(hours(200), "contacted"), step(hours(24), "accept"), step(days(20), "approve"),
        ]),
    ]  # fmt: skip


def record(engine: Engine, rules: ProgramRules, story: Story) -> None:
    """Walk `story` and record it, as it stands at NOW."""
    given = referral_input(
        rules,
        story.referral_id,
        utc(story.received),
        **{
            "referrer.email": story.referrer,
            "prospect.website": f"https://{story.referral_id.lower()}.example",
            "opportunity.product": story.product,
        },
    )
    state = initial_state(given)
    moment = utc(story.received)
    for after, action, options in story.steps:
        moment += after
        state = fire_contact_timers(state, moment)
        if action == "expire":
            state = expire(state, moment)
        elif action.startswith("refused "):
            state.history.append(
                HistoryEntry(
                    at=moment, action=action.removeprefix("refused "), actor="desk-anna",
                    note="refused: closed", outcome="refused", seq=state.next_seq(),
                )
            )  # fmt: skip
        else:
            request = StaffAction(action=Action(action), actor="desk-anna", **options)
            new = apply_action(state, request, rules, moment)
            assert isinstance(new, ReferralState), new
            if new.commission is not None:
                entry = new.history[-1]
                ledger = CommissionRecord.after(
                    new,
                    event=action,
                    event_key=f"{story.referral_id}/{entry.seq}",
                    at=moment,
                    actor=entry.actor,
                    note=entry.note,
                )
                ledger.lines = commission_lines(state, new, request)
                save_commission(engine, ledger)
            state = new
    state = fire_contact_timers(state, NOW)
    save_referral(
        engine, ReferralRecord(state=state.model_copy(update={"history": []}), events=state.history)
    )


@pytest.fixture
def known(engine: Engine, shipped_rules: ProgramRules) -> Engine:
    for story in known_referrals():
        record(engine, shipped_rules, story)
    return engine


def funnel(figures: ProgramFigures) -> list[tuple[str, int, str | None]]:
    return [
        (s.stage.value, s.referrals, str(s.conversion) if s.conversion is not None else None)
        for s in figures.funnel
    ]


def test_the_figures_of_the_known_referrals(known: Engine, shipped_rules: ProgramRules) -> None:
    figures = program_figures(known, shipped_rules, now=NOW)

    assert figures.referrals == 12
    assert funnel(figures) == [
        ("submitted", 12, None),
        ("contacted", 10, "0.8333"),
        ("qualifying", 9, "0.9000"),
        ("approved", 6, "0.6667"),
        ("won", 4, "0.6667"),
        ("commission_payable", 2, "0.5000"),
        ("commission_paid", 1, "0.5000"),
    ]
    assert {s.stage.value: s.referrals for s in figures.ended} == {
        "declined": 2,
        "rejected": 1,
        "lost": 1,
        "expired": 1,
        "cancelled": 1,
    }
    assert [
        (t.stage.value, t.referrals, str(t.median_days), str(t.p90_days))
        for t in figures.time_in_stage
    ] == [
        ("submitted", 11, "2.00", "5.00"),
        ("contacted", 10, "1.50", "3.10"),
        ("qualifying", 8, "15.00", "75.00"),
        ("approved", 5, "45.00", "78.00"),
        ("won", 3, "30.00", "42.00"),
        ("commission_payable", 1, "15.00", "15.00"),
    ]

    contact = figures.contact
    assert (contact.contacted, contact.before_reminder, contact.before_deadline) == (10, 8, 9)
    assert (contact.before_reminder_share, contact.before_deadline_share) == (
        Decimal("0.8000"),
        Decimal("0.9000"),
    )
    assert contact.month == "2027-03"
    assert [(b.referral_id, b.stage.value, b.contact_deadline) for b in contact.breaches] == [
        ("R-FIG11", "submitted", utc("2027-03-08 23:00"))  # 00:00 in Paris, end of Mon 8 Mar
    ]

    # R-FIG03 (won) keeps a date in the window, R-FIG08's has passed, R-FIG12's is in July.
    assert [
        (p.referral_id, p.stage.value, p.protected_until) for p in figures.expiring_protections
    ] == [("R-FIG10", "qualifying", utc("2027-03-27 09:00"))]

    assert [
        (m.month, m.currency, str(m.pending), str(m.payable), str(m.paid))
        for m in figures.commission_by_month
    ] == [
        ("2026-11", "EUR", "20000.00", "0.00", "10000.00"),
        ("2027-01", "EUR", "0.00", "15000.00", "0.00"),  # 20 000 less a 5 000 clawback
    ]
    assert [(r.referrer_email, r.referrals, r.won) for r in figures.top_referrers] == [
        (ALICE, 5, 2),
        (BOB, 4, 2),
        (CAROL, 3, 0),
    ]
    assert [(e.referrer_email, e.currency, str(e.earned)) for e in figures.top_earners] == [
        (ALICE, "EUR", "25000.00"),
        (BOB, "EUR", "20000.00"),  # R-FIG09's 5 000 voided
    ]


def test_one_product(known: Engine, shipped_rules: ProgramRules) -> None:
    figures = program_figures(known, shipped_rules, product=HCM, now=NOW)

    assert figures.referrals == 3
    assert funnel(figures) == [
        ("submitted", 3, None),
        ("contacted", 2, "0.6667"),
        ("qualifying", 2, "1.0000"),
        ("approved", 1, "0.5000"),
        ("won", 1, "1.0000"),
        ("commission_payable", 0, "0.0000"),
        ("commission_paid", 0, None),
    ]
    assert {s.stage.value: s.referrals for s in figures.ended}["expired"] == 1
    assert [(t.stage.value, t.referrals, t.median_days) for t in figures.time_in_stage][:3] == [
        ("submitted", 2, Decimal("2.00")),  # 24 h and 72 h
        ("contacted", 2, Decimal("1.50")),
        ("qualifying", 2, Decimal("95.00")),  # 10 and 180 days
    ]
    assert (figures.contact.contacted, figures.contact.before_reminder) == (2, 2)
    assert [b.referral_id for b in figures.contact.breaches] == ["R-FIG11"]
    assert figures.expiring_protections == []
    assert [(m.month, str(m.pending)) for m in figures.commission_by_month] == [
        ("2026-11", "20000.00")
    ]
    assert [(e.referrer_email, str(e.earned)) for e in figures.top_earners] == [(BOB, "20000.00")]


def test_since_a_date_in_the_program_time_zone(known: Engine, shipped_rules: ProgramRules) -> None:
    # R-FIG02 was received at 23:30 UTC on 9 Oct, already the 10th in Paris.
    figures = program_figures(known, shipped_rules, since=date(2026, 10, 10), now=NOW)

    assert figures.referrals == 6  # R-FIG02, and those received from the 12th on
    assert [s.referrals for s in figures.funnel] == [6, 4, 3, 3, 2, 1, 0]
    assert [(r.referrer_email, r.referrals) for r in figures.top_referrers] == [
        (ALICE, 3),
        (BOB, 2),
        (CAROL, 1),
    ]
    assert [(m.month, str(m.payable)) for m in figures.commission_by_month] == [
        ("2027-01", "15000.00")
    ]


def test_no_referrals(engine: Engine, shipped_rules: ProgramRules) -> None:
    figures = program_figures(engine, shipped_rules, now=NOW)

    assert figures.referrals == 0
    assert [s.conversion for s in figures.funnel] == [None] * 7
    assert all(t.referrals == 0 and t.median_days is None for t in figures.time_in_stage)
    assert figures.contact.before_reminder_share is None
    assert figures.commission_by_month == figures.top_earners == figures.top_referrers == []


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([1, 2, 3, 4], Decimal("0.5")) == Decimal("2.5")
    assert percentile([10, 20, 30, 40, 50], Decimal("0.9")) == Decimal("46")
    assert percentile([7], Decimal("0.9")) == 7


# --- referrals report ---------------------------------------------------------------------


@pytest.fixture
def report_env(known: Engine, program_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFERRALS_DATABASE_URL", known.url.render_as_string(hide_password=False))
    monkeypatch.setenv("REFERRALS_PROGRAM", str(program_file))


@pytest.mark.usefixtures("report_env")
def test_report_json_holds_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["report", "--product", HCM, "--since", "2026-09-01", "--json"]) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed["product"] == HCM
    assert printed["since"] == "2026-09-01"
    assert [s["referrals"] for s in printed["funnel"]] == [3, 2, 2, 1, 1, 0, 0]
    assert printed["funnel"][1]["conversion"] == "0.6667"
    assert printed["commission_by_month"] == [
        {"month": "2026-11", "currency": "EUR", "pending": "20000.00", "payable": "0.00",
         "paid": "0.00"}
    ]  # fmt: skip


@pytest.mark.usefixtures("report_env")
def test_report_in_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["report"]) == 0

    out = capsys.readouterr().out
    assert "Funnel" in out and "Time in stage" in out and "Commission by month" in out
    lines = out.splitlines()
    assert "  contacted                  10      83.3 %" in lines
    assert "  submitted                  11     2.00     5.00" in lines
    assert "  2027-01   EUR          0.00     15000.00         0.00" in lines
    assert "  alice@partner-a.example                          5     2" in lines
    assert "  bob@partner-b.example                   EUR      20000.00" in lines


@pytest.mark.usefixtures("report_env")
def test_report_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["report", "--product", "no-such-product"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "unknown product 'no-such-product'" in err[0]

    with pytest.raises(SystemExit) as usage:
        run(["report", "--since", "last week"])
    assert usage.value.code == 2
