"""Paying referrers, part one: payee profiles, what a payout run collects and holds, and the
run's approvals (docs/payouts.md). A real database (SQLite, and PostgreSQL when given) and a
real Temporal server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.db import CommissionLineRow, PayeeEventRow, PayoutClaimRow, PayoutItemRow
from activities.ledger import balances
from activities.payees import accept_mandate, load_payee, save_payee
from activities.payouts import PayoutActivities, collect_items, load_run
from core.payees import (
    MANDATE_VERSION,
    MandateAcceptance,
    PayeeProfile,
    mandate_hash,
    mandate_text,
    mask_iban,
    problems,
)
from tests.conftest import SETTINGS, Cli, Live
from workflows.models import LineKind, PayingCompany, PayoutRules
from workflows.payout_run import PayoutRunWorkflow, run_workflow_id
from workflows.payouts import (
    HoldReason,
    RunAction,
    RunInput,
    RunRequest,
    RunState,
    RunStatus,
)

NOW = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)
ZONE = ZoneInfo("Europe/Paris")
RULES = PayoutRules(
    minimum={"EUR": Decimal("50.00"), "USD": Decimal("50.00")},
    company=PayingCompany(
        name="Nuage Logiciel SAS",
        address="12 rue des Nuages, 75002 Paris",
        iban="FR7630006000011234567890189",
        bic="AGRIFRPPXXX",
    ),
)
# Valid IBANs, one per payee (checksums computed by schwifty).
IBANS = {
    "a": "FR7630001007941234567890185",
    "b": "DE89370400440532013000",
    "c": "FR1420041010050500013M02606",
    "e": "GB29NWBK60161331926819",
    "f": "NL91ABNA0417164300",
}


def profile(letter: str, **changes: object) -> PayeeProfile:
    data: dict[str, object] = {
        "email": f"{letter}@partners.example",
        "legal_name": f"Partner {letter.upper()} SARL",
        "kind": "company",
        "country": "FR",
        "address": "1 place du Marché, 69001 Lyon",
        "siret": "73282932000074",
        "vat_id": "FR44732829320",
        "vat_regime": "fr_vat",
        "iban": IBANS.get(letter, IBANS["a"]),
        "bic": "BNPAFRPPXXX",
        "language": "en" if letter == "e" else "fr",
    }
    return PayeeProfile.model_validate(data | changes)


# --- the profile ---------------------------------------------------------------------------


def test_a_profile_is_checked_with_maintained_libraries_and_a_wrong_value_names_its_field() -> None:
    good = profile("a")
    assert good.vat_rate == Decimal("0.20") and good.iban == IBANS["a"]
    assert mask_iban(good.iban) == "FR76 •••• 0185"
    # The BIC comes from the IBAN where the bank is known.
    assert profile("a", bic=None).bic == "BDFEFRPP"
    for change, field in (
        ({"iban": "FR7630001007941234567890186"}, "iban"),  # checksum off by one
        ({"bic": "NOTABIC"}, "bic"),
        ({"siret": "73282932000075"}, "siret"),
        ({"siret": None}, "siret"),  # a French company has one
        ({"vat_id": "FR00000000000"}, "vat_id"),
        ({"vat_id": None}, "vat_id"),  # fr_vat needs one
        ({"vat_regime": "eu_reverse_charge"}, "vat_regime"),  # reverse charge is not for FR
        ({"kind": "individual"}, "vat_regime"),  # a private person is not registered
        ({"vat_regime": "franchise", "vat_rate": "0.2"}, "vat_rate"),
    ):
        with pytest.raises(ValidationError) as refused:
            profile("a", **change)
        assert field in problems(refused.value), (change, problems(refused.value))
    german = profile(
        "b", country="DE", siret=None, vat_id="DE136695976", vat_regime="eu_reverse_charge"
    )
    assert german.vat_rate is None
    person = profile("b", kind="individual", siret=None, vat_id=None, vat_regime="not_registered")
    assert person.kind == "individual"


def test_a_changed_iban_is_logged_masked_starts_the_cooldown_and_clears_a_rejection(
    engine: Engine,
) -> None:
    first = save_payee(engine, profile("a"), "finance-1", NOW)
    assert first.previous_iban is None and first.profile.iban_changed_at is None
    same = save_payee(engine, profile("a"), "finance-1", NOW)
    assert same.previous_iban is None  # nothing changed, nothing logged
    changed = save_payee(
        engine, profile("a", iban=IBANS["c"]), "finance-2", NOW + timedelta(days=1), "new bank"
    )
    assert changed.previous_iban == "FR76 •••• 0185"
    assert changed.profile.iban_changed_at == NOW + timedelta(days=1)
    with Session(engine) as session:
        log = [(e.change, e.actor, e.detail) for e in session.exec(select(PayeeEventRow))]
    assert log == [
        ("profile", "finance-1", "created"),
        (
            "profile",
            "finance-2",
            "iban (account FR76 •••• 0185 -> FR14 •••• 2606): new bank",
        ),
    ]
    assert IBANS["c"] not in str(log) and IBANS["a"] not in str(log)


def test_the_mandate_records_its_version_the_hash_of_the_text_shown_and_who(
    engine: Engine,
) -> None:
    assert RULES.company is not None
    save_payee(engine, profile("a"), "finance-1", NOW)
    text = mandate_text("fr", RULES.company, "Partner A SARL")
    assert "Partner A SARL" in text and "Nuage Logiciel SAS" in text and "289" in text
    assert "Self-billing" in mandate_text("en", RULES.company, "Partner A SARL")
    accepted = accept_mandate(
        engine,
        "A@partners.example",
        MandateAcceptance(
            version=MANDATE_VERSION,
            language="fr",
            text_sha256=mandate_hash(text),
            accepted_at=NOW,
            accepted_by="a@partners.example",
            channel="portal",
        ),
        NOW,
    )
    assert accepted.mandate_in_force
    assert load_payee(engine, "a@partners.example") == accepted
    # A later profile change keeps the mandate.
    kept = save_payee(engine, profile("a", address="2 quai Saint-Antoine, Lyon"), "x", NOW)
    assert kept.profile.mandate == accepted.mandate


# --- what a run collects --------------------------------------------------------------------


def _lines(
    engine: Engine, referral: str, email: str, *lines: tuple[LineKind, str, datetime]
) -> None:
    currency = "USD" if email.startswith("e@") else "EUR"
    with Session(engine) as session:
        for number, (kind, amount, at) in enumerate(lines):
            session.add(
                CommissionLineRow(
                    line_key=f"{referral}/{number}/{kind.value}",
                    referral_id=referral,
                    referrer_email=email,
                    kind=kind.value,
                    amount=Decimal(amount),
                    currency=currency,
                    at=at,
                    actor="test",
                )
            )
        session.commit()


def payable(engine: Engine, referral: str, email: str, amount: str, days_ago: int) -> None:
    at = NOW - timedelta(days=days_ago)
    _lines(engine, referral, email, (LineKind.ACCRUAL, amount, at), (LineKind.PAYABLE, amount, at))


def six_payees(engine: Engine) -> None:
    """The issue's fixture: A three payable referrals, B under the minimum, C payable less a
    clawback owed, D no profile, E in USD, F payable only 10 days ago."""
    for number, amount in enumerate(("100.00", "200.00", "300.00")):
        payable(engine, f"ref-a{number}", "a@partners.example", amount, 40)
    payable(engine, "ref-b", "b@partners.example", "40.00", 40)
    long_ago = NOW - timedelta(days=200)
    _lines(
        engine,
        "ref-c-old",
        "c@partners.example",
        (LineKind.ACCRUAL, "1200.00", long_ago),
        (LineKind.PAYABLE, "1200.00", long_ago),
        (LineKind.PAID, "1200.00", long_ago),
        (LineKind.CLAWBACK, "-120.00", NOW - timedelta(days=60)),  # after the payout: owed
    )
    payable(engine, "ref-c", "c@partners.example", "500.00", 35)
    payable(engine, "ref-d", "d@partners.example", "250.00", 40)
    payable(engine, "ref-e", "e@partners.example", "300.00", 40)
    payable(engine, "ref-f", "f@partners.example", "150.00", 10)
    for letter in "abcef":
        save_payee(engine, profile(letter), "finance-1", NOW - timedelta(days=90))
        assert RULES.company is not None
        text = mandate_text("fr", RULES.company, f"Partner {letter.upper()} SARL")
        accept_mandate(
            engine,
            f"{letter}@partners.example",
            MandateAcceptance(
                version=MANDATE_VERSION,
                language="fr",
                text_sha256=mandate_hash(text),
                accepted_at=NOW - timedelta(days=90),
                accepted_by=f"{letter}@partners.example",
                channel="portal",
            ),
            NOW - timedelta(days=90),
        )


def run_state(run_id: str = "eur-1", currency: str = "EUR") -> RunState:
    return RunState(run_id=run_id, currency=currency, cutoff=date(2027, 3, 1), approvals_required=2)


def test_a_run_pays_each_payee_once_nets_clawbacks_and_holds_with_reasons(engine: Engine) -> None:
    six_payees(engine)
    items = {i.payee_email[0]: i for i in collect_items(engine, RULES, ZONE, run_state(), NOW)}
    assert sorted(items) == ["a", "b", "c", "d"]  # E is in USD; F's holding period runs on
    a, b, c, d = items["a"], items["b"], items["c"], items["d"]
    assert (a.gross, a.net, a.holds, a.paid) == (Decimal("600.00"), Decimal("600.00"), [], True)
    assert [r.referral_id for r in a.referrals] == ["ref-a0", "ref-a1", "ref-a2"]
    assert (c.gross, c.recovered, c.net) == (
        Decimal("500.00"),
        Decimal("120.00"),
        Decimal("380.00"),
    )
    assert [(r.referral_id, r.amount) for r in c.recoveries] == [("ref-c-old", Decimal("120.00"))]
    assert c.paid
    assert b.holds == [HoldReason.BELOW_MINIMUM] and not b.paid
    assert d.holds == [HoldReason.NO_PROFILE] and not d.paid
    state = run_state().model_copy(update={"items": list(items.values())})
    assert state.total == Decimal("980.00")
    # USD has its own run: E alone.
    usd = collect_items(engine, RULES, ZONE, run_state("usd-1", "USD"), NOW)
    assert [(i.payee_email, i.net, i.holds) for i in usd] == [
        ("e@partners.example", Decimal("300.00"), [])
    ]
    # A second EUR run while the first is live finds nothing the first took; the first,
    # collecting again (a retried activity), finds the same.
    assert collect_items(engine, RULES, ZONE, run_state("eur-2"), NOW) == []
    again = collect_items(engine, RULES, ZONE, run_state(), NOW)
    assert {i.payee_email[0]: i for i in again} == items
    # Later, F's 30 days are up.
    later = run_state("eur-3").model_copy(update={"cutoff": date(2027, 3, 25)})
    assert [i.payee_email for i in collect_items(engine, RULES, ZONE, later, NOW)] == [
        "f@partners.example"
    ]


def test_payees_sharing_an_iban_a_new_iban_and_a_missing_mandate_are_held(engine: Engine) -> None:
    payable(engine, "ref-a", "a@partners.example", "100.00", 40)
    payable(engine, "ref-b", "b@partners.example", "100.00", 40)
    payable(engine, "ref-c", "c@partners.example", "100.00", 40)
    save_payee(engine, profile("a"), "finance-1", NOW - timedelta(days=90))
    save_payee(engine, profile("b", iban=IBANS["a"]), "finance-1", NOW - timedelta(days=90))
    save_payee(engine, profile("c"), "finance-1", NOW - timedelta(days=90))
    save_payee(engine, profile("c", iban=IBANS["f"]), "finance-1", NOW - timedelta(days=2))
    items = {i.payee_email[0]: i for i in collect_items(engine, RULES, ZONE, run_state(), NOW)}
    assert items["a"].holds == [HoldReason.NO_MANDATE, HoldReason.SHARED_IBAN]
    assert items["b"].holds == [HoldReason.NO_MANDATE, HoldReason.SHARED_IBAN]
    assert items["c"].holds == [HoldReason.NO_MANDATE, HoldReason.IBAN_COOLDOWN]


def test_a_debt_larger_than_what_is_payable_holds_the_item_and_an_old_small_one_is_paid(
    engine: Engine,
) -> None:
    six_payees(engine)
    _lines(
        engine,
        "ref-a-old",
        "a@partners.example",
        (LineKind.ACCRUAL, "900.00", NOW - timedelta(days=300)),
        (LineKind.PAYABLE, "900.00", NOW - timedelta(days=300)),
        (LineKind.PAID, "900.00", NOW - timedelta(days=300)),
        (LineKind.CLAWBACK, "-700.00", NOW - timedelta(days=50)),
    )
    patient = RULES.model_copy(update={"pay_below_minimum_after_days": 30})
    items = {i.payee_email[0]: i for i in collect_items(engine, patient, ZONE, run_state(), NOW)}
    assert items["a"].net == Decimal("-100.00")
    assert items["a"].holds == [HoldReason.NEGATIVE_BALANCE]
    assert items["b"].holds == []  # 40.00, payable 40 days: past the 30 it may wait


def test_recovered_lines_count_with_what_was_paid(engine: Engine) -> None:
    """The ledger after a payout that recovered a clawback: every balance at 0."""
    six_payees(engine)
    _lines(
        engine,
        "ref-c",
        "c@partners.example",
        (LineKind.PAID, "500.00", NOW),
    )
    _lines(engine, "ref-c-old", "c@partners.example", (LineKind.RECOVERED, "-120.00", NOW))
    (c,) = balances(engine, "c@partners.example")
    assert (c.balance, c.paid, c.payable) == (Decimal(0), Decimal("1580.00"), Decimal(0))


# --- the run's workflow ---------------------------------------------------------------------


@pytest_asyncio.fixture
async def payout_worker(
    time_env: WorkflowEnvironment, engine: Engine
) -> AsyncIterator[WorkflowEnvironment]:
    from worker import workflow_runner

    activities = PayoutActivities(engine, RULES, ZONE)
    async with Worker(
        time_env.client,
        task_queue="payouts",
        workflows=[PayoutRunWorkflow],
        activities=[activities.collect_payout_items, activities.record_payout_run],
        activity_executor=ThreadPoolExecutor(max_workers=2),
        workflow_runner=workflow_runner(),
    ):
        yield time_env


def signed(run_id: str, action: RunAction, actor: str, **fields: str) -> RunRequest:
    assert SETTINGS.actor_signing_key is not None
    request = RunRequest(action=action, actor=actor, request_id=uuid.uuid4().hex, **fields)
    return SETTINGS.actor_signing_key.sign(run_workflow_id(run_id), request)


async def test_two_distinct_members_of_staff_approve_a_run_and_a_cancel_frees_its_referrals(
    payout_worker: WorkflowEnvironment, engine: Engine
) -> None:
    six_payees(engine)
    client = payout_worker.client
    handle = await client.start_workflow(
        PayoutRunWorkflow.run,
        RunInput(
            run_id="eur-1", currency="EUR", cutoff=date(2027, 3, 1), approvals_required=2,
            prepared_by="finance-1",
        ),
        id=run_workflow_id("eur-1"),
        task_queue="payouts",
    )  # fmt: skip

    async def act(request: RunRequest) -> RunState:
        return await handle.execute_update(PayoutRunWorkflow.act, request, id=request.request_id)

    async def refused(request: RunRequest) -> str:
        with pytest.raises(WorkflowUpdateFailedError) as failed:
            await act(request)
        return str(failed.value.cause)

    for _ in range(100):
        if (await handle.query(PayoutRunWorkflow.state)).revision:
            break
        await asyncio.sleep(0.05)
    unsigned = RunRequest(action=RunAction.APPROVE, actor="cfo", request_id="r-1")
    assert "moves money" in await refused(unsigned)
    exclude = signed("eur-1", RunAction.EXCLUDE, "finance-1", payee_email="a@partners.example")
    assert "needs a reason" in await refused(exclude)
    held = signed("eur-1", RunAction.INCLUDE, "finance-1", payee_email="d@partners.example",
                  reason="paid by cheque")  # fmt: skip
    assert "no_profile" in await refused(held)
    lifted = await act(
        signed(
            "eur-1",
            RunAction.INCLUDE,
            "finance-1",
            payee_email="b@partners.example",
            reason="closing the partnership",
        )  # fmt: skip
    )
    assert lifted.total == Decimal("1020.00")
    first = signed("eur-1", RunAction.APPROVE, "finance-1")
    state = await act(first)
    assert state.status is RunStatus.DRAFT and len(state.approvals) == 1
    assert (await act(first)).approvals == state.approvals  # the same request: applied once
    assert "already approved" in await refused(signed("eur-1", RunAction.APPROVE, "Finance-1"))
    state = await act(signed("eur-1", RunAction.APPROVE, "finance-2"))
    assert state.status is RunStatus.APPROVED
    assert [a.surface for a in state.approvals] == ["tests", "tests"]
    late = signed("eur-1", RunAction.EXCLUDE, "finance-1", payee_email="a@partners.example",
                  reason="late")  # fmt: skip
    assert "for a draft run" in await refused(late)
    recorded = load_run(engine, "eur-1")
    assert recorded is not None and recorded.status is RunStatus.APPROVED
    with Session(engine) as session:
        rows = {r.payee_email[0]: r for r in session.exec(select(PayoutItemRow))}
        assert (rows["b"].status, rows["b"].holds) == ("included", "below_minimum")
        assert (rows["d"].status, rows["c"].net) == ("held", Decimal("380.00"))
        assert session.exec(select(PayoutClaimRow)).first() is not None
    state = await act(signed("eur-1", RunAction.CANCEL, "finance-2", reason="wrong cutoff"))
    assert state.status is RunStatus.CANCELLED
    assert (await handle.result()).status is RunStatus.CANCELLED
    with Session(engine) as session:
        assert session.exec(select(PayoutClaimRow)).all() == []
    assert len(collect_items(engine, RULES, ZONE, run_state("eur-2"), NOW)) == 4


# --- the CLI --------------------------------------------------------------------------------


async def test_finance_sets_a_payee_and_runs_a_payout_from_the_cli(cli: Cli, live: Live) -> None:
    email = f"chf-{uuid.uuid4().hex[:8]}@partners.example"
    wrong = await cli(
        "payee", "set", email, "--legal-name", "Partner CH", "--kind", "company",
        "--country", "CH", "--address", "Bahnhofstrasse 1, Zürich", "--vat-regime",
        "outside_eu", "--iban", "CH93 0076 2011 6238 5295 8",
    )  # fmt: skip
    assert wrong.code == 1 and "iban: not a valid IBAN" in wrong.err, wrong
    assert wrong.err.count("\n") == 1
    made = await cli(
        "payee", "set", email, "--iban", "CH9300762011623852957", "--bic", "UBSWCHZH80A",
        "--legal-name", "Partner CH", "--kind", "company", "--country", "CH", "--address",
        "Bahnhofstrasse 1, Zürich", "--vat-regime", "outside_eu", "--language", "en",
    )  # fmt: skip
    assert made.code == 0, made
    assert "CH93 •••• 2957" in made.out and "CH9300762011623852957" not in made.out
    shown = await cli("payee", "show", email, "--json")
    assert json.loads(shown.out)["iban"] == "CH93 •••• 2957", shown
    mandate = await cli("payee", "mandate", email, "--reason", "signed copy in folder 2027-03")
    assert mandate.code == 0 and f"MANDAT-{MANDATE_VERSION}-" in mandate.out, mandate
    _lines(live.engine, f"ref-{email}", email, *[
        (kind, "400.00", NOW - timedelta(days=60)) for kind in (LineKind.ACCRUAL, LineKind.PAYABLE)
    ])  # fmt: skip
    with Session(live.engine) as session:  # the helper writes EUR: this payee is paid in CHF
        for line in session.exec(
            select(CommissionLineRow).where(CommissionLineRow.referrer_email == email)
        ):
            line.currency = "CHF"
            session.add(line)
        session.commit()
    prepared = await cli("payouts", "prepare", "--currency", "chf", "--cutoff", "2027-03-01")
    assert prepared.code == 0, prepared
    run_id = prepared.out.split()[1].rstrip(":")
    assert f"{email}" in prepared.out and "included" in prepared.out
    assert "total 400.00 CHF" in prepared.out
    first = await cli("--actor", "fin-anna", "payouts", "approve", run_id)
    assert first.code == 0 and "approvals 1 of 2" in first.out, first
    again = await cli("--actor", "fin-anna", "payouts", "approve", run_id)
    assert again.code == 1 and "has already approved" in again.err, again
    second = await cli("--actor", "fin-bob", "payouts", "approve", run_id)
    assert second.code == 0 and f"run {run_id}: approved" in second.out, second
    listed = await cli("payouts", "list", "--status", "approved")
    assert run_id in listed.out
    cancelled = await cli("payouts", "cancel", run_id, "--reason", "a test")
    assert cancelled.code == 0 and "cancelled" in cancelled.out, cancelled
    shown = await cli("payouts", "show", run_id, "--json")
    assert shown.code == 0, shown
    assert json.loads(shown.out)["status"] == "cancelled"
