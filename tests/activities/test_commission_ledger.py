"""Rates by product, refunds and the ledger's lines through the staff CLI, on the dev server with
the real worker and database. Referrals are submitted under the shipped program, so a paid
commission stays open to clawback (the window itself is tested on the time-skipping server)."""

from __future__ import annotations

import csv
import io
import json
import uuid
from decimal import Decimal
from typing import Any

from activities.i18n import format_money
from devstack.factories import submission
from devstack.settings import SETTINGS, signed
from starter.intake import submit_referral
from tests.conftest import Cli, Live, eventually
from workflows.models.program import ProgramRules
from workflows.models.referral import ActResult, StaffAction
from workflows.models.values import Action


async def walk(live: Live, rid: str, *steps: tuple[Action, dict[str, Any]]) -> None:
    """The steps around the ones under test, by updates (a CLI process costs a second)."""
    handle = live.client.get_workflow_handle(rid)
    for action, values in steps:
        request = StaffAction(action=action, actor="desk-anna", **values)
        await handle.execute_update("act", signed(rid, request), result_type=ActResult)


TO_APPROVED: list[tuple[Action, dict[str, Any]]] = [
    (Action.CONTACTED, {}),
    (Action.ACCEPT, {}),
    (Action.APPROVE, {}),
]


def won(amount: str, reference: str) -> list[tuple[Action, dict[str, Any]]]:
    return [
        (Action.WON, {"amount": Decimal(amount), "currency": "EUR"}),
        (Action.PAYMENT, {"amount": Decimal(amount), "reference": reference}),
    ]


async def test_one_paid_one_clawed_back_and_what_the_referrer_owes(
    cli: Cli, live: Live, shipped_rules: ProgramRules
) -> None:
    referrer = f"claire-{uuid.uuid4().hex[:8]}@conseil-durand.example"

    async def submit(product: str) -> str:
        site = f"https://ledger-{uuid.uuid4().hex[:8]}.example"
        given = submission(
            **{
                "referrer.email": referrer,
                "prospect.website": site,
                "opportunity.product": product,
            }
        )
        return await submit_referral(live.client, live.engine, shipped_rules, given, SETTINGS)

    paid, clawed = await submit("cloudsuite-financials"), await submit("cloudsuite-financials")
    for rid, n in ((paid, 1), (clawed, 2)):
        payout = (Action.PAYOUT, {"reference": f"VIR-{n}"})
        await walk(live, rid, *TO_APPROVED, *won("180000", f"INV-{n}"), payout)
    shown = (await cli("show", clawed)).out
    assert "10.00% of 180000.00" in shown and "refunds claw back until" in shown

    refunded = await cli(
        "refund", clawed, "--amount", "90000", "--reference", "AV-1", "--reason", "contract halved"
    )
    assert refunded.code == 0, refunded
    state = json.loads((await cli("show", clawed, "--json")).out)
    assert state["commission"]["clawed_back"] == "9000.00"
    assert state["refunds"][0]["reference"] == "AV-1"
    too_much = await cli(
        "refund", paid, "--amount", "180000.01", "--reference", "AV-2", "--reason", "x"
    )
    assert too_much.code == 1 and len(too_much.err.strip().splitlines()) == 1
    assert "exceeds what the customer paid and was not refunded (180000.00 EUR)" in too_much.err

    async def clawback_recorded() -> bool:
        lines = json.loads((await cli("commissions", "--lines", "--json")).out)
        return any(line["kind"] == "clawback" and line["referral_id"] == clawed for line in lines)

    await eventually(clawback_recorded)
    kept = await cli("erase", clawed, "--reason", "GDPR request")
    assert kept.code == 1 and "is open to clawback until" in kept.err, kept
    lines = json.loads((await cli("commissions", "--lines", "--json")).out)
    mine = [
        (line["kind"], line["amount"], line["reference"], line["reason"])
        for line in lines
        if line["referral_id"] == clawed
    ]
    assert {line["rate"] for line in lines if line["referral_id"] == clawed} == {"0.1"}
    assert mine == [
        ("accrual", "18000.00", "", ""),
        ("payable", "18000.00", "", ""),
        ("paid", "18000.00", "VIR-2", ""),
        ("clawback", "-9000.00", "AV-1", "contract halved"),
    ]

    table = await cli("commissions", "--by-referrer")
    assert table.code == 0, table
    print(table.out)  # shown in the closing note
    (row,) = [line for line in table.out.splitlines() if line.startswith(referrer)]
    assert row.split() == [
        referrer,
        "EUR",
        "36000.00",
        "9000.00",
        "36000.00",
        "-9000.00",
        "9000.00",
    ]
    exported = csv.DictReader(io.StringIO((await cli("commissions", "--by-referrer", "--csv")).out))
    (balance,) = [r for r in exported if r["referrer_email"] == referrer]
    assert balance == {
        "referrer_email": referrer,
        "currency": "EUR",
        "earned": "36000.00",
        "clawed_back": "9000.00",
        "paid": "36000.00",
        "balance": "-9000.00",
        "owed_to_us": "9000.00",
    }

    # The same referrer's next commission, under a product with its own rate (15 %, capped at
    # 20 000): finance's payout email says what to net against it.
    third = await submit("hcm-talent")
    await walk(live, third, *TO_APPROVED)
    extended = await cli("extend", third, "--days", "30", "--reason", "budget vote in March")
    assert extended.code == 0, extended
    assert "extended 1x" in (await cli("show", third)).out
    await walk(live, third, *won("100000", "INV-3"))
    own_rate = (await cli("show", third)).out
    assert "15000.00 EUR (15.00% of 100000.00)" in own_rate
    refused = await cli("extend", third, "--days", "10", "--reason", "late")
    assert refused.code == 1 and "extend is not allowed in stage commission_payable" in refused.err

    owed = format_money(Decimal("9000.00"), "EUR", "fr")

    async def finance_told() -> bool:
        return any(
            third in str(m["Subject"]) and owed in m.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            for m in live.sink.messages()
            if "Commission" in str(m["Subject"])
        )

    await eventually(finance_told)
