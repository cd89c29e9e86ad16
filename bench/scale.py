"""Staff views at scale: `referrals list` and the program dashboard over a database holding
10 000 open referrals (and 20 % more closed ones), as staff would meet them a year in.

    python -m bench.scale [COUNT]        # prints the figures as JSON

The database is filled through the project's own write paths (`write_referral`, the ledger's
`save_commission`), each referral walked through the one transition table as the workflow
walks it, so its rows are the ones a real year of the program leaves. Then:

- `list_first_page_ms`: `referrals list` (the staff's first page) run in process, median of 5
  after a warm-up; `list_cli_ms`: the `referrals list` command once, end to end (its imports
  included);
- `dashboard_ms`: a signed-in staff member's `GET /staff` from the real `referrals web`, median
  of 5 after a warm-up; `dashboard_with_charts_ms`: the page and then its charts fetched
  concurrently, as a browser loads them. The app caches the figures until the data changes
  (docs/dashboard.md), so both are measured again just after a change to the data
  (`dashboard_after_change_ms`, `dashboard_with_charts_after_change_ms`): a referral is
  contacted before each run, and the figures are computed afresh.

Seeding (`seed_s`) is not part of any figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html import unescape
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session

from activities.db import make_engine
from activities.ledger import save_commission
from activities.queries import count_referrals, list_referrals, load_referral
from activities.records import (
    save_referral,
    write_referral,
)
from activities.schema import upgrade
from core.program import load_program
from devstack.factories import fire_contact_timers
from devstack.web import csrf_of, use_sign_in_link
from starter.contact_window import contact_window
from starter.intake import parse_submission
from starter.mail_sink import start_sink
from workflows.models.ledger import CommissionRecord
from workflows.models.program import ProgramRules
from workflows.models.referral import (
    ReferralInput,
    ReferralRecord,
    ReferralState,
    StaffAction,
    Stage,
)
from workflows.models.values import Action
from workflows.transitions import apply_action, commission_lines, initial_state

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "program.yaml"
REFERRALS = str(Path(sys.executable).parent / "referrals")
REFERRERS = 500
CLOSED_SHARE = 0.20
RUNS = 5
# Open referrals by stage (weights), and how long ago (days) a referral in it was received:
# young ones wait for contact, qualifying and approved ones stay within their protection.
OPEN: dict[str, tuple[int, tuple[int, int]]] = {
    "submitted": (15, (0, 12)),
    "contacted": (15, (2, 30)),
    "qualifying": (25, (5, 170)),
    "approved": (25, (20, 175)),
    "won": (15, (40, 365)),
    "commission_payable": (5, (80, 365)),
}
CLOSED: dict[str, tuple[int, tuple[int, int]]] = {
    "commission_paid": (25, (100, 365)),
    "lost": (25, (60, 365)),
    "declined": (20, (5, 365)),
    "rejected": (15, (10, 365)),
    "cancelled": (15, (5, 365)),
}
# The staff actions that lead to each stage (after the submission).
PATHS: dict[str, list[str]] = {
    "submitted": [],
    "contacted": ["contacted"],
    "qualifying": ["contacted", "accept"],
    "approved": ["contacted", "accept", "approve"],
    "won": ["contacted", "accept", "approve", "won"],
    "commission_payable": ["contacted", "accept", "approve", "won", "payment"],
    "commission_paid": ["contacted", "accept", "approve", "won", "payment", "payout"],
    "lost": ["contacted", "accept", "approve", "lost"],
    "declined": ["decline"],
    "rejected": ["contacted", "accept", "reject"],
    "cancelled": ["contacted", "cancel"],
}
EXAMPLE: dict[str, Any] = json.loads((ROOT / "examples" / "referral.json").read_text())
SURNAMES = ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand"]


# --- the database ---------------------------------------------------------------------------


def _fast_writes(dbapi_connection: Any, _record: Any) -> None:
    """Seeding only: a crash would lose the bench's scratch database, nothing else."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.close()


def _submission(rng: random.Random, number: int, product: str) -> dict[str, Any]:
    referrer = rng.randrange(REFERRERS)
    surname = SURNAMES[referrer % len(SURNAMES)]
    data = json.loads(json.dumps(EXAMPLE))
    data["referrer"].update(
        name=f"Partner {surname} {referrer}",
        email=f"partner{referrer:03d}@conseil-{surname.lower()}.example",
        company=f"Conseil {surname} {referrer}",
        language=rng.choice(["fr", "en"]),
    )
    data["prospect"].update(
        company=f"Prospect {number:05d} SAS", website=f"https://prospect-{number:05d}.example/"
    )
    data["contact"].update(email=f"contact@prospect-{number:05d}.example")
    data["opportunity"].update(
        product=product, estimated_annual_value=f"{rng.randrange(20, 400) * 1000}.00"
    )
    return data


def _pick(rng: random.Random, table: dict[str, tuple[int, tuple[int, int]]]) -> str:
    stages = list(table)
    return rng.choices(stages, weights=[table[s][0] for s in stages])[0]


