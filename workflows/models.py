"""Pydantic models shared by the workflow, the activities and the entry points.

Everything that crosses a boundary (workflow input, query result, update
argument, activity argument, JSON on the CLI) is one of these models, so the
shape is checked in one place.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from importlib import resources
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)


def _load_country_codes() -> frozenset[str]:
    """The ISO 3166 alpha-2 codes of the tz database's own table; their names, in each
    language, are Babel's (activities/i18n.py)."""
    table = resources.files("tzdata").joinpath("zoneinfo", "iso3166.tab").read_text()
    return frozenset(
        line.split("\t", 1)[0] for line in table.splitlines() if line and not line.startswith("#")
    )


COUNTRY_CODES = _load_country_codes()

# Currencies whose minor unit is not the cent (ISO 4217); every other one has two decimals.
_MINOR_UNIT_DIGITS = {
    "JPY": 0,
    "KRW": 0,
    "CLP": 0,
    "ISK": 0,
    "VND": 0,
    "BHD": 3,
    "KWD": 3,
    "TND": 3,
}


def minor_unit_digits(currency: str) -> int:
    return _MINOR_UNIT_DIGITS.get(currency.upper(), 2)


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Round half-up to the currency's minor unit: money never goes through float."""
    digits = minor_unit_digits(currency)
    return amount.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)


def normalize_domain(website: str) -> str:
    """The prospect's identity for duplicate detection: `https://www.Acme.fr/x` -> `acme.fr`."""
    text = website.strip()
    if "://" not in text:
        text = "//" + text
    try:
        host = urlsplit(text).hostname or ""
    except ValueError as error:
        raise ValueError(f"not a website address: {website!r}") from error
    host = host.strip(".").lower()
    if host.startswith("www."):
        host = host[4:]
    labels = host.split(".")
    label_ok = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
    if len(labels) < 2 or not all(label_ok.match(label) for label in labels):
        raise ValueError(f"not a website address: {website!r}")
    if labels[-1].isdigit():
        raise ValueError(f"a website name is expected, not an IP address: {website!r}")
    return host


def _check_country(code: str) -> str:
    code = code.strip().upper()
    if code not in COUNTRY_CODES:
        raise ValueError(f"{code!r} is not an ISO 3166 alpha-2 country code")
    return code


