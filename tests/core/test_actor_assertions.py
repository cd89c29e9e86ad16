"""Who acted, proven (core/actor_assertions.py): money moves only on an actor signed by a
surface the workers trust; a signal, whoever it names, is recorded as unauthenticated and does
only what the program allows. The workflow runs for real on the time-skipping server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from core.actor_assertions import (
    UNAUTHENTICATED,
    ActorKeyError,
    Refused,
    SigningKey,
    TrustedKeys,
)
from devstack.settings import SETTINGS, signed
from tests.desk import WON_180K, act, advance, query_state, referral_desk, state_until
from workflows.models.program import ProgramRules
from workflows.models.referral import ActResult, StaffAction, Stage
from workflows.models.values import Action

DESK = SigningKey.new("web-1", "web")
TOOLBOX = SigningKey.new("toolbox-1", "toolbox")
TRUSTED = TrustedKeys.parse(f"{DESK.trusted_entry()}, {TOOLBOX.trusted_entry()}")
WON = StaffAction(
    action=Action.WON, actor="sales@x.example", request_id="r-1", amount=Decimal("500000"),
    currency="EUR",
)  # fmt: skip


# --- the assertion itself -------------------------------------------------------------------


def test_an_assertion_names_the_surface_whose_key_signed_it() -> None:
    assert TRUSTED.verify("R-1", DESK.sign("R-1", WON)) == "web"
    assert TRUSTED.verify("R-1", TOOLBOX.sign("R-1", WON)) == "toolbox"


@pytest.mark.parametrize(
    ("forgery", "reason"),
    [
        # Another amount, another actor, another request id: not what was signed.
        (lambda: DESK.sign("R-1", WON).model_copy(update={"amount": Decimal("5000000")}),
         "signed for another request"),
        (lambda: DESK.sign("R-1", WON).model_copy(update={"actor": "forged-cfo"}),
         "names 'sales@x.example', not the actor"),
        (lambda: DESK.sign("R-1", WON).model_copy(update={"request_id": "r-2"}),
         "signed for another request"),
        (lambda: DESK.sign("R-2", WON), "for another referral"),
        (lambda: DESK.sign("R-1", WON, now=datetime.now(UTC) - timedelta(minutes=17)),
         "has expired"),
        # A key of the same id and surface that the workers were not given.
        (lambda: SigningKey.new("web-1", "web").sign("R-1", WON), "invalid"),
        (lambda: SigningKey.new("laptop", "web").sign("R-1", WON), "key 'laptop' is not trusted"),
        (lambda: WON.model_copy(update={"assertion": "forged-cfo"}), "not a signed token"),
    ],
)  # fmt: skip
def test_an_assertion_proves_only_what_was_signed(forgery: Any, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        TRUSTED.verify("R-1", forgery())


def test_a_key_whose_surface_differs_from_the_trusted_one_is_refused() -> None:
    """A key trusted for the toolbox cannot speak for the web desk: the issuer is checked."""
    claims_web = SigningKey(TOOLBOX.key_id, "web", TOOLBOX.private)
    with pytest.raises(Refused, match="invalid"):
        TRUSTED.verify("R-1", claims_web.sign("R-1", WON))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("web-1:web", "an entry is 'key id:surface:base64 key'"),
        ("web-1:web:!!!", "not base64"),
        ("web-1:web:AAAA", "not 32 bytes long"),
        ("Web 1:web:" + "A" * 43, "key id 'Web 1'"),
        ("web-1:unauthenticated:" + "A" * 43, "cannot name a surface"),
        (f"{DESK.trusted_entry()},{DESK.trusted_entry()}", "given twice"),
        ("", "no key"),
    ],
)
def test_malformed_trusted_keys_are_refused_naming_the_setting(text: str, problem: str) -> None:
    with pytest.raises(ActorKeyError, match=problem) as raised:
        TrustedKeys.parse(text)
    assert str(raised.value).startswith("REFERRALS_ACTOR_KEYS: ")


def test_a_signing_key_round_trips_through_its_text() -> None:
    again = SigningKey.parse(DESK.text())
    assert again.trusted_entry() == DESK.trusted_entry()
    assert TRUSTED.verify("R-1", again.sign("R-1", WON)) == "web"


def test_the_program_cannot_let_money_move_unauthenticated(rules: ProgramRules) -> None:
    data = rules.model_dump(mode="json")
    with pytest.raises(ValidationError, match="payout, won move money"):
        ProgramRules.model_validate(
            {**data, "unauthenticated_actions": ["accept", "won", "payout"]}
        )
    assert Action.WON not in rules.unauthenticated_actions
    assert Action.ACCEPT in rules.unauthenticated_actions  # by default, the rest


# --- in the workflow --------------------------------------------------------------------------


async def refused_update(handle: WorkflowHandle[Any, Any], request: StaffAction) -> str:
    """The validator's one-line refusal; nothing reaches the history."""
    before = await query_state(handle)
    with pytest.raises(WorkflowUpdateFailedError) as raised:
        await handle.execute_update("act", request, result_type=ActResult)
    assert (await query_state(handle)).model_dump() == before.model_dump()
    return str(getattr(raised.value.cause, "message", raised.value.cause))


