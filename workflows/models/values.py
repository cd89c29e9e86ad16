"""The vocabulary every model uses: text, countries, currencies and money rounding, domains,
languages, and the staff actions."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from importlib import resources
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StringConstraints,
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
