"""`referrals list` a page at a time, over a real database (SQLite, and PostgreSQL when its
URL is given): newest first, pages that never overlap, a footer that names the next page,
the count of all, and `--json` still a plain list of every referral unless asked for a page."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from activities.queries import list_referrals
from activities.records import save_referral
from devstack.factories import referral_input
from starter.cli import DEFAULT_LIST_LIMIT, run
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralRecord
from workflows.transitions import initial_state

REFERRALS = 120
START = datetime(2026, 9, 1, 9, 0, tzinfo=UTC)


def received(n: int) -> datetime:
    """Every third referral shares its instant with the one before: ties are ordered by id."""
    return START + timedelta(hours=n - n % 3)


@pytest.fixture
def listed(
    engine: Engine, shipped_rules: ProgramRules, program_file: Path, monkeypatch: pytest.MonkeyPatch
) -> Engine:
    for n in range(REFERRALS):
        given = referral_input(
            shipped_rules,
            f"R-PAGE{n:04d}",
            received(n),
            **{"prospect.website": f"https://prospect-{n:04d}.example"},
        )
        state = initial_state(given)
        save_referral(engine, ReferralRecord(state=state, events=state.history))
    monkeypatch.setenv("REFERRALS_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("REFERRALS_PROGRAM", str(program_file))
    return engine


def newest_first() -> list[str]:
    return [
        f"R-PAGE{n:04d}"
        for n in sorted(range(REFERRALS), key=lambda n: (received(n), f"R-PAGE{n:04d}"))
    ][::-1]


def printed(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert run(["list", *args]) == 0
    return capsys.readouterr().out.splitlines()


def ids(lines: list[str]) -> list[str]:
    return [line.split()[0] for line in lines if line.startswith("R-PAGE")]


@pytest.mark.usefixtures("listed")
def test_the_first_page_is_the_newest_fifty_and_names_the_next(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = printed(capsys)

    assert lines[0].startswith("REFERRAL ")
    assert ids(lines) == newest_first()[:DEFAULT_LIST_LIMIT]
    assert lines[-1] == "50 of 120 referrals; next: referrals list --page 2"


@pytest.mark.usefixtures("listed")
def test_pages_follow_each_other_without_overlap(capsys: pytest.CaptureFixture[str]) -> None:
    second = printed(capsys, "--page", "2")
    last = printed(capsys, "--page", "3")
    beyond = printed(capsys, "--page", "4")

    assert ids(second) == newest_first()[50:100]
    assert second[-1] == "51-100 of 120 referrals; next: referrals list --page 3"
    assert ids(last) == newest_first()[100:]
    assert last[-1] == "101-120 of 120 referrals"
    assert beyond == ["no referrals on page 4 (120 in all)"]


@pytest.mark.usefixtures("listed")
def test_limit_and_filters_carry_over_to_the_next_page(capsys: pytest.CaptureFixture[str]) -> None:
    everything = printed(capsys, "--limit", "0")
    first = printed(capsys, "--limit", "7", "--stage", "submitted")
    third = printed(capsys, "--limit", "7", "--page", "3", "--stage", "submitted")

    assert ids(everything) == newest_first() and everything[-1] == "120 of 120 referrals"
    assert ids(first) == newest_first()[:7]
    assert first[-1] == (
        "7 of 120 referrals; next: referrals list --page 2 --limit 7 --stage submitted"
    )
    assert ids(third) == newest_first()[14:21]
    assert printed(capsys, "--stage", "won") == ["no referrals in stage won"]


@pytest.mark.usefixtures("listed")
def test_json_is_every_referral_unless_a_page_is_asked_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["list", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    pages = []
    for page in (1, 2, 3):
        assert run(["list", "--json", "--limit", "50", "--page", str(page)]) == 0
        pages.append(json.loads(capsys.readouterr().out))

    assert isinstance(every, list) and [r["referral_id"] for r in every] == newest_first()
    assert [len(p) for p in pages] == [50, 50, 20]
    assert [r for page in pages for r in page] == every


@pytest.mark.usefixtures("listed")
def test_a_bad_page_or_limit_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["list", "--page", "0"]) == 2
    assert run(["list", "--limit", "-1"]) == 2
    assert run(["list", "--limit", "0", "--page", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "referrals: --page must be 1 or more",
        "referrals: --limit must be 0 (all) or more",
        "referrals: --limit 0 lists every referral on one page: no --page",
    ]


def test_the_first_page_reads_the_submitted_at_index(listed: Engine) -> None:
    """Newest first with a limit walks the index from its end: no sort of every referral."""
    if listed.dialect.name != "sqlite":
        pytest.skip("the plan of a 120-row table says nothing on PostgreSQL")
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(listed, "before_cursor_execute", seen)
    try:
        assert len(list_referrals(listed, limit=50, offset=50)) == 50
    finally:
        event.remove(listed, "before_cursor_execute", seen)
    [query] = statements
    with listed.connect() as connection:
        plan = " / ".join(
            row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}", (50, 50))
        )
    assert "ix_referral_submitted_at" in plan and "TEMP B-TREE" not in plan, plan
