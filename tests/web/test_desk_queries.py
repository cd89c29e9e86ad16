"""The staff desk's database layer (starter/desk.py): the referral list, its filters, paging
and CSV, the dashboard's links to it, and one referral's file.

The referrals are those of the figures' tests (tests/web/test_figures.py: walked through the
transition table and recorded as the workflow records them), plus a few of our own; the
emails are sent by the real email activity to the session's SMTP sink, the ledger written by
`save_commission`, the webhook messages queued by the system of record and attempted by
`deliver` against an HTTP server on loopback. Every query runs on SQLite and, when
REFERRALS_TEST_POSTGRES_URL is set, on PostgreSQL.
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

import pytest
import yaml
from sqlalchemy.engine import Engine
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.email import EmailActivities
from activities.erasure import erase_referral
from activities.queries import load_referral
from activities.records import save_referral
from activities.webhooks import WebhookRetry, deliver
from activities.webhooks import configure as configure_webhooks
from devstack.factories import referral_input
from devstack.servers import MailSink
from starter.desk import (
    CSV_COLUMNS,
    FilterError,
    ReferralFilters,
    figure_filters,
    list_referrals,
    matching_referrals,
    referral_file,
    referrals_csv,
)
from starter.figures import program_figures
from tests.web.test_figures import (
    ALICE,
    BOB,
    CAROL,
    FINANCIALS,
    HCM,
    NOW,
    Story,
    days,
    hours,
    known_referrals,
    record,
    step,
)
from workflows.models.program import ProgramRules
from workflows.models.referral import EmailRequest, ReferralRecord, Stage
from workflows.transitions import initial_state

ZONE = ZoneInfo("Europe/Paris")
FORMULA = '=HYPERLINK("http://evil.example","click")'


def submitted(
    engine: Engine, rules: ProgramRules, referral_id: str, received: str, **changes: Any
) -> None:
    """A referral just submitted, recorded as the intake records it."""
    state = initial_state(
        referral_input(
            rules,
            referral_id,
            datetime.fromisoformat(received).replace(tzinfo=UTC),
            **changes,
        )
    )
    save_referral(
        engine, ReferralRecord(state=state.model_copy(update={"history": []}), events=state.history)
    )


@pytest.fixture
def desk(engine: Engine, shipped_rules: ProgramRules) -> Engine:
    """The twelve referrals of the figures' tests, and two more of other prospects."""
    for story in known_referrals():
        record(engine, shipped_rules, story)
    submitted(
        engine, shipped_rules, "R-DESK01", "2027-03-10 08:00",
        **{"prospect.company": "Acme Widgets Ltd", "prospect.website": "https://www.acme.co.uk/",
           "referrer.email": "Dora@Partner-D.example", "referrer.name": "Dora Diaz"},
    )  # fmt: skip
    submitted(
        engine, shipped_rules, "R-DESK02", "2027-03-11 08:00",
        **{"prospect.company": FORMULA, "prospect.website": "https://evil.example"},
    )  # fmt: skip
    return engine


def ids(engine: Engine, **filters: Any) -> set[str]:
    page = list_referrals(engine, ReferralFilters(**filters), 1, 500, now=NOW, zone=ZONE)
    assert page.total == len(page.rows)
    return {row.referral_id for row in page.rows}


FIG = [f"R-FIG{n:02}" for n in range(13)]  # FIG[n] is R-FIGnn


# --- the filters ----------------------------------------------------------------------------


def test_no_filter_lists_every_referral(desk: Engine) -> None:
    assert ids(desk) == set(FIG[1:]) | {"R-DESK01", "R-DESK02"}


def test_each_filter(desk: Engine) -> None:
    assert ids(desk, stage=Stage.DECLINED) == {FIG[6], FIG[7]}
    assert ids(desk, stage=Stage.QUALIFYING) == {FIG[10]}
    assert ids(desk, product=HCM) == {FIG[3], FIG[8], FIG[11]}
    assert ids(desk, referrer=BOB) == {FIG[3], FIG[4], FIG[9], FIG[11]}
    assert ids(desk, referrer=" dora@PARTNER-d.example ") == {"R-DESK01"}  # any case
    # Contacted only after the deadline (R-FIG12) is breached too; R-FIG07 was declined first.
    assert ids(desk, contact_breached=True) == {FIG[11], FIG[12]}
    assert len(ids(desk, contact_breached=False)) == 12
    # R-FIG10 is protected until 27 Mar 09:00 UTC, 11.9 days after NOW; R-FIG12 until July;
    # R-FIG03 (won) keeps a date in the window but its protection no longer runs.
    assert ids(desk, protection_ending_within_days=11) == set()
    assert ids(desk, protection_ending_within_days=12) == {FIG[10]}
    assert ids(desk, protection_ending_within_days=200) == {FIG[10], FIG[12]}
    # The funnel's "reached": refused entries count for nothing (R-FIG07's `contacted`).
    assert FIG[7] not in ids(desk, reached=Stage.CONTACTED)
    assert ids(desk, reached=Stage.COMMISSION_PAYABLE) == {FIG[1], FIG[2]}
    assert ids(desk, stage=Stage.DECLINED, referrer=ALICE) == {FIG[7]}  # together: all hold


