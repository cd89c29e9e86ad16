"""Commission ledger and prospect claims on a real database (SQLite, and PostgreSQL in CI)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from temporalio.testing import ActivityEnvironment

from activities.db import CommissionEvent, CommissionRow, ProspectClaim
from activities.ledger import LedgerActivities
from workflows.models.ledger import CommissionRecord, CommissionStatus
from workflows.models.referral import ProspectRelease

T0 = datetime(2027, 1, 10, 9, 0, tzinfo=UTC)


def record(event_key: str, status: CommissionStatus, paid: str, hours: int = 0) -> CommissionRecord:
    return CommissionRecord(
        referral_id="R-LEDGER0001",
        referrer_email="claire.martin@conseil-martin.example",
        referrer_name="Claire Martin",
        basis_amount=Decimal("180000.00"),
        rate=Decimal("0.10"),
        amount=Decimal("18000.00"),
        currency="EUR",
        customer_paid=Decimal(paid),
        status=status,
        event_key=event_key,
        event="won",
        at=T0 + timedelta(hours=hours),
        actor="finance-bot",
        note=None,
    )


def test_ledger_follows_the_referral_and_keeps_history(engine: Engine) -> None:
    ledger = LedgerActivities(engine)
    env = ActivityEnvironment()
    steps = [
        record("R-LEDGER0001/5", CommissionStatus.PENDING, "0"),
        record("R-LEDGER0001/6", CommissionStatus.PENDING, "100000.00", 1),
        record("R-LEDGER0001/7", CommissionStatus.PAYABLE, "180000.00", 2),
        record("R-LEDGER0001/8", CommissionStatus.PAID, "180000.00", 3),
    ]
    for step in steps:
        assert env.run(ledger.record_commission, step) is True
    with Session(engine) as session:
        row = session.get(CommissionRow, "R-LEDGER0001")
        assert row is not None
        assert row.status == "paid"
        assert row.amount == Decimal("18000.00")
        assert row.customer_paid == Decimal("180000.00")
        assert row.currency == "EUR"
        events = session.exec(select(CommissionEvent).order_by(col(CommissionEvent.at))).all()
        assert [e.status for e in events] == ["pending", "pending", "payable", "paid"]
        assert events[1].customer_paid == Decimal("100000.00")


def test_a_retried_write_is_applied_once(engine: Engine) -> None:
    ledger = LedgerActivities(engine)
    env = ActivityEnvironment()
    first = record("R-LEDGER0001/5", CommissionStatus.PENDING, "0")
    assert env.run(ledger.record_commission, first) is True
    assert env.run(ledger.record_commission, first) is False
    with Session(engine) as session:
        assert len(session.exec(select(CommissionEvent)).all()) == 1
        assert len(session.exec(select(CommissionRow)).all()) == 1


def test_release_only_frees_the_referrals_own_claim(engine: Engine) -> None:
    ledger = LedgerActivities(engine)
    with Session(engine) as session:
        session.add(ProspectClaim(domain="acme.fr", referral_id="R-NEW"))
        session.commit()
    ActivityEnvironment().run(
        ledger.release_prospect, ProspectRelease(domain="acme.fr", referral_id="R-OLD")
    )
    with Session(engine) as session:
        assert session.get(ProspectClaim, "acme.fr") is not None
    ActivityEnvironment().run(
        ledger.release_prospect, ProspectRelease(domain="acme.fr", referral_id="R-NEW")
    )
    with Session(engine) as session:
        assert session.get(ProspectClaim, "acme.fr") is None


def test_concurrent_claims_for_one_prospect_admit_exactly_one(engine: Engine) -> None:
    """The primary key, not a read-then-write check, decides between racing submissions."""
    start = threading.Barrier(12)
    won: list[str] = []
    lost: list[str] = []

    def claim(n: int) -> None:
        start.wait()
        try:
            with Session(engine) as session:
                session.add(ProspectClaim(domain="bellevue.example", referral_id=f"R-{n}"))
                session.commit()
            won.append(f"R-{n}")
        except IntegrityError:
            lost.append(f"R-{n}")

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == 11
    with Session(engine) as session:
        claim_row = session.get(ProspectClaim, "bellevue.example")
        assert claim_row is not None and claim_row.referral_id == won[0]
