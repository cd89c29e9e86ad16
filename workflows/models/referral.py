"""A referral: what is submitted, its stages, the staff actions that move it, the state its
workflow holds and answers with, and what its activities are given."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Literal

from pydantic import (
    BaseModel,
    EmailStr,
    Field,
    field_validator,
)

from workflows.models.ledger import Commission, Payment, Refund
from workflows.models.program import ProgramRules
from workflows.models.values import (
    Action,
    Country,
    Currency,
    Language,
    LongText,
    Strict,
    Text,
    normalize_domain,
)


class Referrer(Strict):
    name: Text
    email: EmailStr
    company: Text
    phone: Text | None = None
    language: Language = "fr"


class Prospect(Strict):
    company: Text
    website: Text
    country: Country
    industry: Text | None = None
    sector: Literal["private", "public"]

    @field_validator("website")
    @classmethod
    def _website_has_domain(cls, value: str) -> str:
        normalize_domain(value)
        return value

    @property
    def domain(self) -> str:
        return normalize_domain(self.website)


class Contact(Strict):
    name: Text
    email: EmailStr
    title: Text | None = None
    phone: Text | None = None


class Opportunity(Strict):
    product: Text
    estimated_annual_value: Decimal | None = Field(default=None, ge=0, max_digits=14)
    currency: Currency | None = None
    notes: LongText | None = None


class Submission(Strict):
    """What a referrer sends: the JSON of `referrals submit` and `POST /api/referrals`."""

    referrer: Referrer
    prospect: Prospect
    contact: Contact
    opportunity: Opportunity
    consent: bool


class Stage(StrEnum):
    SUBMITTED = "submitted"
    CONTACTED = "contacted"
    QUALIFYING = "qualifying"
    APPROVED = "approved"
    WON = "won"
    COMMISSION_PAYABLE = "commission_payable"
    COMMISSION_PAID = "commission_paid"
    DECLINED = "declined"
    REJECTED = "rejected"
    LOST = "lost"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL_STAGES = frozenset(
    {
        Stage.COMMISSION_PAID,
        Stage.DECLINED,
        Stage.REJECTED,
        Stage.LOST,
        Stage.CANCELLED,
        Stage.EXPIRED,
    }
)


# The stages in which a referral's protection runs (`protected_until`, from `accept`).
PROTECTING_STAGES = (Stage.QUALIFYING, Stage.APPROVED)


# The desk's notes that the sales handoff email quotes (core/templates/email/staff_sales_handoff).
DESK_NOTE_ACTIONS = (Action.CONTACTED, Action.ACCEPT)


class StaffAction(BaseModel):
    """One staff decision, as sent by the CLI (update) or by any signal sender."""

    action: Action
    actor: str = "unknown"
    note: str | None = None
    reason: str | None = None
    amount: Decimal | None = None
    currency: str | None = None
    payment_terms_days: int | None = None
    reference: str | None = None
    # `extend`: how many days the protection gains.
    days: int | None = None
    # Makes a retried delivery harmless: a request id already applied is not applied again.
    # The CLI sends one with every action (it is also the update's id).
    request_id: str | None = None
    # Who sent it, proven: signed by the surface that authenticated the actor
    # (core/actor_assertions.py). Money actions are refused without a valid one.
    assertion: str | None = None


class ContactWindow(BaseModel):
    """The contact SLA instants, computed once at submission, with what they were computed from."""

    received_at: datetime
    reminder_at: datetime
    deadline: datetime
    country: str
    timezone: str
    holidays_version: str


class ConsentRecord(BaseModel):
    """Which consent statement the referrer accepted (its language and a version that
    changes with its text), and when."""

    statement: str
    accepted_at: datetime


class Erasure(BaseModel):
    """Who erased a referral's personal data, when and why."""

    at: datetime
    by: str
    reason: str


class HistoryEntry(BaseModel):
    at: datetime
    action: str
    actor: str
    note: str | None = None
    outcome: Literal["applied", "refused", "system"] = "applied"
    # Position in the referral's event log, stable when old refused entries are dropped
    # (None in referrals recorded before the system of record).
    seq: int | None = None
    request_id: str | None = None
    # A staff action's proof of who acted: the surface that signed its actor (`web`,
    # `toolbox`…) or "unauthenticated"; None before release 0.8 and for the workflow's own.
    surface: str | None = None