def test_submission_days_are_in_the_program_time_zone(desk: Engine) -> None:
    # R-FIG02 was received at 23:30 UTC on 9 Oct 2026: the 10th in Paris.
    assert ids(desk, submitted_from=date(2026, 10, 10), submitted_to=date(2026, 10, 10)) == {FIG[2]}
    assert FIG[2] not in ids(desk, submitted_to=date(2026, 10, 9))
    # Both ends included: R-FIG05 and R-FIG10 on the 21st, R-FIG01 on 5 Oct.
    assert ids(desk, submitted_from=date(2026, 9, 21), submitted_to=date(2026, 10, 5)) == {
        FIG[1], FIG[3], FIG[5], FIG[10]
    }  # fmt: skip
    assert ids(desk, submitted_from=date(2027, 3, 1)) == {FIG[11], "R-DESK01", "R-DESK02"}


def test_search(desk: Engine) -> None:
    assert ids(desk, search="R-FIG05") == {FIG[5]}  # exactly
    assert ids(desk, search="r-fig1") == {FIG[10], FIG[11], FIG[12]}  # its start, any case
    assert ids(desk, search="widgets") == {"R-DESK01"}  # part of the company name
    assert ids(desk, search="ACME") == {"R-DESK01"}
    assert ids(desk, search="acme.co.uk") == {"R-DESK01"}  # the domain
    assert ids(desk, search="https://www.acme.co.uk/contact") == {"R-DESK01"}  # as typed
    assert ids(desk, search="shop.acme.co.uk") == {"R-DESK01"}  # the registrable domain
    assert ids(desk, search="r-fig08.example") == {FIG[8]}
    assert len(ids(desk, search="bellevue")) == 12  # the figures' prospects' company
    assert ids(desk, search="%") == set()  # LIKE's wildcards are text
    assert ids(desk, search="_") == set()
    assert ids(desk, search="bellevue", product=HCM) == {FIG[3], FIG[8], FIG[11]}


def test_the_rows(desk: Engine, shipped_rules: ProgramRules) -> None:
    page = list_referrals(desk, ReferralFilters(search="R-FIG0"), now=NOW, zone=ZONE)
    rows = {row.referral_id: row for row in page.rows}
    won = rows[FIG[3]]
    assert (won.stage, won.product, won.referrer_email) == (Stage.WON, HCM, BOB)
    assert won.referrer_name == "Claire Martin"  # the example's name, from the state
    assert won.prospect_domain == "r-fig03.example"
    assert (str(won.commission_amount), won.commission_currency) == ("20000.0000", "EUR")
    assert won.protection_end is None  # won: the protection no longer runs
    assert rows[FIG[6]].commission_amount is None
    state = load_referral(desk, FIG[10])
    assert state is not None
    assert (
        list_referrals(desk, ReferralFilters(search=FIG[10]), now=NOW, zone=ZONE)
        .rows[0]
        .protection_end
        == state.protected_until
    )
    breached = list_referrals(desk, ReferralFilters(search=FIG[11]), now=NOW, zone=ZONE).rows[0]
    assert breached.contact_breached and breached.contact_deadline == datetime(
        2027, 3, 8, 23, 0, tzinfo=UTC
    )


# --- paging and CSV -------------------------------------------------------------------------