def _walk(
    rng: random.Random, rules: ProgramRules, number: int, stage: str, age_days: tuple[int, int],
    now: datetime,
) -> tuple[ReferralState, list[CommissionRecord]]:  # fmt: skip
    """A referral received `age_days` ago and walked to `stage` at plausible instants: its
    final state and the ledger records its commission events wrote."""
    products = [p.id for p in rules.products if p.multi_tenant_cloud]
    received = now - timedelta(seconds=rng.uniform(age_days[0] * 86400, age_days[1] * 86400))
    given = ReferralInput(
        referral_id=f"R-SCALE{number:05d}",
        submission=parse_submission(_submission(rng, number, rng.choice(products))),
        rules=rules,
        contact_window=contact_window(received, rules.calendar, rules.contact),
    )
    state = initial_state(given)
    steps = PATHS[stage]
    # The steps share the time since receipt; contact comes within a week or so.
    span = (now - received).total_seconds()
    moment = received
    ledger: list[CommissionRecord] = []
    basis = Decimal(rng.randrange(20, 400) * 1000)
    for n, action in enumerate(steps):
        if n == 0:
            gap = min(span * rng.uniform(0.2, 0.9), rng.uniform(3600, 9 * 86400))
        else:
            gap = (now - moment).total_seconds() * rng.uniform(
                0.1, 0.9 if n < len(steps) - 1 else 1
            )
        moment += timedelta(seconds=gap)
        state = fire_contact_timers(state, moment)
        options: dict[str, Any] = {}
        if action == "won":
            options = {"amount": basis, "currency": "EUR"}
        elif action == "payment":
            options = {"amount": basis, "reference": f"PAY-{number:05d}"}
        elif action == "payout":
            options = {"reference": f"OUT-{number:05d}"}
        elif action in ("decline", "reject", "lost", "cancel"):
            options = {"reason": "bench"}
        request = StaffAction(action=Action(action), actor=f"desk-{number % 7}", **options)
        new = apply_action(state, request, rules, moment)
        assert isinstance(new, ReferralState), (number, action, new)
        if new.commission is not None:
            entry = new.history[-1]
            record = CommissionRecord.after(
                new, event=action, event_key=f"{given.referral_id}/{entry.seq}", at=moment,
                actor=entry.actor, note=entry.note,
            )  # fmt: skip
            record.lines = commission_lines(state, new, request)
            ledger.append(record)
        state = new
    return fire_contact_timers(state, now), ledger


def seed(engine: Engine, rules: ProgramRules, count: int, now: datetime, seed: int = 7) -> int:
    """`count` open referrals and CLOSED_SHARE × `count` closed ones, written as the workflow
    writes them; the number of closed ones."""
    rng = random.Random(seed)
    closed = round(count * CLOSED_SHARE)
    plan = [_pick(rng, OPEN) for _ in range(count)] + [_pick(rng, CLOSED) for _ in range(closed)]
    rng.shuffle(plan)
    ledger: list[CommissionRecord] = []

    def commit() -> None:
        session.commit()  # the ledger's writes open their own transactions
        for record in ledger:
            save_commission(engine, record)
        ledger.clear()

    session = Session(engine)
    try:
        for number, stage in enumerate(plan, start=1):
            table = OPEN if stage in OPEN else CLOSED
            state, records = _walk(rng, rules, number, stage, table[stage][1], now)
            write_referral(
                session,
                ReferralRecord(
                    state=state.model_copy(update={"history": []}), events=state.history
                ),
            )
            ledger.extend(records)
            if number % 500 == 0:
                commit()
        commit()
    finally:
        session.close()
    return closed


# --- measuring ------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def median_ms(call: Callable[[], Any], runs: int = RUNS) -> float:
    call()  # warm: imports, caches, the database's pages
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(timings), 1)


def list_first_page(database_url: str) -> str:
    """What `referrals list` prints, run in this process (the CLI's own code)."""
    from starter.cli import run

    out = io.StringIO()
    with environment(REFERRALS_DATABASE_URL=database_url, REFERRALS_PROGRAM=str(PROGRAM)):
        with contextlib.redirect_stdout(out):
            assert run(["list"]) == 0
    return out.getvalue()


def list_cli_ms(database_url: str, work: Path) -> float:
    env = {**os.environ, "REFERRALS_DATABASE_URL": database_url, "REFERRALS_PROGRAM": str(PROGRAM)}
    started = time.perf_counter()
    done = subprocess.run(
        [REFERRALS, "list"], env=env, cwd=work, capture_output=True, text=True, timeout=120
    )
    elapsed = (time.perf_counter() - started) * 1000
    assert done.returncode == 0, done.stderr
    return round(elapsed, 1)


# The web app sends a sign-in link in the background, retrying a failed send after 1, 2, 4…
# seconds: a link that has not arrived after a minute will not.
LINK_WAIT_S = 60