class ReferralState(BaseModel):
    """The whole referral, as `referrals show --json` prints it."""

    referral_id: str
    stage: Stage
    referrer: Referrer
    prospect: Prospect
    prospect_domain: str
    contact: Contact
    opportunity: Opportunity
    product_name: str
    submitted_at: datetime
    contact_reminder_at: datetime
    contact_deadline: datetime
    contact_calendar: ContactWindow
    contact_reminder_sent: bool = False
    contact_sla_breached: bool = False
    payment_terms_days: int | None = None
    payment_due_at: datetime | None = None
    payment_reminders_sent: int = 0
    payments: list[Payment] = []
    commission: Commission | None = None
    history: list[HistoryEntry] = []
    # Bumped by every change; the system of record keeps the highest revision it was sent.
    revision: int = 0
    closed_at: datetime | None = None
    consent: ConsentRecord | None = None
    erased: Erasure | None = None
    # From `accept`: the prospect is this referral's until then (program rule `protection`).
    protected_until: datetime | None = None
    protection_extensions: int = 0
    protection_warning_sent: bool = False
    refunds: list[Refund] = []
    # After payout, refunds are clawed back until then; the referral closes at that time.
    clawback_until: datetime | None = None
    clawback_closed: bool = False

    @property
    def is_terminal(self) -> bool:
        if self.stage is Stage.COMMISSION_PAID and self.in_clawback_window:
            return False
        return self.stage in TERMINAL_STAGES

    @property
    def protection_end(self) -> datetime | None:
        """The end of a protection that still runs: won, lost or closed, the prospect is no
        longer waiting on it (the date stays in `protected_until` for the record)."""
        return self.protected_until if self.stage in PROTECTING_STAGES else None

    @property
    def in_clawback_window(self) -> bool:
        return self.clawback_until is not None and not self.clawback_closed

    def next_seq(self) -> int:
        """The event log position for a new history entry."""
        numbered = [entry.seq for entry in self.history if entry.seq is not None]
        return max(numbered) + 1 if numbered else len(self.history)

    def email_snapshot(self) -> ReferralState:
        """The referral as an email about it sees it, and no more: a payload copied into the
        history for every email. Templates read the last history entry (who did what, with
        which note) and the desk's notes on contact and acceptance; never the consent text."""
        kept = [
            entry for entry in self.history[:-1] if entry.note and entry.action in DESK_NOTE_ACTIONS
        ]
        return self.model_copy(
            update={"history": kept + self.history[-1:], "consent": None}, deep=True
        )


class ReferralInput(BaseModel):
    referral_id: str
    submission: Submission
    rules: ProgramRules
    contact_window: ContactWindow
    submitted_by: str = "referrer"
    # Release 0.2 and older put the status link here; it is now built when an email is
    # rendered, never carried in a payload. Kept so their inputs still decode.
    status_url: str | None = None
    # A keyed hash of the referrer's address: what Temporal may index instead of the address.
    referrer_key: str | None = None
    consent: ConsentRecord | None = None
    # The prospect's registrable domain (Public Suffix List), found at submission.
    prospect_domain: str | None = None
    # False only where the server has no custom search attributes (the time-skipping test server).
    index_search_attributes: bool = True
    # A referral carried over to a new run (continue-as-new) resumes from this state.
    resume: ReferralState | None = None
    # Set when a run continued as new because its history had grown long, at a quiet point:
    # the system of record holds every event up to this seq, except the refused entries
    # below, which the new run writes. None: the new run writes the whole referral (`upgrade`).
    recorded_seq: int | None = None
    unwritten_refusals: list[HistoryEntry] = []


class ActResult(BaseModel):
    """What the `act` update answers: where the referral stands once the action is recorded.
    The whole referral is `referrals show` (the system of record) or the `state` query.
    Referrals started before `slim-payloads` answer with the whole state, which decodes as
    this too (its other fields are ignored)."""

    referral_id: str
    stage: Stage
    revision: int


class Refusal(BaseModel):
    reason: str


class EmailRequest(BaseModel):
    """One email to render and send; `key` makes the send idempotent across retries."""

    key: str
    to: list[str]
    sender: str
    language: Language
    template: str
    referral: ReferralState
    extra: dict[str, str] = {}


class ProspectRelease(BaseModel):
    domain: str
    referral_id: str


class ReferralRecord(BaseModel):
    """The system of record after a change: the referral's facts (its history left out) and
    the history entries not yet written. Written in order; a repeated write changes nothing."""

    state: ReferralState
    events: list[HistoryEntry]


class ReconcileReport(BaseModel):
    """What `referrals reconcile` found and repaired, one line per repair."""

    checked: int = 0
    fixed: list[str] = []
    # Set when the nightly activity resumed where an earlier attempt stopped: where, and how
    # many repairs that attempt made (listed in its log, not in `fixed`).
    resumed: str = ""


class RetentionReport(BaseModel):
    """What the retention run erased, one line per referral."""

    retention_days: int
    erased: list[str] = []