def _check_currency(code: str) -> str:
    code = code.strip().upper()
    if not re.fullmatch(r"[A-Z]{3}", code):
        raise ValueError(f"{code!r} is not an ISO 4217 currency code")
    return code


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
LongText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=4000)]
Country = Annotated[str, AfterValidator(_check_country)]
Currency = Annotated[str, AfterValidator(_check_currency)]
Language = Literal["fr", "en"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- Submission ---------------------------------------------------------------------------


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


# --- Program rules (program.yaml) ---------------------------------------------------------


class Product(Strict):
    id: Text
    name: Text
    multi_tenant_cloud: bool
    # The product's own commission terms, overriding the program's when set.
    rate: Decimal | None = Field(default=None, gt=0, le=1)
    cap: Decimal | None = Field(default=None, gt=0)


class CommissionRules(Strict):
    rate: Decimal = Field(default=Decimal("0.10"), gt=0, le=1)
    cap: Decimal | None = Field(default=None, gt=0)
    currency: Currency = "EUR"


class CalendarRules(Strict):
    country: Country = "FR"
    timezone: Text = "Europe/Paris"


class ContactRules(Strict):
    reminder_business_days: int = Field(default=3, ge=1, le=60)
    deadline_business_days: int = Field(default=5, ge=1, le=60)


class PaymentRules(Strict):
    default_terms_days: int = Field(default=30, ge=0, le=365)
    reminder_interval_days: int = Field(default=30, ge=1, le=365)


class ProtectionRules(Strict):
    # From `accept`, the prospect is the referral's this long; then it expires.
    days: int = Field(default=180, ge=1, le=3650)
    # The referrer and sales are warned this long before the end.
    warning_days: int = Field(default=14, ge=0, le=365)
    max_extensions: int = Field(default=2, ge=0, le=20)


class ClawbackRules(Strict):
    # After payout, a customer refund claws the commission back for this long.
    days: int = Field(default=90, ge=0, le=3650)


class PublicSectorRules(Strict):
    # A website under one of these is public sector, whatever the form says.
    domain_suffixes: list[Text] = ["gouv.fr", "gov", "gov.uk", "europa.eu"]


class EmailRules(Strict):
    # A transient SMTP failure (no connection, 4xx) is retried this long, then counts as
    # permanent: the failure is recorded and the desk told, and later emails still go.
    retry_for_hours: int = Field(default=72, ge=1, le=24 * 30)


class RetentionRules(Strict):
    # A closed referral's personal data is erased this long after it closed.
    personal_data_days: int = Field(default=1095, ge=0, le=36500)


class Recipients(Strict):
    desk: EmailStr
    desk_manager: EmailStr
    sales: EmailStr
    finance: EmailStr


class Role(StrEnum):
    """What a member of staff may do (core/roles.py holds the table, docs/operations.md)."""

    SALES = "sales"
    FINANCE = "finance"
    MANAGER = "manager"


class StaffRoles(Strict):
    # One list per `Role`, named as its value; an address may be in several.
    sales: list[EmailStr] = []
    finance: list[EmailStr] = []
    manager: list[EmailStr] = []


class StaffRules(Strict):
    # The staff and their roles (core/roles.py). `emails`, the older form, lists managers.
    emails: list[EmailStr] = []
    roles: StaffRoles = StaffRoles()


class PayingCompany(Strict):
    """Who pays the commissions: the issuer's side of every bank file and statement. Its
    IBAN and BIC are checked when program.yaml is loaded (core/program.py)."""

    name: Text
    address: Text  # street, postcode and town, as the statements print it
    country: Country = "FR"
    iban: Text
    bic: Text
    siret: Text | None = None
    vat_id: Text | None = None


class PayoutRules(Strict):
    """How referrers are paid (docs/payouts.md): in runs, after a holding period, above a
    minimum, once approved."""

    # `monthly`: a run per currency is prepared on the first business day of each month (the
    # Schedule `referrals-monthly-payouts`); `manual`: finance runs `referrals payouts prepare`.
    schedule: Literal["monthly", "manual"] = "monthly"
    # A commission joins a run this many days after it became payable (refunds come early).
    holding_days: int = Field(default=30, ge=0, le=365)
    # Per currency: below this, an item waits for the next run (a payee may have their own).
    minimum: dict[Currency, Annotated[Decimal, Field(ge=0)]] = {"EUR": Decimal("50.00")}
    # An item held below the minimum this long is paid anyway; None: never.
    pay_below_minimum_after_days: int | None = Field(default=180, ge=1, le=3650)
    # Distinct members of staff who approve a run before it is exported.
    approvals_required: Literal[1, 2] = 2
    # After a change of bank details, a payee's items wait this long (a hijacked account).
    iban_change_cooldown_days: int = Field(default=7, ge=0, le=90)
    # Self-billed statements and credit notes: numbered per series and year, without gaps.
    statement_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Z]{1,6}$")] = "AF"
    credit_note_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Z]{1,6}$")] = "AV"
    sepa_schema: Literal["pain.001.001.03", "pain.001.001.09"] = "pain.001.001.09"
    # Needed to export a run (its bank file and statements); not to prepare or approve one.
    company: PayingCompany | None = None

    @model_validator(mode="after")
    def _distinct_series(self) -> PayoutRules:
        if self.statement_prefix == self.credit_note_prefix:
            raise ValueError("statement_prefix and credit_note_prefix must differ")
        return self

    def minimum_for(self, currency: str) -> Decimal:
        return self.minimum.get(currency.upper(), Decimal(0))


# What a webhook endpoint may subscribe to (docs/webhooks.md).
WebhookEvent = Literal[
    "referral.submitted",
    "referral.contacted",
    "referral.accepted",
    "referral.declined",
    "referral.approved",
    "referral.rejected",
    "referral.won",
    "referral.lost",
    "referral.cancelled",
    "referral.expired",
    "referral.protection_extended",
    "commission.payable",
    "commission.paid",
    "commission.clawback",
    "referral.erased",
    "payout.confirmed",
]


def _check_webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) address")
    return url


