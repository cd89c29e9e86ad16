"""Starting a referral: validate, check eligibility, claim the prospect, start the workflow.

Shared by `referrals submit` and the intake web app so both refuse the same
things with the same messages.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, update
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from activities.db import ProspectClaim
from activities.ledger import release_claim
from activities.queries import load_referral
from activities.receipts import Registration, refuse_duplicate, register, release
from activities.receipts import configure as configure_receipts
from activities.records import discard_referral, write_referral
from core.errors import Refused
from core.links import referrer_key
from core.settings import Settings
from starter.consent import consent_statement
from starter.contact_window import contact_window
from starter.domains import email_domain, public_sector_suffix, registrable_domain
from workflows.models.program import ProgramRules
from workflows.models.referral import ConsentRecord, ReferralInput, ReferralRecord, Submission
from workflows.models.values import normalize_domain
from workflows.referral import ReferralWorkflow
from workflows.transitions import initial_state

# A claim whose workflow never started (the submitting process died) is taken over after this.
STALE_CLAIM = timedelta(minutes=2)
# Every call to Temporal here has a deadline.
RPC_TIMEOUT = timedelta(seconds=10)
# Answers to a start that say it was not carried out (anything else may have been).
NOT_STARTED = frozenset(
    {
        RPCStatusCode.INVALID_ARGUMENT,
        RPCStatusCode.FAILED_PRECONDITION,
        RPCStatusCode.PERMISSION_DENIED,
        RPCStatusCode.UNAUTHENTICATED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.NOT_FOUND,
    }
)
log = logging.getLogger(__name__)
_ID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    code: str = "invalid"  # lets the web form say it in the visitor's language

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SubmissionRefused(Refused):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


class DuplicateReferral(Refused):
    """The prospect is already referred. The public message never names the other referral
    or its referrer: only until when the prospect is protected, or that it is under review."""

    def __init__(
        self,
        domain: str,
        referral_id: str,
        protected_until: datetime | None,
        receipt: dict[str, Any] | None = None,
    ) -> None:
        standing = (
            f"protected until {protected_until:%Y-%m-%d}" if protected_until else "being reviewed"
        )
        super().__init__(f"prospect {domain} already has an open referral, {standing}")
        self.domain = domain
        self.referral_id = referral_id
        self.protected_until = protected_until
        # The refused referrer's copy of the `refused_duplicate` receipt (activities.receipts).
        self.receipt = receipt


# Fields that may hold several lines; every other text is one line.
MULTILINE_FIELDS = frozenset({"opportunity.notes"})
# Embeddings, overrides and isolates: they make text display in another order than it is
# stored ("Trojan Source"), so a name can read as something else in an email or on the
# dashboard. Mixed-script names need none of them (the implicit marks stay allowed).
DIRECTION_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _texts(data: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(data, str):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _texts(value, f"{path}.{key}" if path else str(key))


def control_character_errors(data: Any) -> list[FieldError]:
    """Line breaks in a name would end up in email headers and one-line records; control
    characters, separators and lone surrogates (which no UTF-8 text can hold) break storage
    and email; direction controls disguise text. Notes may hold line breaks and tabs,
    nothing else of the kind."""
    errors = []
    for path, value in _texts(data):
        name = path or "body"
        multiline = name in MULTILINE_FIELDS
        allowed = "\r\n\t" if multiline else ""
        if any(
            c in DIRECTION_CONTROLS
            or (c not in allowed and unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp"))
            for c in value
        ):
            errors.append(
                FieldError(
                    name,
                    "control characters other than line breaks and tabs are not allowed"
                    if multiline
                    else "line breaks and other control characters are not allowed here",
                    "control_characters_multiline" if multiline else "control_characters",
                )
            )
    return errors


def parse_submission(data: Any, rules: ProgramRules | None = None) -> Submission:
    """The submission, or every reason it is refused at once: shapes, and with `rules` the
    program's rules too, so one round trip tells the referrer everything to fix."""
    hostile = control_character_errors(data)
    named = {e.field for e in hostile}
    try:
        submission = Submission.model_validate(data)
    except ValidationError as error:
        errors = hostile + [
            FieldError(".".join(str(p) for p in e["loc"]) or "body", e["msg"], e["type"])
            for e in error.errors()
            if (".".join(str(p) for p in e["loc"]) or "body") not in named
        ]
        if rules is not None:
            known = {e.field for e in errors}
            errors += [
                e for e in _rule_errors(_raw_rule_fields(data), rules) if e.field not in known
            ]
        raise SubmissionRefused(errors) from error
    if hostile:
        raise SubmissionRefused(hostile)
    if rules is not None:
        errors = eligibility_errors(submission, rules)
        if errors:
            raise SubmissionRefused(errors)
    return submission


