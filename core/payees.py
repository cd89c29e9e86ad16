"""Who is paid, and where: a referrer's payee profile, checked with maintained libraries
(schwifty for IBAN and BIC, python-stdnum for SIRET and VAT numbers), and the self-billing
mandate it must have accepted before any statement is issued in its name (docs/payouts.md).

A French vendor that bills on its partners' behalf (autofacturation, CGI annex II art. 242
nonies A) needs each partner's prior written agreement: the mandate's text is versioned here,
and what a payee accepted is kept as its version, the SHA-256 of the text they were shown,
when and by whom.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, EmailStr, Field, ValidationError, field_validator, model_validator

from workflows.models.program import PayingCompany
from workflows.models.values import Country, Language, Strict, Text, round_money

MANDATES = Path(__file__).resolve().parent / "templates" / "mandate"
# The mandate's text in force; a new version is a new pair of files, and payees accept again.
MANDATE_VERSION = "2026-12"

# The EU member states (VAT's reverse charge applies between them), by ISO 3166 code.
EU = frozenset(
    "AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK".split()
)


class PayeeKind(StrEnum):
    COMPANY = "company"
    SOLE_TRADER = "sole_trader"  # entrepreneur individuel, micro-entrepreneur
    INDIVIDUAL = "individual"  # a private person: no invoice of theirs, no VAT


class VatRegime(StrEnum):
    """Each regime prints its own legal mention on a self-billed statement."""

    FR_VAT = "fr_vat"  # registered for VAT in France: VAT at `vat_rate` on the commission
    FRANCHISE = "franchise"  # franchise en base: "TVA non applicable, art. 293 B du CGI"
    EU_REVERSE_CHARGE = "eu_reverse_charge"  # another EU state: "Autoliquidation"
    OUTSIDE_EU = "outside_eu"  # outside the EU: VAT not French, no VAT on the statement
    NOT_REGISTERED = "not_registered"  # a private person


class MandateAcceptance(BaseModel):
    """The self-billing mandate a payee accepted: in the portal, or on paper (entered by
    staff, who give the reason)."""

    version: str
    language: Language
    text_sha256: str
    accepted_at: datetime
    accepted_by: str
    channel: Literal["portal", "paper"]
    reason: str | None = None

    @property
    def reference(self) -> str:
        """What a statement cites: the version and the start of the text's hash."""
        return f"MANDAT-{self.version}-{self.text_sha256[:8].upper()}"


def _check(field: str, check: bool, message: str) -> None:
    if not check:
        raise ValueError(f"{field}: {message}")


# schwifty and python-stdnum are imported where they check: loading their registries costs
# every process that only names a payee field (the CLI's parser) a noticeable moment.


def check_iban(value: str) -> str:
    from schwifty import IBAN
    from schwifty.exceptions import SchwiftyException

    try:
        return IBAN(value).compact
    except SchwiftyException as error:
        raise ValueError(f"not a valid IBAN ({error})") from error


def check_bic(value: str) -> str:
    from schwifty import BIC
    from schwifty.exceptions import SchwiftyException

    try:
        return str(BIC(value).compact)
    except SchwiftyException as error:
        raise ValueError(f"not a valid BIC ({error})") from error


def bic_of(iban: str) -> str | None:
    """The BIC of an IBAN's bank, where schwifty's registry knows it."""
    from schwifty import IBAN
    from schwifty.exceptions import SchwiftyException

    try:
        found = IBAN(iban).bic
    except SchwiftyException:
        return None
    return str(found.compact) if found is not None else None


def in_sepa_zone(iban: str) -> bool:
    """Whether a SEPA credit transfer reaches this account (schwifty's list of countries)."""
    from schwifty import IBAN
    from schwifty.exceptions import SchwiftyException

    try:
        return bool(IBAN(iban).in_sepa_zone)
    except SchwiftyException:
        return False


def mask_iban(iban: str) -> str:
    """What statements, emails and screens show of an account: its country and last four."""
    compact = iban.replace(" ", "")
    return f"{compact[:4]} •••• {compact[-4:]}" if len(compact) > 8 else "••••"


