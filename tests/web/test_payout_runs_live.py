"""A month's commissions paid as one run, end to end: real referrals carried to
`commission_payable` by their workflows, a real worker, database and SMTP relay. The issue's
six payees but E and F (the USD run and the holding period are in
tests/activities/test_payouts.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

from activities.db import CommissionLineRow, make_engine
from activities.ledger import balances
from activities.payees import accept_mandate, save_payee
from activities.payouts import documents, load_run
from activities.queries import load_referral
from activities.schema import upgrade
from core.payees import MANDATE_VERSION, MandateAcceptance, mandate_hash, mandate_text
from devstack.factories import submission
from devstack.servers import MailSink
from devstack.settings import ROOT, SETTINGS, settings_with
from devstack.web import csrf_of
from starter.actions import Refused
from starter.intake import submit_referral
from starter.payouts import act_on_run, local_today, prepare_run
from starter.web import create_app
from tests.activities.test_payouts import RULES, pdf_text, profile
from tests.activities.test_webhooks import (  # noqa: F401 - receiver, webhooks_from: fixtures
    Endpoint,
    Receiver,
    WebhooksFrom,
    new_secret,
    receiver,
    webhooks_from,
    write_program,
)
from tests.conftest import eventually
from tests.desk import act_by_id
from tests.web.test_staff_desk import signed_in
from worker import build_webhook_worker, build_worker
from workflows.models.program import ProgramRules, StaffRoles, StaffRules
from workflows.models.referral import Stage
from workflows.models.values import Action, Language
from workflows.payouts import (
    HoldReason,
    RunAction,
    RunRequest,
    RunState,
    RunStatus,
    payout_referral,
    payout_requests,
)

TIMEOUT = 30.0


def request_id_of(form: str) -> str:
    return form.split('name="request_id" value="')[1].split('"')[0]


async def test_a_run_pays_a_month_of_commissions_once_and_tells_each_payee(
    dev_env: WorkflowEnvironment,
    mail_sink: MailSink,
    tmp_path: Path,
    shipped_rules: ProgramRules,
    receiver: Receiver,  # noqa: F811 - the fixture of tests/activities/test_webhooks.py
    webhooks_from: WebhooksFrom,  # noqa: F811 - the fixture of tests/activities/test_webhooks.py
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'referrals.db'}")
    upgrade(engine)
    program = shipped_rules.model_copy(
        update={"payouts": RULES.model_copy(update={"holding_days": 0})}
    )
    tag = uuid.uuid4().hex[:6]
    queue = f"payouts-{tag}"
    secret = new_secret()
    receiver.endpoints = {"/finance": Endpoint(secret)}
    endpoint = {
        "url": receiver.url("/finance"),
        "secret": secret,
        "events": ["payout.confirmed"],
        "include_personal_data": True,
    }
    program_path = write_program(tmp_path / "program.yaml", [endpoint], ROOT / "program.yaml")
    webhooks_from(program_path)
    settings = settings_with(mail_sink, task_queue=queue, program_path=program_path)
    client = dev_env.client
    key = SETTINGS.actor_signing_key
    assert key is not None

    def email(letter: str) -> str:
        return f"{letter}-{tag}@partners.example"

    async def payable(letter: str, basis: str, language: str = "fr") -> str:
        data = {
            "referrer.email": email(letter),
            "referrer.language": language,
            "prospect.website": f"https://{letter}{basis}-{tag}.example",
        }
        referral_id = await submit_referral(client, engine, program, submission(**data), settings)
        for action, values in (
            (Action.CONTACTED, {}),
            (Action.ACCEPT, {}),
            (Action.APPROVE, {}),
            (Action.WON, {"amount": Decimal(basis), "currency": "EUR"}),
            (Action.PAYMENT, {"amount": Decimal(basis), "reference": f"INV-{basis}"}),
        ):
            await act_by_id(client, referral_id, action, **values)
        return referral_id

    def payee(letter: str, language: Language = "fr") -> None:
        franchise = profile(letter, vat_regime="franchise", vat_id=None, language=language)
        saved = save_payee(
            engine, franchise.model_copy(update={"email": email(letter)}), "fin", datetime.now(UTC)
        )
        assert program.payouts.company is not None
        text = mandate_text(language, program.payouts.company, saved.profile.legal_name)
        accepted = MandateAcceptance(
            version=MANDATE_VERSION,
            language=language,
            text_sha256=mandate_hash(text),
            accepted_at=datetime.now(UTC),
            accepted_by=email(letter),
            channel="portal",
        )
        accept_mandate(engine, email(letter), accepted, datetime.now(UTC))

    webhooks = build_webhook_worker(client, engine, settings, queue=queue)
    async with build_worker(client, engine, settings, queue=queue, rules=program), webhooks:
        a_referrals = [await payable("a", basis) for basis in ("1000", "2000", "3000")]
        b_referral = await payable("b", "400")
        # C was paid 1 200.00 on an earlier deal, then its customer was refunded: 120 owed.
        c_old = await payable("c", "12000", "en")
        await act_by_id(client, c_old, Action.PAYOUT, reference="VIR-OLD")
        await act_by_id(
            client, c_old, Action.REFUND, amount=Decimal("1200"), reference="AV-1", reason="refund"
        )
        c_new = await payable("c", "5000", "en")
        await payable("d", "2500")
        payee("a")
        payee("b")
        payee("c", "en")

        state = await prepare_run(
            client,
            program,
            queue,
            "EUR",
            local_today(program, datetime.now(UTC)),
            "finance-1",
            TIMEOUT,
        )
        items = {item.payee_email[0]: item for item in state.items}
        assert (items["a"].net, items["c"].gross, items["c"].recovered, items["c"].net) == (
            Decimal("600.00"), Decimal("500.00"), Decimal("120.00"), Decimal("380.00")
        )  # fmt: skip
        assert items["b"].holds == [HoldReason.BELOW_MINIMUM]
        assert items["d"].holds == [HoldReason.NO_PROFILE]
        assert state.total == Decimal("980.00")

        run_id = state.run_id

        async def act(action: RunAction, actor: str = "finance-1", **values: Any) -> RunState:
            request = RunRequest(action=action, actor=actor, request_id=uuid.uuid4().hex, **values)
            return await act_on_run(client, run_id, request, TIMEOUT, key, engine)

        await act(RunAction.APPROVE)
        try:
            await act(RunAction.APPROVE)
            raise AssertionError("the same actor approved twice")
        except Refused as refused:
            assert "has already approved" in str(refused)
        # The second approval from the staff area, as its signed-in member of staff.
        finance = f"finance-{tag}@nuage-logiciel.example"
        second = f"finance-b-{tag}@nuage-logiciel.example"  # a sign-in link each
        staff = StaffRules(roles=StaffRoles(finance=[finance, second]))
        app = create_app(
            settings, rules=program.model_copy(update={"staff": staff}), engine=engine,
            client=client, key="payouts-test-key", rate_limit="off",
        )  # fmt: skip
        async with signed_in(app, mail_sink, finance) as browser:
            page = (await browser.get(f"/staff/payouts/{run_id}?lang=en")).text
            assert 'id="step-approve"' in page and 'id="step-export"' not in page
            form = page.split('id="step-approve"', 1)[1]
            posted = await browser.post(
                f"/staff/payouts/{run_id}/actions/approve",
                data={"csrf": csrf_of(form), "lang": "en", "request_id": request_id_of(form)},
            )
            assert posted.status_code == 303, posted.text
            page = (await browser.get(f"/staff/payouts/{run_id}?lang=en")).text
            assert 'data-run="status">approved' in page and finance in page
            assert 'id="step-export"' in page and 'id="step-approve"' not in page
        approved = load_run(engine, run_id)
        assert approved is not None and approved.status is RunStatus.APPROVED
        assert [a.actor for a in approved.approvals] == ["finance-1", finance]
        assert approved.approvals[1].surface == "tests"  # signed by the web desk's key
        exported = await act(RunAction.EXPORT)
        numbers = {i.payee_email[0]: i.statement_number for i in exported.items if i.paid}
        statement_c = next(d for d in documents(engine, run_id) if d.number == numbers["c"])
        text = pdf_text(statement_c.content)
        assert "Self-billed invoice" in text and c_new in text and c_old in text
        assert "TVA non applicable, art. 293 B du CGI" in text and "380.00 EUR" in text
        # A step refused in the staff area: the page says why and keeps what was typed.
        async with signed_in(app, mail_sink, second) as browser:
            page = (await browser.get(f"/staff/payouts/{run_id}?lang=en")).text
            form = page.split('id="step-fail"', 1)[1]
            refused_step = await browser.post(
                f"/staff/payouts/{run_id}/actions/fail",
                data={
                    "csrf": csrf_of(form), "lang": "en", "request_id": request_id_of(form),
                    "payee_email": email("a"), "code": "AC04", "reason": "",
                },
            )  # fmt: skip
            assert refused_step.status_code == 409 and "fail needs a reason" in refused_step.text
            kept = refused_step.text.split('id="step-fail"', 1)[1].split("</form>", 1)[0]
            assert 'value="AC04"' in kept and f"<option selected>{email('a')}" in kept
        await act(RunAction.MARK_SENT)
        before = len(mail_sink.messages())

        payouts = [key.sign(payout_referral(p), p) for p in payout_requests(exported, "finance-1")]
        confirm = RunRequest(
            action=RunAction.CONFIRM,
            actor="finance-1",
            request_id=f"confirm-{tag}",
            payouts=payouts,
        )
        done = await act_on_run(client, run_id, confirm, TIMEOUT, key)
        assert done.status is RunStatus.CONFIRMED and done.history[-1].note == (
            "4 referrals paid, 980.00 EUR"
        )

        for referral_id in [*a_referrals, c_new]:
            referral = load_referral(engine, referral_id)
            assert referral is not None and referral.stage is Stage.COMMISSION_PAID
            assert referral.commission is not None
            assert referral.commission.payout_reference in numbers.values()
        standing = {b.referrer_email[0]: b for b in balances(engine) if tag in b.referrer_email}
        assert standing["a"].balance == 0 and standing["c"].balance == 0
        assert standing["b"].payable == Decimal("40.00")
        with Session(engine) as session:
            (recovered,) = session.exec(
                select(CommissionLineRow).where(CommissionLineRow.kind == "recovered")
            ).all()
        assert (recovered.referral_id, recovered.amount, recovered.reference) == (
            c_old, Decimal("-120.0000"), numbers["c"]
        )  # fmt: skip
        loaded = load_referral(engine, b_referral)
        assert loaded is not None and loaded.stage is Stage.COMMISSION_PAYABLE

        remittances = [
            m
            for m in mail_sink.messages()[before:]
            if m.get("X-Idempotency-Key", "").endswith("/confirmed")
        ]
        by_payee = {str(m["To"])[0]: m for m in remittances}
        assert sorted(by_payee) == ["a", "c"] and len(remittances) == 2
        assert "Paiement de commissions" in str(by_payee["a"]["Subject"])
        assert "Commission payment" in str(by_payee["c"]["Subject"])
        (attached,) = list(by_payee["c"].iter_attachments())
        assert attached.get_filename() == f"{numbers['c']}.pdf"
        assert attached.get_content() == statement_c.content

        # Finance's tools hear of each payment: one signed message per payee, with the payee
        # (this endpoint asked for personal data).
        async def both_received() -> bool:
            return len(receiver.received) >= 2

        await eventually(both_received)
        paid_out = sorted((r.message["data"] for r in receiver.received), key=lambda d: d["net"])
        assert [(d["statement_number"], d["net"], d["recovered"]) for d in paid_out] == [
            (numbers["c"], "380.00", "120.00"), (numbers["a"], "600.00", "0.00")
        ]  # fmt: skip
        assert paid_out[1]["referral_ids"] == a_referrals
        assert paid_out[1]["payee"]["email"] == email("a")
        assert all(
            r.verified and r.message["type"] == "payout.confirmed" for r in receiver.received
        )

        # Confirming again changes nothing and sends nothing.
        sent = len(mail_sink.messages())
        again = await act_on_run(client, run_id, confirm, TIMEOUT, key)
        assert again.revision == done.revision
        try:
            await act(RunAction.CONFIRM, payouts=payouts)
            raise AssertionError("a confirmed run was confirmed again")
        except Refused as refused:
            assert "is confirmed" in str(refused)
        assert len(mail_sink.messages()) == sent and len(receiver.received) == 2