def _raw_rule_fields(data: Any) -> tuple[Any, Any, bool]:
    """sector, product and consent as sent, for rule checks on a submission that is not
    well-formed elsewhere."""
    data = data if isinstance(data, dict) else {}
    prospect = data.get("prospect") if isinstance(data.get("prospect"), dict) else {}
    opportunity = data.get("opportunity") if isinstance(data.get("opportunity"), dict) else {}
    try:  # as the model reads it: "TRUE", "y", 1… are consent too
        consent = _BOOLEAN.validate_python(data.get("consent"))
    except ValidationError:
        consent = False
    product = opportunity.get("product")
    return prospect.get("sector"), product.strip() if isinstance(product, str) else product, consent


_BOOLEAN = TypeAdapter(bool)


def eligibility_errors(submission: Submission, rules: ProgramRules) -> list[FieldError]:
    """The program's rules, field by field (the model already checked the shapes)."""
    fields = (submission.prospect.sector, submission.opportunity.product, submission.consent)
    errors = _rule_errors(fields, rules)
    website = submission.prospect.website
    suffix = public_sector_suffix(website, rules.public_sector.domain_suffixes)
    if suffix is not None and not any(e.code == "public_sector" for e in errors):
        errors.append(
            FieldError(
                "prospect.website",
                f"{normalize_domain(website)} is a public-sector domain (under {suffix}): "
                "public-sector opportunities are not eligible (program rule: public sector "
                "excluded)",
                "public_sector_domain",
            )
        )
    if email_domain(str(submission.referrer.email)) == registrable_domain(website):
        errors.append(
            FieldError(
                "prospect.website",
                "you cannot refer your own company: the prospect's domain is your email's "
                "(program rule: no self-referral)",
                "self_referral",
            )
        )
    return errors


def _rule_errors(fields: tuple[Any, Any, bool], rules: ProgramRules) -> list[FieldError]:
    sector, product_id, consent = fields
    errors = []
    if sector == "public":
        errors.append(
            FieldError(
                "prospect.sector",
                "public-sector opportunities are not eligible for referral commissions "
                "(program rule: public sector excluded)",
                "public_sector",
            )
        )
    product = rules.product(product_id) if isinstance(product_id, str) else None
    if isinstance(product_id, str) and product is None:
        known = ", ".join(p.id for p in rules.products if p.multi_tenant_cloud)
        errors.append(
            FieldError(
                "opportunity.product",
                f"unknown product {product_id!r} (eligible: {known})",
                "unknown_product",
            )
        )
    elif product is not None and not product.multi_tenant_cloud:
        errors.append(
            FieldError(
                "opportunity.product",
                f"{product.name} is not a multi-tenant cloud product; only multi-tenant cloud "
                "products are eligible",
                "product_not_eligible",
            )
        )
    if not consent:
        errors.append(
            FieldError(
                "consent",
                "the contact's permission to share their details is required",
                "consent_required",
            )
        )
    return errors


def new_referral_id() -> str:
    return "R-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def _insert_claim(
    engine: Engine, domain: str, registration: Registration, record: ReferralRecord
) -> bool:
    """The claim, the `registered` receipt and the referral's first record, in one
    transaction: a registration that loses the race leaves nothing, and a later refusal always
    finds the winner's receipt and referral."""
    referral_id = record.state.referral_id
    try:
        with Session(engine) as session:
            session.add(ProspectClaim(domain=domain, referral_id=referral_id))
            session.flush()
            register(session, referral_id, registration)
            write_referral(session, record)
            session.commit()
        return True
    except IntegrityError:
        return False


def _current_claim(engine: Engine, domain: str) -> ProspectClaim | None:
    with Session(engine) as session:
        return session.get(ProspectClaim, domain)


def _take_over_claim(
    engine: Engine, domain: str, stale_id: str, registration: Registration, record: ReferralRecord
) -> bool:
    """A stale claim passes to the recorded referral: the stale one's registration is
    released, the new one registered and recorded, in the transaction that moves the claim."""
    referral_id = record.state.referral_id
    with Session(engine) as session:
        taken = session.exec(
            update(ProspectClaim)
            .where(ProspectClaim.domain == domain)  # type: ignore[arg-type]
            .where(ProspectClaim.referral_id == stale_id)  # type: ignore[arg-type]
            .values(referral_id=referral_id, claimed_at=datetime.now(UTC))
        )
        if taken.rowcount != 1:
            session.rollback()
            return False
        release(session, stale_id)
        register(session, referral_id, registration)
        write_referral(session, record)
        session.commit()
        return True