def _check_webhook_secret(secret: str) -> str:
    """Standard Webhooks secrets: `whsec_` and 24 to 64 random bytes in base64."""
    key = secret.removeprefix("whsec_")
    try:
        size = len(base64.b64decode(key, validate=True)) if key != secret else 0
    except binascii.Error:
        size = 0
    if not 24 <= size <= 64:
        raise ValueError(
            "a webhook secret is 'whsec_' followed by 24 to 64 random bytes in base64, e.g. "
            "python -c \"import base64,os; print('whsec_' + base64.b64encode(os.urandom(32))"
            '.decode())"'
        )
    return secret


class WebhookEndpoint(Strict):
    """A partner tool or CRM told of referral events (docs/webhooks.md)."""

    url: Annotated[Text, AfterValidator(_check_webhook_url)]
    secret: Annotated[Text, AfterValidator(_check_webhook_secret)] | None = None
    # Or the environment variable that holds it (or, with `_FILE`, the file that does): the
    # secret then stays out of program.yaml, in the deployment's secrets.
    secret_env: Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None = None
    events: list[WebhookEvent] = Field(min_length=1)
    include_personal_data: bool = False

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookEndpoint:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError("give the endpoint's secret, or secret_env naming where it is")
        return self


def _distinct_urls(endpoints: list[WebhookEndpoint]) -> list[WebhookEndpoint]:
    """An endpoint is known by its url: each message is sent once to each url."""
    urls = [endpoint.url for endpoint in endpoints]
    if len(set(urls)) != len(urls):
        raise ValueError("each webhook url may appear only once")
    return endpoints


class Action(StrEnum):
    CONTACTED = "contacted"
    ACCEPT = "accept"
    DECLINE = "decline"
    APPROVE = "approve"
    REJECT = "reject"
    WON = "won"
    LOST = "lost"
    PAYMENT = "payment"
    PAYOUT = "payout"
    CANCEL = "cancel"
    EXTEND = "extend"
    REFUND = "refund"


# The actions that move money: never on a name alone, always from an actor signed by the surface
# that authenticated them (core/actor_assertions.py).
MONEY_ACTIONS = frozenset({Action.WON, Action.PAYMENT, Action.PAYOUT, Action.REFUND})


def _money_needs_a_signed_actor(actions: list[Action]) -> list[Action]:
    money = sorted(action.value for action in set(actions) & MONEY_ACTIONS)
    if money:
        raise ValueError(
            f"{', '.join(money)} move money: they always need a signed actor, so they cannot be "
            "unauthenticated"
        )
    return actions


class ProgramRules(Strict):
    """The program's rules; a snapshot of them travels in every referral's workflow input."""

    name: Text = "Referral program"
    sender: EmailStr = "referrals@example.com"
    staff_language: Language = "en"
    products: list[Product] = Field(min_length=1)
    commission: CommissionRules = CommissionRules()
    calendar: CalendarRules = CalendarRules()
    contact: ContactRules = ContactRules()
    payment: PaymentRules = PaymentRules()
    email: EmailRules = EmailRules()
    retention: RetentionRules = RetentionRules()
    public_sector: PublicSectorRules = PublicSectorRules()
    protection: ProtectionRules = ProtectionRules()
    clawback: ClawbackRules = ClawbackRules()
    recipients: Recipients
    # What a staff action may do without an actor assertion (an `action` signal from the
    # Temporal UI or an integration, a CLI with no signing key): it is recorded as
    # unauthenticated. Money actions are never allowed so (docs/operations.md, "Who acted").
    unauthenticated_actions: Annotated[
        list[Action], AfterValidator(_money_needs_a_signed_actor)
    ] = Field(default_factory=lambda: [a for a in Action if a not in MONEY_ACTIONS])
    # Operational settings, read from program.yaml when used: never part of the snapshot a
    # referral carries (a webhook secret has no place in workflow history).
    staff: StaffRules = Field(default=StaffRules(), exclude=True)
    webhooks: Annotated[list[WebhookEndpoint], AfterValidator(_distinct_urls)] = Field(
        default=[], exclude=True
    )
    payouts: PayoutRules = Field(default=PayoutRules(), exclude=True)

    def product(self, product_id: str) -> Product | None:
        return next((p for p in self.products if p.id == product_id), None)

    def commission_for(self, product_id: str) -> CommissionRules:
        """The program's commission terms, with the product's own rate and cap if it has any."""
        product = self.product(product_id)
        if product is None or (product.rate is None and product.cap is None):
            return self.commission
        return self.commission.model_copy(
            update={
                "rate": product.rate if product.rate is not None else self.commission.rate,
                "cap": product.cap if product.cap is not None else self.commission.cap,
            }
        )


