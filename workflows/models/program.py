"""The program's rules (program.yaml): products, commission, calendars, protection,
clawback, emails, retention, staff roles, payouts and webhooks. A referral keeps the rules it
started under."""

from __future__ import annotations

import base64
import binascii
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    EmailStr,
    Field,
    StringConstraints,
    model_validator,
)

from workflows.models.values import MONEY_ACTIONS, Action, Country, Currency, Language, Strict, Text


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


# Every distinct snapshot of the rules a worker holds, by its JSON.
_SHARED_RULES: dict[str, ProgramRules] = {}


def shared_rules(rules: ProgramRules) -> ProgramRules:
    """The one instance of these rules in this process. Every referral started under a
    program decodes its own copy of the rules (about 23 KiB); a worker caching thousands of
    open referrals keeps one instead. Workflows only read their rules, never change them."""
    return _SHARED_RULES.setdefault(rules.model_dump_json(), rules)
