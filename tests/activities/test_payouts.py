"""Paying referrers: payee profiles, what a payout run collects and holds, its approvals, its
bank file and statements, failures and confirmation (docs/payouts.md). A real database
(SQLite, and PostgreSQL when given) and a real Temporal server."""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from zoneinfo import ZoneInfo

import pytest
import sepaxml
import time_machine
import xmlschema
from pydantic import ValidationError
from pypdf import PdfReader
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio import activity
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.db import (
    CommissionLineRow,
    PayeeEventRow,
    PayoutClaimRow,
    PayoutItemRow,
    StatementCounterRow,
)
from activities.ledger import balances
from activities.payees import accept_mandate, load_payee, save_payee
from activities.payouts import (
    PayoutActivities,
    collect_items,
    document,
    documents,
    export_run,
    first_business_day,
    load_run,
    save_run,
)
from core.payees import (
    MANDATE_VERSION,
    MandateAcceptance,
    PayeeProfile,
    mandate_hash,
    mandate_text,
    mask_iban,
    problems,
)
from devstack.servers import MailSink
from devstack.settings import SETTINGS
from tests.conftest import Cli, Live
from tests.web.test_staff_dashboard import staff_app
from tests.web.test_staff_desk import signed_in
from workflows.models.ledger import LineKind
from workflows.models.program import PayingCompany, PayoutRules, ProgramRules, StaffRoles
from workflows.payout_run import (
    CONFIRM,
    NOTIFY,
    ConfirmRequest,
    ExportRequest,
    Notice,
    PayoutRunWorkflow,
    run_workflow_id,
)
from workflows.payouts import (
    HoldReason,
    RunAction,
    RunInput,
    RunRequest,
    RunState,
    RunStatus,
    payout_referral,
    payout_requests,
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
    for letter in "abcef":  # under the franchise: no VAT, so the nets are the issue's
        franchise = profile(letter, vat_regime="franchise", vat_id=None)
        save_payee(engine, franchise, "finance-1", NOW - timedelta(days=90))
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


def payout_program(rules: ProgramRules) -> ProgramRules:
    return rules.model_copy(update={"payouts": RULES})


@asynccontextmanager
async def payout_worker(
    env: WorkflowEnvironment,
    engine: Engine,
    program: ProgramRules,
    stand_ins: list[Callable[..., Any]] | None = None,
) -> AsyncIterator[None]:
    """The run's workflow and its database activities, on a worker that can be stopped;
    `stand_ins`: activities registered under the names of those that reach Temporal or SMTP."""
    from worker import workflow_runner

    activities = PayoutActivities(engine, program)
    async with Worker(
        env.client,
        task_queue="payouts",
        workflows=[PayoutRunWorkflow],
        activities=[
            activities.collect_payout_items,
            activities.record_payout_run,
            activities.export_payout_run,
            activities.fail_payout_item,
            *(stand_ins or []),
        ],
        activity_executor=ThreadPoolExecutor(max_workers=2),
        workflow_runner=workflow_runner(),
        # The test server does not hand a stopped worker's sticky tasks to the next one.
        max_cached_workflows=0,
    ):
        yield


async def start_run(env: WorkflowEnvironment, run_id: str = "eur-1") -> WorkflowHandle[Any, Any]:
    handle = await env.client.start_workflow(
        PayoutRunWorkflow.run,
        RunInput(
            run_id=run_id, currency="EUR", cutoff=date(2027, 3, 1), approvals_required=2,
            prepared_by="finance-1",
        ),
        id=run_workflow_id(run_id),
        task_queue="payouts",
    )  # fmt: skip
    for _ in range(200):
        if (await handle.query(PayoutRunWorkflow.state)).revision:
            return handle
        await asyncio.sleep(0.05)
    raise AssertionError("the run collected nothing in 10 s")


def run_act(handle: WorkflowHandle[Any, Any]) -> Callable[[RunRequest], Awaitable[RunState]]:
    async def act(request: RunRequest) -> RunState:
        return await handle.execute_update(PayoutRunWorkflow.act, request, id=request.request_id)

    return act


async def refused_by(handle: WorkflowHandle[Any, Any], request: RunRequest) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await run_act(handle)(request)
    return str(failed.value.cause)


def signed(run_id: str, action: RunAction, actor: str, **fields: Any) -> RunRequest:
    assert SETTINGS.actor_signing_key is not None
    request = RunRequest(action=action, actor=actor, request_id=uuid.uuid4().hex, **fields)
    return SETTINGS.actor_signing_key.sign(run_workflow_id(run_id), request)


async def test_two_distinct_members_of_staff_approve_a_run_and_a_cancel_frees_its_referrals(
    time_env: WorkflowEnvironment, engine: Engine, rules: ProgramRules
) -> None:
    six_payees(engine)
    async with payout_worker(time_env, engine, payout_program(rules)):
        await approve_and_cancel(await start_run(time_env), engine)


async def approve_and_cancel(handle: WorkflowHandle[Any, Any], engine: Engine) -> None:
    act = run_act(handle)

    async def refused(request: RunRequest) -> str:
        return await refused_by(handle, request)

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
    assert "for a run that is draft; run eur-1 is approved" in await refused(late)
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


async def test_finance_sets_a_payee_and_runs_a_payout_from_the_cli(
    cli: Cli, live: Live, tmp_path: Path
) -> None:
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
    out = tmp_path / "files"
    exported = await cli("payouts", "export", run_id, "--out", str(out))
    assert exported.code == 0 and f"run {run_id}: exported" in exported.out, exported
    files = sorted(path.name for path in out.iterdir())
    assert len(files) == 2 and files[1] == f"{run_id}.csv", files  # CHF: no SEPA file
    rows = (out / files[1]).read_text().splitlines()
    assert rows[1].startswith(files[0].removesuffix(".pdf")) and ",400.00,CHF," in rows[1]
    statement = pdf_text((out / files[0]).read_bytes())
    assert "Self-billed invoice" in statement and "art. 283-2 du CGI" in statement
    assert "Reverse charge: VAT due by the customer" in statement
    assert (await cli("payouts", "mark-sent", run_id)).code == 0
    confirmed = await cli("payouts", "confirm", run_id, "--json")
    assert confirmed.code == 0, confirmed
    history = json.loads(confirmed.out)["history"]
    # Its ledger lines were written by hand: no workflow pays it, and the run says so.
    assert history[-1]["note"].endswith(": no such referral in Temporal"), history[-1]
    again = await cli("payouts", "confirm", run_id)
    assert (
        again.code == 1
        and again.err == f"referrals: run {run_id} is confirmed: it takes no more actions\n"
    )

    # Still payable: the next run takes it, and is cancelled.
    second = await cli("payouts", "prepare", "--currency", "chf", "--cutoff", "2027-03-01")
    second_id = second.out.split()[1].rstrip(":")
    assert second.code == 0 and second_id != run_id and email in second.out, second
    cancelled = await cli("payouts", "cancel", second_id, "--reason", "a test")
    assert cancelled.code == 0 and "cancelled" in cancelled.out, cancelled
    shown = await cli("payouts", "show", second_id, "--json")
    assert shown.code == 0, shown
    assert json.loads(shown.out)["status"] == "cancelled"


SEPA_SCHEMAS = Path(sepaxml.__file__).parent / "schemas"


def pdf_text(content: bytes) -> str:
    return " ".join(page.extract_text() for page in PdfReader(io.BytesIO(content)).pages)


async def test_an_approved_run_survives_its_worker_then_exports_a_valid_file_and_statements(
    time_env: WorkflowEnvironment, engine: Engine, rules: ProgramRules
) -> None:
    six_payees(engine)
    program = payout_program(rules)
    notices: list[Notice] = []
    confirmations: list[ConfirmRequest] = []

    @activity.defn(name=NOTIFY)
    async def notify_payees(notice: Notice) -> int:
        notices.append(notice)
        return 1

    @activity.defn(name=CONFIRM)
    async def confirm_payout_run(request: ConfirmRequest) -> list[str]:
        confirmations.append(request)
        return []

    async with payout_worker(time_env, engine, program):
        handle = await start_run(time_env)
        act = run_act(handle)
        await act(signed("eur-1", RunAction.APPROVE, "finance-1"))
        approved = await act(signed("eur-1", RunAction.APPROVE, "finance-2"))
        assert approved.status is RunStatus.APPROVED
    # The worker is gone between approval and export; another takes the run over.
    async with payout_worker(time_env, engine, program, [notify_payees, confirm_payout_run]):
        export = signed("eur-1", RunAction.EXPORT, "finance-1")
        export.execution_date = None
        state = await act(export)
        assert state.status is RunStatus.EXPORTED
        year = datetime.now(ZONE).year
        numbers = {i.payee_email[0]: i.statement_number for i in state.items}
        assert numbers == {"a": f"AF-{year}-000001", "b": None, "c": f"AF-{year}-000002", "d": None}
        again = signed("eur-1", RunAction.EXPORT, "finance-1")
        assert "run eur-1 is exported" in await refused_by(handle, again)
        # A retried export (the activity after a crash) numbers nothing again.
        retried = export_run(
            engine, program, ExportRequest(state=approved, execution_date="2027-03-02"), NOW
        )
        assert retried.numbers == {
            "a@partners.example": numbers["a"],
            "c@partners.example": numbers["c"],
        }
        with Session(engine) as session:
            (counter,) = session.exec(select(StatementCounterRow)).all()
            assert (counter.series, counter.last) == ("AF", 2)

        files = {d.kind + (d.payee_email or "")[:1]: d for d in documents(engine, "eur-1")}
        assert sorted(files) == ["sepa", "statementa", "statementc"]
        xml = files["sepa"].content
        xmlschema.XMLSchema(SEPA_SCHEMAS / "pain.001.001.09.xsd").validate(xml.decode())
        tree = ElementTree.fromstring(xml)
        ns = {"p": "urn:iso:std:iso:20022:tech:xsd:pain.001.001.09"}
        assert tree.findtext("p:CstmrCdtTrfInitn/p:GrpHdr/p:NbOfTxs", namespaces=ns) == "2"
        assert tree.findtext("p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum", namespaces=ns) == "980.00"
        paid = {
            tx.findtext("p:PmtId/p:EndToEndId", namespaces=ns): tx.findtext(
                "p:Amt/p:InstdAmt", namespaces=ns
            )
            for tx in tree.iterfind(".//p:CdtTrfTxInf", ns)
        }
        assert paid == {numbers["a"]: "600.00", numbers["c"]: "380.00"}

        a_text, c_text = (
            pdf_text(files["statementa"].content),
            pdf_text(files["statementc"].content),
        )
        for text, number in ((a_text, numbers["a"]), (c_text, numbers["c"])):
            assert number is not None and number in text and "Autofacturation" in text
            assert "TVA non applicable, art. 293 B du CGI" in text
            assert "Nuage Logiciel SAS" in text and f"MANDAT-{MANDATE_VERSION}-" in text
            assert "FR76 " not in text or "*" in text  # the IBAN masked
        assert "600.00 EUR" in a_text and "100.00 EUR" in a_text
        assert "500.00 EUR" in c_text and "-120.00 EUR" in c_text and "380.00 EUR" in c_text
        assert "ref-c-old" in c_text

        sent = await act(signed("eur-1", RunAction.MARK_SENT, "finance-1"))
        assert sent.status is RunStatus.SENT
        failed = await act(
            signed("eur-1", RunAction.FAIL, "finance-2", payee_email="c@partners.example",
                   code="AC04", reason="account closed")
        )  # fmt: skip
        item = failed.item("c@partners.example")
        assert item is not None and item.failed == "AC04: account closed"
        assert item.credit_note_number == f"AV-{year}-000001"
        assert [(n.kind, n.payee_email) for n in notices] == [("failed", "c@partners.example")]
        note = document(engine, "eur-1/credit_note/c@partners.example")
        assert note is not None and str(numbers["c"]) in pdf_text(note.content)
        c_payee = load_payee(engine, "c@partners.example")
        assert c_payee is not None and c_payee.bank_rejection is not None

        unsigned = RunRequest(action=RunAction.CONFIRM, actor="finance-1", request_id="c-0")
        assert "moves money" in await refused_by(handle, unsigned)
        partial = signed("eur-1", RunAction.CONFIRM, "finance-1")
        assert "carry the payout of each referral" in await refused_by(handle, partial)
        confirm = signed_confirm(failed, "finance-1")
        done = await act(confirm)
        assert done.status is RunStatus.CONFIRMED and done.settled_total == Decimal("600.00")
        (request,) = confirmations
        assert [(p.request_id, p.reference) for p in request.payouts] == [
            (f"payout-run-eur-1/ref-a{n}", numbers["a"]) for n in range(3)
        ]
        assert notices[-1].kind == "confirmed"
        assert (await handle.result()).status is RunStatus.CONFIRMED

        # C's commission is still due, held until the bank details change, then for the
        # cooldown.
        later = {
            i.payee_email[0]: i for i in collect_items(engine, RULES, ZONE, run_state("eur-2"), NOW)
        }
        assert HoldReason.BANK_REJECTED in later["c"].holds
        assert [r.referral_id for r in later["c"].referrals] == ["ref-c"]
        changed = profile("c", vat_regime="franchise", vat_id=None, iban=NEW_IBAN)
        save_payee(engine, changed, "c@partners.example", datetime.now(UTC))
        cancel_claims(engine, "eur-2")
        after = {
            i.payee_email[0]: i
            for i in collect_items(engine, RULES, ZONE, run_state("eur-3"), datetime.now(UTC))
        }
        assert after["c"].holds == [HoldReason.IBAN_COOLDOWN]


NEW_IBAN = "FR7630004000031234567890143"


def signed_confirm(state: RunState, actor: str) -> RunRequest:
    """What the CLI sends: every referral's payout signed for that referral."""
    assert SETTINGS.actor_signing_key is not None
    key = SETTINGS.actor_signing_key
    payouts = [key.sign(payout_referral(p), p) for p in payout_requests(state, actor)]
    request = RunRequest(
        action=RunAction.CONFIRM, actor=actor, request_id=uuid.uuid4().hex, payouts=payouts
    )
    return key.sign(run_workflow_id(state.run_id), request)


def cancel_claims(engine: Engine, run_id: str) -> None:
    with Session(engine) as session:
        for claim in session.exec(select(PayoutClaimRow).where(PayoutClaimRow.run_id == run_id)):
            session.delete(claim)
        session.commit()


# --- the staff area -------------------------------------------------------------------------


async def test_finance_sees_each_run_and_the_dashboard_what_is_held_by_reason(
    engine: Engine, shipped_rules: ProgramRules, mail_sink: MailSink
) -> None:
    six_payees(engine)
    items = collect_items(engine, RULES, ZONE, run_state(), NOW)
    save_run(engine, run_state().model_copy(update={"items": items, "revision": 1}), NOW)
    finance = f"finance-{uuid.uuid4().hex[:8]}@nuage-logiciel.example"
    manager = f"m-{uuid.uuid4().hex[:8]}@example.com"
    app = staff_app(engine, shipped_rules, mail_sink, manager)
    site = app.state.site
    roles = StaffRoles(finance=[finance], sales=["sales@nuage-logiciel.example"])
    site.rules = site.rules.model_copy(
        update={"staff": site.rules.staff.model_copy(update={"roles": roles})}
    )
    async with signed_in(app, mail_sink, finance) as browser:
        page = (await browser.get("/staff/payouts?lang=en")).text
        assert 'id="run-eur-1" data-status="draft"' in page
        assert 'data-total="980.00"' in page and "€980.00" in page
        assert 'data-hold="below_minimum">below the minimum: €40.00' in page
        assert 'data-hold="no_profile">no payee profile: €250.00' in page
        french = (await browser.get("/staff/payouts?lang=fr")).text
        assert "<h1>Virements groupés</h1>" in french
        assert 'data-hold="below_minimum">sous le minimum: 40,00\xa0€' in french
    async with signed_in(app, mail_sink, manager) as browser:
        dashboard = (await browser.get("/staff?lang=en")).text
        held = dashboard.split('id="held"', 1)[1].split("</table>", 1)[0]
        assert re.findall(r'data-hold="(\w+)" data-currency="(\w+)"><th scope="row">([^<]+)</th>'
                          r'<td class="num">([^<]+)</td>', held) == [
            ("below_minimum", "EUR", "below the minimum", "€40.00"),
            ("no_profile", "EUR", "no payee profile", "€250.00"),
        ]  # fmt: skip
    async with signed_in(app, mail_sink, "sales@nuage-logiciel.example") as browser:
        refused = await browser.get("/staff/payouts?lang=en")
        assert refused.status_code == 403 and "finance or manager" in refused.text


# --- the monthly Schedule -------------------------------------------------------------------


def test_the_first_business_day_skips_weekends_and_public_holidays() -> None:
    assert first_business_day(2027, 1, "FR") == date(2027, 1, 4)  # 1 January, then a weekend
    assert first_business_day(2026, 11, "FR") == date(2026, 11, 2)  # All Saints' is a Sunday
    assert first_business_day(2027, 5, "FR") == date(2027, 5, 3)  # 1 May is a Saturday
    assert first_business_day(2027, 3, "FR") == date(2027, 3, 1)


async def test_monthly_payouts_prepare_one_run_per_currency_on_the_first_business_day_only(
    time_env: WorkflowEnvironment, engine: Engine, rules: ProgramRules
) -> None:
    six_payees(engine)
    program = payout_program(rules)  # RULES: monthly, the default
    activities = PayoutActivities(engine, program, time_env.client)
    environment = ActivityEnvironment()
    paris = ZoneInfo("Europe/Paris")
    with time_machine.travel(datetime(2027, 3, 1, 6, 0, tzinfo=paris), tick=True):
        started = await environment.run(activities.prepare_scheduled_runs)
        assert started == ["eur-2027-03-01-monthly", "usd-2027-03-01-monthly"]
        # The Schedule catching up, or a retry: the same runs, nothing started twice.
        assert await environment.run(activities.prepare_scheduled_runs) == started
    for run_id in started:
        handle = time_env.client.get_workflow_handle(run_workflow_id(run_id))
        assert (await handle.describe()).status is not None
    with time_machine.travel(datetime(2027, 3, 2, 6, 0, tzinfo=paris), tick=True):
        assert await environment.run(activities.prepare_scheduled_runs) == []
    by_hand = RULES.model_copy(update={"schedule": "manual"})
    manual = PayoutActivities(
        engine, program.model_copy(update={"payouts": by_hand}), time_env.client
    )
    with time_machine.travel(datetime(2027, 3, 1, 6, 0, tzinfo=paris), tick=True):
        assert await environment.run(manual.prepare_scheduled_runs) == []
    for run_id in started:
        await time_env.client.get_workflow_handle(run_workflow_id(run_id)).terminate("test")


def test_euros_to_an_account_outside_the_sepa_zone_go_in_the_csv(
    engine: Engine, rules: ProgramRules
) -> None:
    six_payees(engine)
    payable(engine, "ref-g", "g@partners.example", "300.00", 40)
    turkish = profile(
        "g", country="TR", siret=None, vat_id=None, vat_regime="outside_eu",
        iban="TR330006100519786457841326", bic="ISBKTRISXXX", language="en",
    )  # fmt: skip
    save_payee(engine, turkish, "finance-1", NOW - timedelta(days=90))
    assert RULES.company is not None
    text = mandate_text("en", RULES.company, turkish.legal_name)
    mandate = MandateAcceptance(
        version=MANDATE_VERSION, language="en", text_sha256=mandate_hash(text),
        accepted_at=NOW, accepted_by="g@partners.example", channel="portal",
    )  # fmt: skip
    accept_mandate(engine, "g@partners.example", mandate, NOW)
    items = collect_items(engine, RULES, ZONE, run_state(), NOW)
    approved = run_state().model_copy(update={"items": items, "status": RunStatus.APPROVED})
    result = export_run(
        engine,
        payout_program(rules),
        ExportRequest(state=approved, execution_date="2027-03-02"),
        NOW,
    )
    assert result.bank_file == "eur-1/sepa, eur-1/csv"
    files = {d.kind: d.content for d in documents(engine, "eur-1") if d.kind in ("sepa", "csv")}
    assert files["sepa"].count(b"<CdtTrfTxInf>") == 2 and b"TR33" not in files["sepa"]
    rows = files["csv"].decode().splitlines()
    assert len(rows) == 2 and ",TR330006100519786457841326,ISBKTRISXXX,300.00,EUR," in rows[1]
    again = export_run(
        engine,
        payout_program(rules),
        ExportRequest(state=approved, execution_date="2027-03-02"),
        NOW,
    )
    assert again == result