async def test_a_forged_signal_moves_no_money_and_the_same_request_signed_does(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    """The attack of the issue: with Temporal access alone, a signal naming "forged-cfo"
    recorded a deal won and its commission. Now it is refused and recorded as such, and it
    does not use up the request id a real one may carry."""
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        await advance(handle, Stage.APPROVED)
        forged = StaffAction(action=Action.WON, actor="forged-cfo", request_id="crm-9", **WON_180K)
        await handle.signal("action", forged)
        await handle.signal("action", forged)  # redelivered: recorded again, still refused
        state = await state_until(
            handle, lambda s: [h.outcome for h in s.history].count("refused") == 2, "refusals"
        )
        assert state.stage is Stage.APPROVED and state.commission is None
        refused = state.history[-1]
        assert refused.actor == "forged-cfo" and refused.surface == UNAUTHENTICATED
        assert refused.note is not None and "won moves money" in refused.note
        assert refused.request_id is None

        # The desk sends the same request, signed: it applies, its proof recorded.
        state = await act(handle, Action.WON, "sales@nuage.example", request_id="crm-9", **WON_180K)
        assert state.stage is Stage.WON and state.commission is not None
        assert (state.history[-1].actor, state.history[-1].surface) == (
            "sales@nuage.example", "tests",
        )  # fmt: skip
        assert desk.ledger and not [r for r in desk.ledger if r.actor == "forged-cfo"]


async def test_money_by_update_needs_a_valid_assertion(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    async with referral_desk(time_env, rules) as desk:
        handle, _ = await desk.start()
        await advance(handle, Stage.APPROVED)
        won = StaffAction(action=Action.WON, actor="cfo", request_id="u-1", **WON_180K)

        unsigned = await refused_update(handle, won)
        assert unsigned.startswith("won moves money: it needs an actor signed by")
        stranger = SigningKey.new("tests", "tests")  # the trusted id, another key
        assert "invalid" in await refused_update(handle, stranger.sign(handle.id, won))
        elsewhere = signed("R-ELSEWHERE", won)
        assert "for another referral" in await refused_update(handle, elsewhere)
        inflated = signed(handle.id, won).model_copy(update={"amount": Decimal("9000000")})
        assert "another request" in await refused_update(handle, inflated)

        await handle.execute_update("act", signed(handle.id, won), result_type=ActResult)
        state = await query_state(handle)
        assert state.stage is Stage.WON and state.history[-1].surface == "tests"
        assert [h.outcome for h in state.history].count("refused") == 0  # updates leave none


async def test_what_an_unauthenticated_sender_may_do_is_the_programs_to_say(
    time_env: WorkflowEnvironment, rules: ProgramRules
) -> None:
    """By default the rest; here, only `contacted`: an unsigned `accept` is refused by
    signal (recorded) and by update (answered), and goes through signed."""
    strict = rules.model_copy(update={"unauthenticated_actions": [Action.CONTACTED]})
    async with referral_desk(time_env, strict) as desk:
        handle, _ = await desk.start()
        await handle.signal("action", StaffAction(action=Action.CONTACTED, actor="Temporal UI"))
        await handle.signal("action", StaffAction(action=Action.ACCEPT, actor="Temporal UI"))
        state = await state_until(handle, lambda s: len(s.history) == 3, "both signals")
        contacted, accept = state.history[1:]
        assert (contacted.outcome, contacted.actor, contacted.surface) == (
            "applied", "Temporal UI", UNAUTHENTICATED,
        )  # fmt: skip
        assert accept.outcome == "refused" and accept.note is not None
        assert "the program allows no unauthenticated accept" in accept.note

        request = StaffAction(action=Action.ACCEPT, actor="ops", request_id=str(uuid.uuid4()))
        assert "allows no unauthenticated accept" in await refused_update(handle, request)
        state = await act(handle, Action.ACCEPT, "sales@nuage.example")
        assert state.stage is Stage.QUALIFYING and state.history[-1].surface == "tests"


def test_the_test_runs_workers_trust_the_key_its_surface_signs_with() -> None:
    """So that every other test's signed actions stand for a real surface's."""
    assert SETTINGS.actor_signing_key is not None and SETTINGS.actor_trusted_keys is not None
    assert SETTINGS.actor_trusted_keys.verify("R-1", signed("R-1", WON)) == "tests"
