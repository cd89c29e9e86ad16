"""Property-based tests: random submissions against the intake's validation, and random
sequences of staff actions against the one transition function.

Pure code, no servers. Example counts are bounded (see `MODEL` and `STATEFUL`) so the file
runs in a few seconds; Hypothesis keeps no example database in the repository.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from core.program import load_program
from devstack.factories import ONE_LINE_FIELDS, state_at, submission_data
from devstack.settings import ROOT
from starter.intake import SubmissionRefused, parse_submission
from workflows.models.ledger import ENTITLEMENT_KINDS, Commission, CommissionLine, LineKind
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralState, Refusal, StaffAction, Stage, Submission
from workflows.models.values import COUNTRY_CODES, Action
from workflows.transitions import apply_action, commission_lines

RULES: ProgramRules = load_program(ROOT / "program.yaml")
ELIGIBLE = sorted(p.id for p in RULES.products if p.multi_tenant_cloud)
INELIGIBLE = sorted(p.id for p in RULES.products if not p.multi_tenant_cloud)

MODEL = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STATEFUL = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# --- random submissions -------------------------------------------------------------------------

# What the intake refuses as hostile (see `starter.intake.control_character_errors`): valid text
# never holds it; the tests about control characters below use it on purpose.
HOSTILE_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")
LINE = st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"))
LINES = st.one_of(LINE, st.sampled_from("\n\r\t"))


def _text(limit: int, alphabet: st.SearchStrategy[str] = LINE) -> st.SearchStrategy[str]:
    """Valid text for a field of at most `limit` characters (counted once stripped), now and
    then at the limit exactly, and now and then padded with spaces the model strips."""
    body = st.text(alphabet, min_size=1, max_size=min(limit, 60)).filter(
        lambda s: 1 <= len(s.strip()) <= limit
    )
    at_limit = st.text(LINE, min_size=1, max_size=3).map(lambda s: (s * limit)[:limit])
    at_limit = at_limit.filter(lambda s: len(s.strip()) == limit)
    return st.one_of(body, at_limit, body.map(lambda s: f"  {s}\u3000"))


def _not_a_string() -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=2), st.none())


def _too_long(limit: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(categories=("L", "N")), min_size=1, max_size=5).map(
        lambda s: (s * (limit + 1))[: limit + 1 + len(s)]
    )


TEXT_INVALID = st.one_of(st.sampled_from(["", "   ", "\u3000"]), _too_long(200))
EMAILS = st.from_regex(
    r"[a-z][a-z0-9]{0,12}(\.[a-z0-9]{1,6})?@[a-z][a-z0-9]{0,10}\.(com|fr|example|org|io)",
    fullmatch=True,
)
BAD_EMAILS = st.sampled_from(
    ["nobody", "a@", "@example.com", "a b@example.com", "a@@example.com", "x@localhost", "a@b", ""]
)
LABEL = st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True)
WEBSITES = st.builds(
    lambda scheme, www, labels, tld, path: f"{scheme}{www}{'.'.join(labels)}.{tld}{path}",
    st.sampled_from(["", "http://", "https://", "HTTPS://"]),
    st.sampled_from(["", "www.", "WWW."]),
    st.lists(LABEL, min_size=1, max_size=3),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
    st.sampled_from(["", "/", "/about?x=1"]),
)
BAD_WEBSITES = st.sampled_from(
    ["not a website", "localhost", "http://127.0.0.1/", "https://-bad-.com", "http://", "a..b.fr"]
)
COUNTRIES = st.sampled_from(sorted(COUNTRY_CODES)).flatmap(
    lambda code: st.sampled_from([code, code.lower(), f" {code} "])
)
AMOUNTS = st.one_of(
    st.decimals(min_value=0, max_value=Decimal("999999999999.99"), places=2).map(str),
    st.integers(min_value=0, max_value=10**13),
    st.sampled_from(["0", "180000.00", "1e13"]),
)
BAD_AMOUNTS = st.sampled_from(["-1", "abc", "1e20", "NaN", "Infinity", "123456789012345", ""])
CURRENCY = st.from_regex(r"[A-Za-z]{3}", fullmatch=True)


@dataclass(frozen=True)
class Field:
    """One leaf of the submission: how to make it valid, invalid, or (if optional) absent."""

    required: bool
    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any]
    nullable: bool = True  # an optional field may be sent as null (the language may not)


def _text_field(required: bool, limit: int = 200) -> Field:
    invalid = st.one_of(TEXT_INVALID, _not_a_string().filter(lambda v: v is not None or required))
    return Field(required, _text(limit), invalid)


LEAVES: dict[str, Field] = {
    "referrer.name": _text_field(True),
    "referrer.email": Field(True, EMAILS, st.one_of(BAD_EMAILS, _not_a_string())),
    "referrer.company": _text_field(True),
    "referrer.phone": _text_field(False),
    "referrer.language": Field(
        False, st.sampled_from(["fr", "en"]), st.sampled_from(["de", "FR", 1, None]), False
    ),
    "prospect.company": _text_field(True),
    "prospect.website": Field(True, WEBSITES, st.one_of(BAD_WEBSITES, st.integers())),
    "prospect.country": Field(True, COUNTRIES, st.sampled_from(["XX", "FRA", "F", "", 33, None])),
    "prospect.industry": _text_field(False),
    # `public` is well-formed but refused by the program's rule: still a field error.
    "prospect.sector": Field(True, st.just("private"), st.sampled_from(["public", "Private", 1])),
    "contact.name": _text_field(True),
    "contact.email": Field(True, EMAILS, st.one_of(BAD_EMAILS, st.integers())),
    "contact.title": _text_field(False),
    "contact.phone": _text_field(False),
    "opportunity.product": Field(
        True,
        st.sampled_from(ELIGIBLE),
        st.one_of(st.sampled_from([*INELIGIBLE, "no-such-product", ""]), st.integers()),
    ),
    "opportunity.estimated_annual_value": Field(False, AMOUNTS, BAD_AMOUNTS),
    "opportunity.currency": Field(False, CURRENCY, st.sampled_from(["EURO", "E1R", "", "12", 5])),
    "opportunity.notes": Field(
        False,
        st.one_of(st.just(""), _text(4000, LINES)),
        st.one_of(_too_long(4000), st.integers()),
    ),
}
SECTIONS = ("referrer", "prospect", "contact", "opportunity")


@st.composite
def submissions(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    """A submission as a client could send it, and the fields that must be refused."""
    data: dict[str, Any] = {section: {} for section in SECTIONS}
    wrong: set[str] = set()
    for name, leaf in LEAVES.items():
        section, _, key = name.partition(".")
        choice = draw(st.sampled_from(["valid"] * 6 + ["invalid", "absent"]))
        if choice == "valid":
            data[section][key] = draw(leaf.valid)
        elif choice == "invalid":
            data[section][key] = draw(leaf.invalid)
            wrong.add(name)
        elif choice == "absent" and leaf.required:
            wrong.add(name)
        elif leaf.nullable and draw(st.booleans()):
            data[section][key] = None  # an optional field sent as null is absent
    consent = draw(st.sampled_from([True, True, True, False, "maybe", 2, None, "absent"]))
    if consent != "absent":
        data["consent"] = consent
    if consent is not True:
        wrong.add("consent")
    if draw(st.integers(0, 9)) == 0:  # a field nobody asked for
        section = draw(st.sampled_from(SECTIONS))
        data[section]["favourite_colour"] = "blue"
        wrong.add(f"{section}.favourite_colour")
    if draw(st.integers(0, 9)) == 0:  # a whole section missing or not an object
        section = draw(st.sampled_from(SECTIONS))
        junk: Any = draw(st.sampled_from(["absent", "a string", [], None]))
        if junk == "absent":
            del data[section]
        else:
            data[section] = junk
        wrong = {f for f in wrong if not f.startswith(f"{section}.")} | {section}
    return data, wrong


@MODEL
@given(submissions())
def test_random_submissions_are_accepted_or_refused_field_by_field(
    case: tuple[dict[str, Any], set[str]],
) -> None:
    """Valid ones are accepted with their values; invalid ones are refused naming exactly the
    wrong fields, all at once; nothing else is ever raised."""
    data, wrong = case
    try:
        submission = parse_submission(data, RULES)
    except SubmissionRefused as refused:
        assert refused.errors
        assert all(e.field and e.message and e.code for e in refused.errors)
        assert {e.field for e in refused.errors} == wrong, refused.errors
        return
    assert not wrong, f"accepted, but these fields are wrong: {wrong}"
    _assert_kept(data, submission)


def _assert_kept(data: dict[str, Any], submission: Submission) -> None:
    assert submission.referrer.name == data["referrer"]["name"].strip()
    assert submission.prospect.company == data["prospect"]["company"].strip()
    assert submission.prospect.country == data["prospect"]["country"].strip().upper()
    assert submission.contact.name == data["contact"]["name"].strip()
    assert submission.opportunity.product == data["opportunity"]["product"]
    notes = data["opportunity"].get("notes")
    assert submission.opportunity.notes == (notes.strip() if notes is not None else None)
    amount = data["opportunity"].get("estimated_annual_value")
    if amount is not None:
        assert submission.opportunity.estimated_annual_value == Decimal(str(amount))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


@MODEL
@given(
    st.one_of(
        JSON,
        st.fixed_dictionaries({s: JSON for s in SECTIONS}, optional={"consent": JSON}),
    )
)
def test_any_json_is_refused_field_by_field_never_crashes(data: Any) -> None:
    """What the CLI, the form and the API all go through."""
    try:
        parse_submission(data, RULES)
    except SubmissionRefused as refused:
        assert refused.errors and all(e.field and e.message for e in refused.errors)


# --- control characters in single-line fields -----------------------------------------------------

TEXT_FIELDS = ONE_LINE_FIELDS
CONTROL = st.one_of(
    st.sampled_from(["\r\n", "\n", "\r", "\x00", "\x1b", "\x85", "\u2028", "\u2029", "\x0b"]),
    st.characters(categories=("Cc", "Cs", "Zl", "Zp")),
)


@st.composite
def with_control_character(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    name = draw(st.sampled_from(TEXT_FIELDS))
    section, _, key = name.partition(".")
    before = draw(st.text(LINE, min_size=1, max_size=20).filter(str.strip))
    after = draw(st.text(LINE, max_size=20))
    data = submission_data(**{name: f"{before}{draw(CONTROL)}{after}"})
    data[section][key] = data[section][key][:200]
    assume(any(unicodedata.category(c) in HOSTILE_CATEGORIES for c in data[section][key]))
    return data, name


@MODEL
@given(with_control_character())
def test_one_line_fields_refuse_control_characters(
    case: tuple[dict[str, Any], str],
) -> None:
    """CR/LF and other control characters could split an email header or a one-line record;
    every intake refuses them, naming the field."""
    data, name = case
    with pytest.raises(SubmissionRefused) as refused:
        parse_submission(data, RULES)
    assert [(e.field, e.code) for e in refused.value.errors] == [(name, "control_characters")]


@MODEL
@given(st.text(LINES, max_size=200), st.sampled_from(["\x00", "\x1b", "\u2028", "\x7f"]))
def test_notes_keep_line_breaks_but_no_other_control(text: str, bad: str) -> None:
    notes = f"x{text}y"
    data = submission_data(**{"opportunity.notes": notes})
    assert parse_submission(data, RULES).opportunity.notes == notes
    data = submission_data(**{"opportunity.notes": f"{notes}{bad}"})
    with pytest.raises(SubmissionRefused) as refused:
        parse_submission(data, RULES)
    errors = [(e.field, e.code) for e in refused.value.errors]
    assert errors == [("opportunity.notes", "control_characters_multiline")]


@MODEL
@given(
    st.sampled_from(["TRUE", "True", "y", "t", "YES", "On", 1, "1", True]),
    st.sampled_from(ELIGIBLE).map(lambda p: f" {p} "),
)
def test_rule_errors_agree_with_the_model_when_other_fields_are_wrong(
    consent: Any, product: str
) -> None:
    """A consent or product the model accepts is not reported as missing or unknown just
    because another field is wrong."""
    data = submission_data(consent=consent, **{"contact.email": "nobody"})
    data["opportunity"]["product"] = product
    with pytest.raises(SubmissionRefused) as refused:
        parse_submission(data, RULES)
    assert {e.field for e in refused.value.errors} == {"contact.email"}


# --- random staff actions against the transition function -----------------------------------------

# DESIGN.md section 3, written out independently of `workflows.transitions`: the actions a
# stage allows, and where each action may lead (`extend` keeps the stage; `refund` is not
# pinned down by the contract beyond its origin stages).
CONTRACT: dict[str, set[str]] = {
    "submitted": {"contacted", "decline", "cancel"},
    "contacted": {"accept", "decline", "cancel"},
    "qualifying": {"approve", "reject", "cancel", "extend"},
    "approved": {"won", "lost", "cancel", "extend"},
    "won": {"payment", "cancel"},
    "commission_payable": {"payout", "refund"},
    "commission_paid": {"refund"},
    "declined": set(),
    "rejected": set(),
    "lost": set(),
    "cancelled": set(),
    "expired": set(),
}
LEADS_TO: dict[str, set[str]] = {
    "contacted": {"contacted"},
    "accept": {"qualifying"},
    "decline": {"declined"},
    "approve": {"approved"},
    "reject": {"rejected"},
    "won": {"won"},
    "lost": {"lost"},
    "payment": {"won", "commission_payable"},
    "payout": {"commission_paid"},
    "cancel": {"cancelled"},
}
START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
MONEY = st.one_of(
    st.decimals(min_value=Decimal("-10"), max_value=Decimal("250000"), places=3),
    st.sampled_from([Decimal("0"), Decimal("0.004"), Decimal("0.005"), Decimal("1e-9")]),
    st.just(Decimal("1e14")),  # amounts beyond Decimal's precision: see test_huge_amounts_…
    st.none(),
)
TEXTS = st.sampled_from([None, "", "   ", "a reason", "line\nbreak"])


class TransitionMachine(RuleBasedStateMachine):
    """One referral, driven by random staff actions, some well-formed and some not; its
    invariants are the contract's."""

    def __init__(self) -> None:
        super().__init__()
        self.state: ReferralState = state_at(Stage.SUBMITTED, RULES)
        self.at = START
        self.commission: Commission | None = None
        self.references: list[str] = []

    @initialize(
        stage=st.sampled_from(
            [Stage.SUBMITTED, Stage.CONTACTED, Stage.QUALIFYING, Stage.APPROVED, Stage.WON]
        ),
        basis=st.decimals(min_value=Decimal("1"), max_value=Decimal("900000"), places=2),
    )
    def start(self, stage: Stage, basis: Decimal) -> None:
        self.state = state_at(stage, RULES, basis=str(basis))
        self.commission = self.state.commission

    def act(self, request: StaffAction) -> None:
        self.at += timedelta(hours=7)
        before = self.state.model_copy(deep=True)
        result = apply_action(self.state, request, RULES, self.at)
        assert self.state == before, "apply_action changed its input"
        if isinstance(result, Refusal):
            assert result.reason and "\n" not in result.reason
            return
        origin, action, stage = before.stage.value, request.action.value, result.stage.value
        assert action in CONTRACT[origin], f"{action} applied in {origin}"
        assert stage in CONTRACT, f"{stage} is no stage of the contract"
        assert stage in LEADS_TO.get(action, {origin} if action == "extend" else set(CONTRACT))
        assert len(result.history) == len(before.history) + 1
        assert result.history[-1].action == action and result.history[-1].at == self.at
        if result.is_terminal:
            assert result.closed_at is not None
        if request.reference:
            self.references.append(request.reference)
        self.state = result

    @rule(data=st.data())
    def next_step(self, data: st.DataObject) -> None:
        """A well-formed action the stage allows: keeps the referral moving forward."""
        allowed = [a for a in Action if a.value in CONTRACT[self.state.stage.value]]
        if not allowed:
            return
        action = data.draw(st.sampled_from(allowed))
        basis = self.commission.basis_amount if self.commission else Decimal("1000")
        amount = data.draw(
            st.decimals(min_value=Decimal("0.01"), max_value=basis, places=2)
            if action is Action.PAYMENT
            else st.decimals(min_value=Decimal("1"), max_value=Decimal("900000"), places=2)
        )
        self.act(
            StaffAction(
                action=action,
                actor="desk",
                reason="a reason",
                amount=amount,
                currency="EUR",
                reference=f"REF-{len(self.references)}-{data.draw(st.integers(0, 9))}",
                payment_terms_days=data.draw(st.none() | st.integers(0, 365)),
            )
        )

    @rule(
        action=st.sampled_from(list(Action)),
        reason=TEXTS,
        amount=MONEY,
        currency=st.sampled_from([None, "EUR", "eur", " EUR ", "USD", "EURO", "", "JPY"]),
        reference=st.one_of(TEXTS, st.from_regex(r"INV-[0-9]{1,2}", fullmatch=True)),
        terms=st.none() | st.integers(-5, 400),
        data=st.data(),
    )
    def any_action(
        self,
        action: Action,
        reason: str | None,
        amount: Decimal | None,
        currency: str | None,
        reference: str | None,
        terms: int | None,
        data: st.DataObject,
    ) -> None:
        """Anything a signal sender could send, including repeats of used references."""
        repeat = data.draw(st.booleans())
        if self.references and repeat:
            reference = data.draw(st.sampled_from(self.references))
        self.act(
            StaffAction(
                action=action,
                actor="anyone",
                reason=reason,
                note=reason,
                amount=amount,
                currency=currency,
                reference=reference,
                payment_terms_days=terms,
            )
        )

    @precondition(lambda self: self.state.stage.value in ("won", "commission_payable"))
    @rule()
    def the_same_payment_twice(self) -> None:
        """A payment reference already recorded is refused, never counted twice."""
        if not self.state.payments:
            return
        again = StaffAction(
            action=Action.PAYMENT,
            actor="billing",
            amount=self.state.payments[-1].amount,
            reference=self.state.payments[-1].reference,
        )
        before = self.state.model_copy(deep=True)
        assert isinstance(apply_action(self.state, again, RULES, self.at), Refusal)
        assert self.state == before

    @invariant()
    def payments_add_up(self) -> None:
        commission = self.state.commission
        paid = sum((p.amount for p in self.state.payments), Decimal("0"))
        if commission is None:
            assert not self.state.payments
        else:
            assert commission.customer_paid == paid  # exactly: Decimal, never float
            references = [p.reference for p in self.state.payments]
            assert len(references) == len(set(references))
            if self.state.stage is Stage.WON:
                assert paid < commission.basis_amount
            if self.state.stage is Stage.COMMISSION_PAYABLE:
                assert paid >= commission.basis_amount

    @invariant()
    def one_commission_never_replaced(self) -> None:
        commission = self.state.commission
        if self.commission is None:
            self.commission = commission
            return
        assert commission is not None, "the commission disappeared"
        for name in ("basis_amount", "rate", "amount", "currency"):
            assert getattr(commission, name) == getattr(self.commission, name), name

    @invariant()
    def only_contract_stages(self) -> None:
        assert self.state.stage.value in CONTRACT