def test_pages_newest_first(desk: Engine) -> None:
    everything = list_referrals(desk, ReferralFilters(), 1, 500, now=NOW, zone=ZONE)
    submitted_at = [row.submitted_at for row in everything.rows]
    assert submitted_at == sorted(submitted_at, reverse=True)
    assert everything.rows[0].referral_id == "R-DESK02"

    pages = [list_referrals(desk, ReferralFilters(), n, 5, now=NOW, zone=ZONE) for n in (1, 2, 3)]
    assert [len(p.rows) for p in pages] == [5, 5, 4]
    assert [r.referral_id for p in pages for r in p.rows] == [
        r.referral_id for r in everything.rows
    ]
    assert all(p.total == 14 and p.pages == 3 for p in pages)
    assert (pages[0].has_previous, pages[0].has_next) == (False, True)
    assert (pages[2].has_previous, pages[2].has_next) == (True, False)

    past = list_referrals(desk, ReferralFilters(), 9, 5, now=NOW, zone=ZONE)
    assert (past.rows, past.total) == ([], 14)
    far = list_referrals(desk, ReferralFilters(), 10**30, 5, now=NOW, zone=ZONE)
    assert far.rows == [] and far.page < 10**30
    first = list_referrals(desk, ReferralFilters(), -3, 0, now=NOW, zone=ZONE)
    assert (first.page, first.per_page, len(first.rows)) == (1, 1, 1)
    filtered = list_referrals(desk, ReferralFilters(referrer=ALICE), 2, 3, now=NOW, zone=ZONE)
    assert (filtered.total, filtered.pages, len(filtered.rows)) == (5, 2, 2)