async def sign_in(web: httpx.AsyncClient, sink: Any, email: str, log: Path) -> None:
    """Through the emailed link, as staff do. `log`: the web app's, quoted if no link comes."""
    page = await web.get("/staff/sign-in/not-a-token?lang=en")  # sets the CSRF cookie
    csrf = csrf_of(page.text)
    asked = await web.post("/staff/sign-in", data={"email": email, "lang": "en", "csrf": csrf})
    assert asked.status_code == 200, asked.text
    deadline = time.monotonic() + LINK_WAIT_S
    while not (links := sink.sign_in_links(email)):
        if time.monotonic() > deadline:
            held = [str(message["To"]) for message in sink.messages()]
            said = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise AssertionError(
                f"no sign-in link for {email} after {LINK_WAIT_S}s; the sink at port "
                f"{sink.port} holds {len(held)} message(s), to {held[-5:]}; the web app said:\n"
                f"{said}"
            )
        await asyncio.sleep(0.05)
    opened = await use_sign_in_link(web, links[-1])
    assert opened.status_code == 303, opened.status_code


def contact_one(engine: Engine, rules: ProgramRules) -> None:
    """A change, as the workflow records it: the newest referral awaiting contact is
    contacted now."""
    [row] = list_referrals(engine, stage=Stage.SUBMITTED, limit=1)
    state = load_referral(engine, row.referral_id)
    assert state is not None
    request = StaffAction(action=Action.CONTACTED, actor="desk-bench")
    new = apply_action(state, request, rules, datetime.now(UTC))
    assert isinstance(new, ReferralState), new
    save_referral(
        engine,
        ReferralRecord(state=new.model_copy(update={"history": []}), events=new.history[-1:]),
    )


async def dashboard_ms(
    base: str, sink: Any, email: str, change: Callable[[], None], log: Path
) -> dict[str, float | int]:
    """The page alone, the page then its charts concurrently (median ms of each), and the
    page just after a change to the data (its figures computed afresh)."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as web:
        await sign_in(web, sink, email, log)

        async def page() -> str:
            response = await web.get("/staff?lang=en")
            assert response.status_code == 200 and 'id="funnel"' in response.text
            return response.text

        charts = sorted(
            {unescape(src) for src in re.findall(r'src="(/staff/charts/[^"]+)"', await page())}
        )

        async def with_charts() -> None:
            await page()
            answers = await asyncio.gather(*(web.get(src) for src in charts))
            assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]

        async def timed(
            call: Callable[[], Any], before: Callable[[], None] = lambda: None
        ) -> float:
            await call()
            timings = []
            for _ in range(RUNS):
                await asyncio.to_thread(before)
                started = time.perf_counter()
                await call()
                timings.append((time.perf_counter() - started) * 1000)
            return round(statistics.median(timings), 1)

        return {
            "dashboard_ms": await timed(page),
            "dashboard_with_charts_ms": await timed(with_charts),
            "dashboard_after_change_ms": await timed(page, change),
            "dashboard_with_charts_after_change_ms": await timed(with_charts, change),
            "dashboard_charts": len(charts),
        }


async def measure_open_referrals(work: Path, count: int = 10_000) -> dict[str, Any]:
    """Fill a fresh database in `work` (made if missing) with `count` open referrals (and 20 %
    more closed), then time the staff's first page of `referrals list` and the dashboard."""
    work.mkdir(exist_ok=True)
    from devstack.ports import free_port
    from devstack.servers import MailSink, referrals_web

    rules = load_program(PROGRAM)
    database_url = f"sqlite:///{work / 'scale.db'}"
    engine = make_engine(database_url)
    event.listen(engine, "connect", _fast_writes)
    upgrade(engine)
    started = time.perf_counter()
    seed(engine, rules, count, datetime.now(UTC))
    seed_s = round(time.perf_counter() - started, 1)
    engine.dispose()
    engine = make_engine(database_url)  # as the workflow's activities write: durably
    open_referrals = count_referrals(engine, open_only=True)
    assert open_referrals == count, (open_referrals, count)
    closed = count_referrals(engine) - open_referrals

    shown = list_first_page(database_url)
    list_ms = median_ms(lambda: list_first_page(database_url))
    cli_ms = list_cli_ms(database_url, work)

    port = free_port()
    sink = start_sink("127.0.0.1", port, work / "mail")
    staff = rules.staff.emails[0]
    try:
        async with referrals_web(
            work,
            "/staff",
            REFERRALS_DATABASE_URL=database_url,
            REFERRALS_SMTP_HOST="127.0.0.1",
            REFERRALS_SMTP_PORT=str(port),
            REFERRALS_RATE_LIMIT="off",
            TEMPORAL_ADDRESS="127.0.0.1:1",  # the dashboard needs no Temporal
        ) as base:
            dashboard = await dashboard_ms(
                base,
                MailSink("127.0.0.1", port, work / "mail"),
                staff,
                lambda: contact_one(engine, rules),
                work / "web.log",
            )
    finally:
        sink.stop()
        engine.dispose()
    return {
        "open_referrals": open_referrals,
        "closed_referrals": closed,
        "list_first_page_ms": list_ms,
        "list_first_page_lines": len(shown.splitlines()),
        "list_cli_ms": cli_ms,
        **dashboard,
        "seed_s": seed_s,
    }


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    work = Path(tempfile.mkdtemp(prefix="referral-scale-"))
    try:
        print(json.dumps(asyncio.run(measure_open_referrals(work, count)), indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