# --- Referral state -------------------------------------------------------------------------


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


class CommissionStatus(StrEnum):
    PENDING = "pending"
    PAYABLE = "payable"
    PAID = "paid"
    VOID = "void"


class Commission(BaseModel):
    basis_amount: Decimal
    rate: Decimal
    amount: Decimal
    currency: str
    customer_paid: Decimal = Decimal("0")
    status: CommissionStatus = CommissionStatus.PENDING
    payout_reference: str | None = None
    customer_refunded: Decimal = Decimal("0")
    # Commission taken back by refunds, before or after payout.
    clawed_back: Decimal = Decimal("0")
    paid_amount: Decimal | None = None

    @property
    def net(self) -> Decimal:
        """What the referrer is owed in all, refunds deducted."""
        return self.amount - self.clawed_back


class Payment(BaseModel):
    at: datetime
    amount: Decimal
    reference: str


class Refund(BaseModel):
    """A customer refund or credit note, and the commission it takes back."""

    at: datetime
    amount: Decimal
    reference: str
    reason: str
    clawback: Decimal


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


# --- Activity inputs ----------------------------------------------------------------------


class EmailRequest(BaseModel):
    """One email to render and send; `key` makes the send idempotent across retries."""

    key: str
    to: list[str]
    sender: str
    language: Language
    template: str
    referral: ReferralState
    extra: dict[str, str] = {}


class LineKind(StrEnum):
    ACCRUAL = "accrual"  # on `won`: the commission is earned, pending the customer's payment
    PAYABLE = "payable"  # the customer has paid in full: this much is to be paid out
    PAID = "paid"  # paid out (with the payout reference)
    CLAWBACK = "clawback"  # negative: a customer refund takes its share back
    VOID = "void"  # negative: the referral was cancelled before payout
    # Negative: a clawback owed after payout, deducted from a later payout (on the referral
    # that owed it, the statement's number as reference). Counted with what was paid.
    RECOVERED = "recovered"


# The kinds that change what the referrer is owed; payable and paid lines move money.
ENTITLEMENT_KINDS = frozenset({LineKind.ACCRUAL, LineKind.CLAWBACK, LineKind.VOID})


class CommissionLine(BaseModel):
    """One append-only line of the commission ledger; a written line is never edited."""

    kind: LineKind
    amount: Decimal
    currency: str
    at: datetime
    reference: str | None = None
    reason: str | None = None


class CommissionRecord(BaseModel):
    """The commission ledger row as it must be after `event_key` (an idempotent upsert)."""

    referral_id: str
    referrer_email: str
    referrer_name: str
    basis_amount: Decimal
    rate: Decimal
    amount: Decimal
    currency: str
    customer_paid: Decimal
    status: CommissionStatus
    event_key: str
    event: str
    at: datetime
    actor: str
    note: str | None = None
    # The ledger lines this event adds (unique per event_key and kind).
    lines: list[CommissionLine] = []

    @classmethod
    def after(
        cls,
        state: ReferralState,
        *,
        event: str,
        event_key: str,
        at: datetime,
        actor: str,
        note: str | None,
    ) -> CommissionRecord:
        """The ledger row of `state`'s commission, once `event` is applied."""
        commission = state.commission
        assert commission is not None
        return cls(
            referral_id=state.referral_id,
            referrer_email=str(state.referrer.email),
            referrer_name=state.referrer.name,
            basis_amount=commission.basis_amount,
            rate=commission.rate,
            amount=commission.amount,
            currency=commission.currency,
            customer_paid=commission.customer_paid,
            status=commission.status,
            event_key=event_key,
            event=event,
            at=at,
            actor=actor,
            note=note,
        )


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