async def _claim_prospect(
    client: Client, engine: Engine, domain: str, registration: Registration, record: ReferralRecord
) -> None:
    """Record the referral as the prospect's open referral, with its `registered` receipt
    and its first record; the primary key decides races. A refusal appends a
    `refused_duplicate` receipt, which the DuplicateReferral carries. Database calls run in
    threads so concurrent submissions really do race."""
    existing = None
    for _ in range(3):
        if await asyncio.to_thread(_insert_claim, engine, domain, registration, record):
            return
        existing = await asyncio.to_thread(_current_claim, engine, domain)
        if existing is None:  # released meanwhile: try again
            continue
        if await _referral_is_open(client, existing.referral_id, existing.claimed_at):
            break
        if await asyncio.to_thread(
            _take_over_claim, engine, domain, existing.referral_id, registration, record
        ):
            return
        existing = None
    if existing is None:
        existing = await asyncio.to_thread(_current_claim, engine, domain)
    earlier = existing.referral_id if existing else "unknown"
    other = await asyncio.to_thread(load_referral, engine, earlier)
    protected = other.protection_end if other is not None else None
    receipt = await asyncio.to_thread(refuse_duplicate, engine, registration, earlier, protected)
    raise DuplicateReferral(domain, earlier, protected, receipt)


async def _referral_is_open(client: Client, referral_id: str, claimed_at: datetime) -> bool:
    try:
        description = await client.get_workflow_handle(referral_id).describe(
            rpc_timeout=RPC_TIMEOUT
        )
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        if claimed_at.tzinfo is None:
            claimed_at = claimed_at.replace(tzinfo=UTC)
        return datetime.now(UTC) - claimed_at < STALE_CLAIM
    return description.status == WorkflowExecutionStatus.RUNNING


async def submit_referral(
    client: Client,
    engine: Engine,
    rules: ProgramRules,
    submission: Submission,
    settings: Settings,
    *,
    submitted_by: str = "referrer",
    received_at: datetime | None = None,
    consent_language: str | None = None,
) -> str:
    """Start the referral's workflow on the settings' task queue and return its id, or raise
    why it is refused. `consent_language`: the language of the consent statement accepted
    (default: the referrer's)."""
    errors = eligibility_errors(submission, rules)
    if errors:
        raise SubmissionRefused(errors)
    domain = registrable_domain(submission.prospect.website)
    referral_id = new_referral_id()
    received_at = received_at or datetime.now(UTC)
    window = contact_window(received_at, rules.calendar, rules.contact)
    if settings.encryption_keys is not None:  # else the process configured receipts already
        configure_receipts(settings.key_ring())
    registration = Registration.new(
        rules.name,
        rules.model_dump(mode="json"),
        window.deadline,
        domain,
        str(submission.referrer.email),
    )
    product = rules.product(submission.opportunity.product)
    assert product is not None
    statement, _ = consent_statement(consent_language or submission.referrer.language)
    given = ReferralInput(
        referral_id=referral_id,
        submission=submission,
        rules=rules,
        contact_window=window,
        submitted_by=submitted_by,
        referrer_key=referrer_key(str(submission.referrer.email), settings.referrer_key_secret),
        consent=ConsentRecord(statement=statement, accepted_at=received_at),
        prospect_domain=domain,
    )
    # Recorded with the claim, before the workflow starts, so the confirmation page,
    # `referrals show` and the status link find the referral at once; the workflow's own first
    # write is the same row.
    first = initial_state(given)
    record = ReferralRecord(state=first.model_copy(update={"history": []}), events=first.history)
    await _claim_prospect(client, engine, domain, registration, record)
    try:
        await client.start_workflow(
            ReferralWorkflow.run,
            given,
            id=referral_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            rpc_timeout=RPC_TIMEOUT,
            # Readable by anyone who reads the namespace: the prospect company and product
            # only, never a person's name or address.
            static_summary=f"{submission.prospect.company} ({domain}) · {product.name}",
        )
    except Exception as error:
        started = await _started(client, referral_id, error)
        if started:
            log.warning("%s: its start answered %r, yet it runs", referral_id, error)
            return referral_id
        if started is False:  # nothing reached Temporal: forget it, free the prospect
            await asyncio.to_thread(discard_referral, engine, referral_id)
            await asyncio.to_thread(release_claim, engine, domain, referral_id)
        raise  # unknown: `referrals reconcile` settles it once Temporal answers
    return referral_id


async def _started(client: Client, referral_id: str, error: Exception) -> bool | None:
    """Whether a start that failed with `error` reached Temporal all the same: False when the
    error says it did not or Temporal does not know the workflow, True when it does, None
    when Temporal cannot be asked."""
    if isinstance(error, RPCError) and error.status in NOT_STARTED:
        return False
    if isinstance(error, RuntimeError) and "connect" in str(error).lower():
        return False  # no connection, no request
    try:
        await client.get_workflow_handle(referral_id).describe(rpc_timeout=RPC_TIMEOUT)
    except RPCError as asked:
        return False if asked.status == RPCStatusCode.NOT_FOUND else None
    except Exception:  # noqa: BLE001 - Temporal cannot say
        return None
    return True
