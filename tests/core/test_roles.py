"""Staff roles (core/roles.py, program.yaml's `staff`) and who the CLI records as acting: a
configured identity, bounded by its roles, or a claimed name with the login and host."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest
import yaml

from core.program import ProgramError, load_program
from core.roles import ROLES_FOR, Task, held, may, refusal, roles_for, roles_of, staff_addresses
from tests.cli.test_cli import VIA, write_submission
from tests.conftest import Cli, Result
from workflows.models.program import ProgramRules, Role, StaffRules
from workflows.models.values import Action

SALES, FINANCE, MANAGER = Role.SALES, Role.FINANCE, Role.MANAGER
BOB, FRED, MAY, OLD = (
    "bob@staff.example",
    "fred@staff.example",
    "may@staff.example",
    "old@staff.example",
)
STAFF = {
    "emails": [OLD],
    "roles": {"sales": [BOB, MAY], "finance": [FRED.upper()], "manager": [MAY]},
}


def program_with(program_file: Path, tmp_path: Path, staff: object) -> Path:
    data = yaml.safe_load(program_file.read_text(encoding="utf-8"))
    data["staff"] = staff
    path = tmp_path / f"program-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


# --- program.yaml ---------------------------------------------------------------------------


def test_roles_load_and_emails_still_mean_managers(program_file: Path, tmp_path: Path) -> None:
    staff = load_program(program_with(program_file, tmp_path, STAFF)).staff
    assert roles_of(staff, BOB) == {SALES}
    assert roles_of(staff, "Fred@Staff.Example") == {FINANCE}  # addresses ignore case
    assert roles_of(staff, MAY) == {SALES, MANAGER}  # several roles
    assert roles_of(staff, OLD) == {MANAGER}  # the older `emails` form
    assert roles_of(staff, "eve@staff.example") == frozenset()
    assert staff_addresses(staff) == {BOB, FRED, MAY, OLD}
    # The shipped program, `emails` only, loads as before: managers.
    shipped = load_program(program_file).staff
    assert shipped.roles.model_dump() == {"sales": [], "finance": [], "manager": []}
    assert all(roles_of(shipped, str(e)) == {MANAGER} for e in shipped.emails)


@pytest.mark.parametrize(
    ("staff", "message"),
    [
        ({"roles": {"auditor": [BOB]}}, "staff.roles.auditor: Extra inputs are not permitted"),
        ({"role": {"sales": [BOB]}}, "staff.role: Extra inputs are not permitted"),
        ({"roles": {"sales": ["bob"]}}, "staff.roles.sales.0: value is not a valid email"),
        ({"roles": {"finance": FRED}}, "staff.roles.finance: Input should be a valid list"),
    ],
)
def test_a_bad_staff_section_stops_loading(
    program_file: Path, tmp_path: Path, staff: object, message: str
) -> None:
    with pytest.raises(ProgramError, match=message):
        load_program(program_with(program_file, tmp_path, staff))


def test_roles_never_enter_a_referrals_rules_snapshot(program_file: Path, tmp_path: Path) -> None:
    """`staff` is excluded from the rules each referral carries: adding roles changes no
    workflow payload, so stored histories replay as before (tests/workflows/test_replay.py)."""
    plain = load_program(program_file)
    with_roles = load_program(program_with(program_file, tmp_path, STAFF))
    assert with_roles.model_dump_json() == plain.model_dump_json()
    assert "staff" not in json.loads(plain.model_dump_json())
    assert ProgramRules.model_validate_json(with_roles.model_dump_json()).staff == StaffRules()


# --- the table ------------------------------------------------------------------------------


def test_the_table_covers_everything_and_a_manager_may_do_it_all() -> None:
    assert set(ROLES_FOR) == set(Action) | set(Task)
    assert all(may({MANAGER}, permission) for permission in ROLES_FOR)
    assert not any(may(set(), permission) for permission in ROLES_FOR)


def test_sales_and_finance_split_the_actions() -> None:
    money = {Action.PAYMENT, Action.PAYOUT, Action.REFUND}
    for action in Action:
        assert may({SALES}, action) == (action not in money), action
        assert may({FINANCE}, action) == (action in money), action
    paying = {Task.PAYEES, Task.PAYOUT_RUNS}
    for task in Task:
        assert roles_for(task) == ((FINANCE, MANAGER) if task in paying else (MANAGER,)), task
    assert may({SALES, FINANCE}, Action.PAYOUT) and may({SALES, FINANCE}, Action.WON)


def test_a_refusal_is_one_line_with_what_a_translation_needs() -> None:
    assert refusal(Action.PAYOUT) == "payout needs the finance or manager role"
    assert roles_for(Action.PAYOUT) == (FINANCE, MANAGER)
    assert refusal(Action.WON) == "won needs the sales or manager role"
    assert refusal(Task.ERASE) == "erase needs the manager role"
    assert held(BOB, {SALES}) == f"{BOB} is sales"
    assert held(MAY, {MANAGER, SALES}) == f"{MAY} is sales and manager"
    assert held(BOB, set(Role)) == f"{BOB} is sales, finance and manager"
    assert held(BOB, ()) == f"{BOB} has no staff role"


# --- the CLI --------------------------------------------------------------------------------


def refused(result: Result, line: str) -> None:
    assert result.code == 1 and result.out == "", result
    assert result.err.strip().splitlines() == [f"referrals: {line}"], result.err


async def test_with_an_identity_the_cli_acts_as_it_and_only_as_its_roles_allow(
    cli: Cli, program_file: Path, tmp_path: Path
) -> None:
    program = str(program_with(program_file, tmp_path, STAFF))

    async def as_(identity: str, *args: str) -> Result:
        env = {"REFERRALS_PROGRAM": program, "REFERRALS_ACTOR": ""}
        return await cli(*args, env_changes={**env, "REFERRALS_STAFF_IDENTITY": identity})

    submitted = await as_(BOB, "submit", str(write_submission(tmp_path)))
    assert submitted.code == 0, submitted
    rid = submitted.out.strip()
    for step in [
        ("contacted", rid),
        ("accept", rid),
        ("approve", rid),
        ("won", rid, "--amount", "1000", "--currency", "EUR"),
    ]:
        done = await as_(BOB, *step)
        assert done.code == 0, done
    refused(
        await as_(BOB, "payment", rid, "--amount", "1000", "--reference", "INV-1"),
        f"refused: payment needs the finance or manager role ({BOB} is sales)",
    )
    assert (await as_(FRED, "payment", rid, "--amount", "1000", "--reference", "INV-1")).code == 0
    before = json.loads((await cli("show", rid, "--json")).out)

    refused(
        await as_(BOB, "payout", rid, "--reference", "X"),
        f"refused: payout needs the finance or manager role ({BOB} is sales)",
    )
    refused(
        await as_("eve@staff.example", "payout", rid, "--reference", "X"),
        "refused: payout needs the finance or manager role (eve@staff.example has no staff role)",
    )
    refused(
        await as_(BOB, "--actor", "fred", "cancel", rid, "--reason", "no"),
        f"refused: this CLI acts as {BOB} (REFERRALS_STAFF_IDENTITY), not fred: drop --actor "
        "(and REFERRALS_ACTOR)",
    )
    refused(
        await as_(BOB, "erase", rid, "--reason", "asked"),
        f"refused: erase needs the manager role ({BOB} is sales)",
    )
    refused(
        await as_("eve@staff.example", "submit", str(write_submission(tmp_path))),
        "refused: submit needs a staff role (eve@staff.example has no staff role)",
    )
    # Nothing of the refused commands reached the referral.
    assert json.loads((await cli("show", rid, "--json")).out) == before

    paid = await as_("Fred@Staff.Example", "--actor", FRED, "payout", rid, "--reference", "X")
    assert paid.code == 0 and "stage commission_paid" in paid.out, paid
    history = json.loads((await cli("show", rid, "--json")).out)["history"]
    assert [(h["action"], h["actor"]) for h in history] == [
        ("submitted", BOB),
        ("contacted", BOB),
        ("accept", BOB),
        ("approve", BOB),
        ("won", BOB),
        ("payment", FRED),
        ("payout", FRED),
    ]


async def test_without_an_identity_the_cli_records_the_login_and_host(
    cli: Cli, tmp_path: Path
) -> None:
    rid = (await cli("submit", str(write_submission(tmp_path)))).out.strip()
    assert (await cli("--actor", "alice", "contacted", rid)).code == 0
    assert (await cli("accept", rid, env_changes={"REFERRALS_ACTOR": ""})).code == 0
    history = json.loads((await cli("show", rid, "--json")).out)["history"]
    assert [h["actor"] for h in history] == [
        f"desk-anna {VIA}",
        f"alice {VIA}",
        f"{getpass.getuser()} {VIA}",
    ]
