"""Load and check `program.yaml`: a bad file stops start-up with the field it is about."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
import yaml
from pydantic import ValidationError

from core.errors import SettingsError
from core.payees import check_bic, check_iban
from core.settings import loopback
from workflows.models.program import ProgramRules


class ProgramError(SettingsError):
    """program.yaml is missing or invalid; the message names the file and the field."""


def load_program(path: str | Path) -> ProgramRules:
    """The rules in `path` (Settings.program_path: REFERRALS_PROGRAM, else program.yaml)."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ProgramError(f"{file}: cannot read the program rules ({error.strerror})") from error
    except yaml.YAMLError as error:
        raise ProgramError(f"{file}: not valid YAML: {error}") from error
    try:
        rules = ProgramRules.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or '(top level)'}: {e['msg']}"
            for e in error.errors()
        )
        raise ProgramError(f"{file}: {problems}") from error
    try:
        ZoneInfo(rules.calendar.timezone)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ProgramError(
            f"{file}: calendar.timezone: unknown time zone {rules.calendar.timezone!r}"
        ) from error
    if rules.calendar.country not in holidays.list_supported_countries():
        raise ProgramError(
            f"{file}: calendar.country: no holiday calendar for {rules.calendar.country!r}"
        )
    if rules.contact.deadline_business_days < rules.contact.reminder_business_days:
        raise ProgramError(
            f"{file}: contact.deadline_business_days must not be before reminder_business_days"
        )
    ids = [product.id for product in rules.products]
    if len(set(ids)) != len(ids):
        raise ProgramError(f"{file}: products: product ids must be unique")
    for number, endpoint in enumerate(rules.webhooks):
        # Checked here, not in the model: rules already in running referrals' inputs stay valid.
        url = urlsplit(endpoint.url)
        if (
            endpoint.include_personal_data
            and url.scheme != "https"
            and not loopback(url.hostname or "")
        ):
            raise ProgramError(
                f"{file}: webhooks.{number}.url: an endpoint with include_personal_data must "
                "use https (plain http only to this machine)"
            )
    company = rules.payouts.company
    if company is not None:
        for field, check, value in (
            ("iban", check_iban, company.iban),
            ("bic", check_bic, company.bic),
        ):
            try:
                check(value)
            except ValueError as error:
                raise ProgramError(f"{file}: payouts.company.{field}: {error}") from error
    return rules