def test_csv_holds_every_matching_referral_as_text(desk: Engine) -> None:
    text = referrals_csv(
        matching_referrals(desk, ReferralFilters(submitted_from=date(2026, 10, 10)), now=NOW,
                           zone=ZONE)
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == CSV_COLUMNS
    # The same referrals as the list, in its order, however many pages the list has.
    listed = list_referrals(
        desk, ReferralFilters(submitted_from=date(2026, 10, 10)), 1, 3, now=NOW, zone=ZONE
    )
    assert len(rows) == listed.total > len(listed.rows)
    assert [r["referral_id"] for r in rows[:3]] == [r.referral_id for r in listed.rows]
    evil = next(r for r in rows if r["referral_id"] == "R-DESK02")
    assert evil["prospect_company"] == "'" + FORMULA  # a spreadsheet shows it as text
    won = next(r for r in rows if r["referral_id"] == FIG[9])
    assert (won["stage"], won["contact_breached"]) == ("cancelled", "false")
    assert won["submitted_at"] == "2026-10-26T09:00:00+00:00"
    # One page, as CSV, is that page.
    assert len(list(csv.DictReader(io.StringIO(referrals_csv(listed))))) == 3


# --- the query string -----------------------------------------------------------------------


def test_filters_round_trip_through_the_query_string() -> None:
    filters = ReferralFilters(
        stage=Stage.APPROVED,
        product=FINANCIALS,
        referrer=CAROL,
        contact_breached=False,
        protection_ending_within_days=30,
        submitted_from=date(2026, 1, 1),
        submitted_to=date(2026, 12, 31),
        search="Fromagerie & fils",
        reached=Stage.WON,
        contact_deadline_from=date(2027, 3, 1),
        contact_deadline_to=date(2027, 3, 31),
    )
    query = filters.query_string()
    assert query.startswith("stage=approved&product=cloudsuite-financials&")
    assert ReferralFilters.from_query(dict(parse_qsl(query))) == filters
    assert ReferralFilters().query_string() == ""
    # What a GET form sends: empty fields are "any"; other parameters are not filters.
    assert ReferralFilters.from_query(
        {"stage": "", "search": "  ", "page": "3", "lang": "fr", "contact_breached": "true"}
    ) == ReferralFilters(contact_breached=True)


def test_invalid_values_are_named_field_by_field() -> None:
    with pytest.raises(FilterError) as raised:
        ReferralFilters.from_query(
            {
                "stage": "done",
                "submitted_from": "yesterday",
                "protection_ending_within_days": "-1",
                "contact_breached": "perhaps",
                "product": FINANCIALS,
            }
        )
    error = raised.value
    assert set(error.errors) == {
        "stage",
        "submitted_from",
        "protection_ending_within_days",
        "contact_breached",
    }
    assert "'submitted'" in error.errors["stage"]
    assert "date" in error.errors["submitted_from"]
    assert error.valid == ReferralFilters(product=FINANCIALS)  # what can still be listed
    with pytest.raises(FilterError) as raised:
        ReferralFilters.from_query({"submitted_from": "2027-02-01", "submitted_to": "2027-01-01"})
    assert raised.value.errors == {"submitted_to": "submitted_to is before submitted_from"}
    assert raised.value.valid == ReferralFilters(submitted_from=date(2027, 2, 1))
    with pytest.raises(FilterError) as raised:
        ReferralFilters.from_query({"submitted_to": "9999-12-31", "search": "x" * 201})
    assert set(raised.value.errors) == {"submitted_to", "search"}


# --- the dashboard's links ------------------------------------------------------------------


@pytest.mark.parametrize(
    "choice",
    [{}, {"product": HCM}, {"since": date(2026, 10, 10)}],
    ids=["all", "one product", "since"],
)
def test_each_figure_links_to_the_referrals_it_counts(
    desk: Engine, shipped_rules: ProgramRules, choice: dict[str, Any]
) -> None:
    figures = program_figures(desk, shipped_rules, now=NOW, **choice)
    links = figure_filters(figures)

    def listed(key: str) -> list[str]:
        filters = ReferralFilters.from_query(dict(parse_qsl(links[key].query_string())))
        page = list_referrals(desk, filters, 1, 500, now=figures.generated_at, zone=ZONE)
        assert page.total == len(page.rows)
        return [row.referral_id for row in page.rows]

    for step_ in figures.funnel:
        assert len(listed(f"funnel.{step_.stage.value}")) == step_.referrals, step_
    for ended in figures.ended:
        assert len(listed(f"ended.{ended.stage.value}")) == ended.referrals, ended
    assert len(listed("contact.contacted")) == figures.contact.contacted
    assert sorted(listed("contact.breaches")) == sorted(
        b.referral_id for b in figures.contact.breaches
    )
    assert sorted(listed("protections.ending")) == sorted(
        p.referral_id for p in figures.expiring_protections
    )
    for top in figures.top_referrers:
        assert len(listed(f"referrer.{top.referrer_email}")) == top.referrals
        assert len(listed(f"referrer.{top.referrer_email}.won")) == top.won
    if not choice:  # the numbers behind the figures' own test, so neither side is empty
        assert listed("contact.breaches") == [FIG[11]]
        assert listed("protections.ending") == [FIG[10]]
        assert len(listed("funnel.commission_paid")) == 1


# --- one referral's file --------------------------------------------------------------------


@pytest.fixture
def endpoint() -> Iterator[str]:
    """A webhook endpoint on loopback that is busy: 503 and a word of explanation."""

    class Busy(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b"busy, try later"
            self.send_response(503)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks"
    server.shutdown()
    server.server_close()


@pytest.fixture
def webhooks(tmp_path: Path, program_file: Path, endpoint: str) -> Iterator[str]:
    """This process's webhooks (as an entry point configures them): one endpoint, told of
    submissions and wins; back to the defaults afterwards."""
    data = yaml.safe_load(program_file.read_text(encoding="utf-8"))
    data["webhooks"] = [
        {
            "url": endpoint,
            "secret": "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk=",
            "events": ["referral.submitted", "referral.won"],
        }
    ]
    path = tmp_path / "program.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    configure_webhooks(path, WebhookRetry())
    yield endpoint
    configure_webhooks(Path("program.yaml"), WebhookRetry())


FILE_ID = "R-FILE01"
PAID = Story(FILE_ID, FINANCIALS, ALICE, "2027-01-04 09:00", [
    step(hours(20), "contacted", note="called Claire", request_id="req-contacted"),
    step(hours(1), "refused approve"),  # not qualifying yet
    step(hours(2), "accept"),
    step(days(3), "approve"),
    step(days(20), "won", amount="100000", currency="EUR"),
    step(days(30), "payment", amount="100000", reference="PAY-9"),
    step(days(2), "payout", reference="OUT-9"),
])  # fmt: skip


async def test_a_referral_file_then_erased(
    engine: Engine,
    rules: ProgramRules,
    mail_sink: MailSink,
    webhooks: str,
    dev_env: WorkflowEnvironment,
) -> None:
    """Everything the database knows of one referral, with no workflow ever started for it
    (as after Temporal deleted it), then again once its personal data is erased."""
    # `rules`: payout closes the referral at once (no clawback window), so it can be erased.
    record(engine, rules, PAID)
    state = load_referral(engine, FILE_ID)
    assert state is not None
    emails = EmailActivities(engine, mail_sink.settings())
    backend = engine.url.get_backend_name()
    sends = [
        ("referrer/submitted", str(state.referrer.email), "referrer_submitted"),
        ("staff_new_referral", str(rules.recipients.desk), "staff_new_referral"),
    ]
    for what, to, template in sends:
        request = EmailRequest(
            key=f"{FILE_ID}/{what}/{backend}", to=[to], sender=str(rules.sender), language="fr",
            template=template, referral=state,
        )  # fmt: skip
        ActivityEnvironment().run(emails.send_email, request)
    file = referral_file(engine, FILE_ID)
    assert file is not None
    [won] = [w for w in file.webhooks if w.event_type == "referral.won"]
    with pytest.raises(ApplicationError):
        deliver(engine, won.id)  # the endpoint is busy: the attempt is recorded
    assert referral_file(engine, "R-NOSUCH") is None

    file = referral_file(engine, FILE_ID)
    assert file is not None
    assert (file.workflow_id, file.stage, file.erased) == (FILE_ID, Stage.COMMISSION_PAID, False)
    assert file.state.prospect.company == "Fromagerie Bellevue SAS"
    assert file.state.contact.name == "Julien Roche"
    assert file.state.referrer.email == ALICE
    assert file.state.contact_deadline > file.state.contact_reminder_at
    assert file.state.commission is not None and file.state.commission.amount == 10000
    assert [p.reference for p in file.state.payments] == ["PAY-9"]
    assert file.state.history == []  # the timeline holds it

    timeline = [(e.action, e.outcome, e.actor) for e in file.timeline]
    assert timeline == [
        ("submitted", "applied", "referrer"),
        ("contacted", "applied", "desk-anna"),
        ("approve", "refused", "desk-anna"),
        ("accept", "applied", "desk-anna"),
        ("approve", "applied", "desk-anna"),
        ("won", "applied", "desk-anna"),
        ("payment", "applied", "desk-anna"),
        ("payout", "applied", "desk-anna"),
    ]
    contacted, refusal = file.timeline[1], file.timeline[2]
    assert (contacted.note, contacted.request_id) == ("called Claire", "req-contacted")
    assert refusal.refused and refusal.note == "refused: closed"
    assert contacted.at == datetime(2027, 1, 5, 5, 0, tzinfo=UTC)
    assert [e.seq for e in file.timeline] == list(range(8))

    assert [(e.template, e.to, e.state) for e in file.emails] == [
        ("referrer_submitted", [ALICE], "sent"),
        ("staff_new_referral", [str(rules.recipients.desk)], "sent"),
    ]
    assert all(e.subject and e.message_id.startswith("<") for e in file.emails)

    assert [(line.kind, str(line.amount)) for line in file.ledger] == [
        ("accrual", "10000.0000"),
        ("payable", "10000.0000"),
        ("paid", "10000.0000"),
    ]
    assert file.ledger[-1].reference == "OUT-9"

    by_type = {w.event_type: w for w in file.webhooks}
    assert set(by_type) == {"referral.submitted", "referral.won"}
    assert (by_type["referral.won"].status, by_type["referral.won"].attempts) == ("pending", 1)
    assert by_type["referral.won"].last_answer == "503 Service Unavailable: busy, try later"
    assert by_type["referral.won"].last_attempt_at is not None
    assert by_type["referral.won"].endpoint_url == webhooks
    assert (by_type["referral.submitted"].attempts, by_type["referral.submitted"].last_answer) == (
        0,
        None,
    )

    await erase_referral(
        dev_env.client, engine, FILE_ID, by="desk-anna", reason="asked", task_queue="referrals"
    )
    erased = referral_file(engine, FILE_ID)
    assert erased is not None and erased.erased
    assert erased.state.referrer.email == "erased-r-file01@erased.example"
    assert erased.state.contact.name == "erased"
    assert erased.state.prospect.company == "Fromagerie Bellevue SAS"  # accounting keeps it
    assert [(e.action, e.note) for e in erased.timeline][-1] == ("erase", "asked")
    assert all(e.note is None for e in erased.timeline[:-1])
    assert erased.emails[0].to == ["erased-r-file01@erased.example"]
    assert [line.kind for line in erased.ledger] == ["accrual", "payable", "paid"]
    won_after = next(w for w in erased.webhooks if w.event_type == "referral.won")
    assert won_after.last_answer == "503 Service Unavailable"  # what it answered is gone
    # The list shows it too, under its pseudonym.
    [row] = list_referrals(engine, ReferralFilters(search=FILE_ID), now=NOW, zone=ZONE).rows
    assert row.erased and row.referrer_email == "erased-r-file01@erased.example"
    assert ReferralFilters(referrer="erased-r-file01@erased.example").query_string()