TestTransitionMachine = TransitionMachine.TestCase
TestTransitionMachine.settings = STATEFUL


# --- the commission ledger's lines ----------------------------------------------------------

LEDGER_STEPS = st.lists(
    st.one_of(
        st.tuples(
            st.just(Action.PAYMENT), st.decimals(Decimal("0.01"), Decimal("900000"), places=2)
        ),
        st.tuples(
            st.just(Action.REFUND), st.decimals(Decimal("0.01"), Decimal("900000"), places=2)
        ),
        st.tuples(st.just(Action.PAYOUT), st.none()),
    ),
    max_size=12,
)


@MODEL
@given(
    basis=st.decimals(Decimal("0.01"), Decimal("900000"), places=2),
    product=st.sampled_from(["cloudsuite-financials", "hcm-talent"]),
    steps=LEDGER_STEPS,
)
def test_lines_sum_to_the_net_commission_and_never_exceed_the_cap(
    basis: Decimal, product: str, steps: list[tuple[Action, Decimal | None]]
) -> None:
    """Payments, refunds (before and after payout) and payouts in any order: the entitlement
    lines (accrual, clawback, void) always sum to the net commission, which stays within the
    product's cap and never below zero; what was paid out is never more than was earned."""
    terms = RULES.commission_for(product)
    assert terms.cap is not None
    state = state_at(Stage.APPROVED, RULES)
    state.opportunity.product = product
    at = START
    lines: list[CommissionLine] = []
    won = StaffAction(action=Action.WON, actor="sales", amount=basis, currency="EUR")
    for n, (action, amount) in enumerate([(Action.WON, basis), *steps]):
        at += timedelta(days=1)
        request = (
            won
            if action is Action.WON
            else StaffAction(
                action=action, actor="finance", amount=amount, reference=f"REF-{n}", reason="r"
            )
        )
        result = apply_action(state, request, RULES, at)
        if isinstance(result, Refusal):
            continue
        if action is Action.PAYOUT:  # as the workflow does: refunds claw back for a while
            result.clawback_until, result.closed_at = at + timedelta(days=90), None
        lines += commission_lines(state, result, request)
        state = result
        commission = state.commission
        assert commission is not None
        entitled = sum((x.amount for x in lines if x.kind in ENTITLEMENT_KINDS), Decimal(0))
        assert entitled == commission.net
        assert Decimal(0) <= commission.net <= commission.amount <= terms.cap
        paid = sum((x.amount for x in lines if x.kind is LineKind.PAID), Decimal(0))
        accrued = sum((x.amount for x in lines if x.kind is LineKind.ACCRUAL), Decimal(0))
        assert paid <= accrued
        assert all(x.amount < 0 for x in lines if x.kind is LineKind.CLAWBACK)


@pytest.mark.parametrize("action", [Action.WON, Action.PAYMENT])
@pytest.mark.parametrize("amount", ["1e26", "1e30", "-1e30", "123456789012345678901234567890"])
def test_huge_amounts_are_refused_not_raised(action: Action, amount: str) -> None:
    """Found by the state machine: a signal's amount is anything its sender typed; an amount
    no deal can have must be a one-line refusal, never an exception in the workflow."""
    stage = Stage.APPROVED if action is Action.WON else Stage.WON
    request = StaffAction(
        action=action, actor="x", amount=Decimal(amount), currency="EUR", reference="R-1"
    )
    result = apply_action(state_at(stage, RULES), request, RULES, START)
    assert isinstance(result, Refusal) and "amount" in result.reason