class PayeeProfile(Strict):
    """A referrer as a payee, keyed by their address. A wrong value is refused naming its
    field; `problems` turns the error into one message per field for a form or the CLI."""

    email: EmailStr
    legal_name: Text
    kind: PayeeKind
    country: Country
    address: Text
    siret: str | None = None
    vat_id: str | None = None
    vat_regime: VatRegime
    vat_rate: Decimal | None = Field(default=None, gt=0, lt=1)
    iban: str
    bic: str | None = None
    language: Language = "fr"
    # Below this (per currency), an item waits; the program's minimum where not given.
    minimum: dict[str, Decimal] = {}
    mandate: MandateAcceptance | None = None
    iban_changed_at: datetime | None = None
    # Set when the bank rejected a payment to this account: items wait until it changes.
    bank_rejection: str | None = None

    @field_validator("email")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("iban")
    @classmethod
    def _iban(cls, value: str) -> str:
        return check_iban(value)

    @field_validator("bic")
    @classmethod
    def _bic(cls, value: str | None) -> str | None:
        return check_bic(value) if value else None

    @field_validator("siret")
    @classmethod
    def _siret(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        from stdnum import exceptions as stdnum_errors
        from stdnum.fr import siret as fr_siret

        try:
            return str(fr_siret.validate(value))
        except stdnum_errors.ValidationError as error:
            raise ValueError(f"not a valid SIRET ({error})") from error

    @field_validator("vat_id")
    @classmethod
    def _vat_id(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        from stdnum import exceptions as stdnum_errors
        from stdnum.eu import vat

        try:
            return str(vat.validate(value))
        except stdnum_errors.ValidationError as error:
            raise ValueError(f"not a valid EU VAT number ({error})") from error

    @field_validator("minimum")
    @classmethod
    def _minimum(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        checked = {}
        for currency, amount in value.items():
            code = currency.strip().upper()
            if len(code) != 3 or not code.isalpha() or amount < 0:
                raise ValueError(f"{currency} {amount}: a currency code and an amount >= 0")
            checked[code] = round_money(amount, code)
        return checked

    @model_validator(mode="after")
    def _consistent(self) -> PayeeProfile:
        """What the regime and the kind of payee need: each problem names its field."""
        regime, kind, country = self.vat_regime, self.kind, self.country
        if self.bic is None:
            self.bic = bic_of(self.iban)
            _check("bic", self.bic is not None, "needed: the bank of this IBAN is not known")
        business = kind is not PayeeKind.INDIVIDUAL
        _check(
            "siret",
            not (business and country == "FR") or self.siret is not None,
            "needed for a French company or sole trader",
        )
        _check(
            "vat_regime",
            business or regime is VatRegime.NOT_REGISTERED,
            "a private person is not_registered",
        )
        _check(
            "vat_regime",
            regime not in (VatRegime.FR_VAT, VatRegime.FRANCHISE) or country == "FR",
            f"{regime} is for payees established in France",
        )
        _check(
            "vat_regime",
            regime is not VatRegime.EU_REVERSE_CHARGE or (country in EU and country != "FR"),
            "reverse charge is for payees in another EU member state",
        )
        _check(
            "vat_regime",
            regime is not VatRegime.OUTSIDE_EU or country not in EU,
            f"{country} is in the EU",
        )
        needs_vat_id = regime in (VatRegime.FR_VAT, VatRegime.EU_REVERSE_CHARGE)
        _check("vat_id", not needs_vat_id or self.vat_id is not None, f"needed for {regime}")
        if self.vat_id is not None and needs_vat_id:
            prefix = "EL" if country == "GR" else country  # Greece's VAT numbers start EL
            _check("vat_id", self.vat_id.startswith(prefix), f"a {country} VAT number is expected")
        if regime is VatRegime.FR_VAT:
            self.vat_rate = self.vat_rate if self.vat_rate is not None else Decimal("0.20")
        else:
            _check("vat_rate", self.vat_rate is None, f"no VAT rate under {regime}")
        return self

    @property
    def mandate_in_force(self) -> bool:
        return self.mandate is not None and self.mandate.version == MANDATE_VERSION


def problems(error: ValidationError) -> dict[str, str]:
    """One message per field of a refused profile (a cross-field check names its field at
    the start of its message)."""
    found: dict[str, str] = {}
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        if not field and ": " in message:
            field, message = message.split(": ", 1)
        found.setdefault(field or "profile", message)
    return found


def one_line(error: ValidationError) -> str:
    return "; ".join(f"{field}: {message}" for field, message in problems(error).items())


def mandate_text(language: Language, company: PayingCompany, legal_name: str) -> str:
    """The mandate as the payee reads it, naming both parties: what its hash proves."""
    template = (MANDATES / f"{MANDATE_VERSION}.{language}.txt").read_text(encoding="utf-8")
    return template.format(company=company.name, payee=legal_name, version=MANDATE_VERSION)


def mandate_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def mandate_of(profile: PayeeProfile, company: PayingCompany) -> str:
    """The text in force of `profile`'s mandate, in the payee's language."""
    return mandate_text(profile.language, company, profile.legal_name)


def mandate_accepted(
    profile: PayeeProfile,
    company: PayingCompany,
    by: str,
    channel: Literal["portal", "paper"],
    at: datetime,
    reason: str | None = None,
) -> MandateAcceptance:
    """The acceptance of the text in force, by `by` (the payee, or staff for paper)."""
    return MandateAcceptance(
        version=MANDATE_VERSION,
        language=profile.language,
        text_sha256=mandate_hash(mandate_of(profile, company)),
        accepted_at=at,
        accepted_by=by,
        channel=channel,
        reason=reason,
    )
