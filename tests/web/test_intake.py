"""What a submission must satisfy before a workflow starts, and program.yaml checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.program import ProgramError, load_program
from devstack.factories import submission, submission_data
from devstack.settings import ROOT
from starter.intake import SubmissionRefused, eligibility_errors, parse_submission
from workflows.models.program import ProgramRules
from workflows.models.values import normalize_domain


def fields(error: SubmissionRefused) -> set[str]:
    return {e.field for e in error.errors}


def test_the_example_is_eligible(rules: ProgramRules) -> None:
    assert eligibility_errors(submission(), rules) == []


def test_public_sector_is_refused_naming_the_rule(rules: ProgramRules) -> None:
    [error] = eligibility_errors(submission(**{"prospect.sector": "public"}), rules)
    assert error.field == "prospect.sector"
    assert "public sector excluded" in error.message


@pytest.mark.parametrize(
    ("product", "message"),
    [("ln-on-premises", "not a multi-tenant cloud product"), ("nope", "unknown product")],
)
def test_only_multi_tenant_cloud_products(product: str, message: str, rules: ProgramRules) -> None:
    [error] = eligibility_errors(submission(**{"opportunity.product": product}), rules)
    assert error.field == "opportunity.product" and message in error.message


def test_consent_is_required(rules: ProgramRules) -> None:
    [error] = eligibility_errors(submission(consent=False), rules)
    assert error.field == "consent"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"referrer.email": "not-an-email"}, "referrer.email"),
        ({"referrer.language": "de"}, "referrer.language"),
        ({"referrer.name": "   "}, "referrer.name"),
        ({"prospect.country": "XX"}, "prospect.country"),
        ({"prospect.website": "not a site"}, "prospect.website"),
        ({"prospect.website": "http://10.0.0.1"}, "prospect.website"),
        ({"prospect.sector": "government"}, "prospect.sector"),
        ({"contact.email": "x@"}, "contact.email"),
        ({"opportunity.estimated_annual_value": "-1"}, "opportunity.estimated_annual_value"),
        ({"opportunity.currency": "euros"}, "opportunity.currency"),
        ({"referrer.shoe_size": 42}, "referrer.shoe_size"),
    ],
)
def test_invalid_fields_are_named(changes: dict[str, object], field: str) -> None:
    with pytest.raises(SubmissionRefused) as refused:
        parse_submission(submission_data(**changes))
    assert field in fields(refused.value)


def test_missing_sections_are_named() -> None:
    data = submission_data()
    del data["contact"]
    with pytest.raises(SubmissionRefused) as refused:
        parse_submission(data)
    assert fields(refused.value) == {"contact"}


@pytest.mark.parametrize(
    ("website", "domain"),
    [
        ("https://www.Acme.fr/contact?x=1", "acme.fr"),
        ("acme.fr", "acme.fr"),
        ("HTTP://WWW.ACME.FR:8080", "acme.fr"),
        ("shop.acme.co.uk.", "shop.acme.co.uk"),
    ],
)
def test_prospect_domain_is_normalized(website: str, domain: str) -> None:
    assert normalize_domain(website) == domain


def test_country_is_upper_cased() -> None:
    assert submission(**{"prospect.country": "fr"}).prospect.country == "FR"


def test_shipped_program_has_eligible_and_ineligible_products(rules: ProgramRules) -> None:
    assert any(p.multi_tenant_cloud for p in rules.products)
    assert any(not p.multi_tenant_cloud for p in rules.products)
    assert str(rules.commission.rate) == "0.10"


@pytest.mark.parametrize(
    ("replace", "by", "field"),
    [
        ('rate: "0.10"', 'rate: "1.5"', "commission.rate"),
        ("timezone: Europe/Paris", "timezone: Europe/Nowhere", "calendar.timezone"),
        ("country: FR", "country: ZZ", "calendar.country"),
        ("  desk: ", "  desks: ", "recipients.desks"),
        ("reminder_business_days: 3", "reminder_business_days: 9", "deadline_business_days"),
    ],
)
def test_bad_program_names_the_field(tmp_path: Path, replace: str, by: str, field: str) -> None:
    text = (ROOT / "program.yaml").read_text(encoding="utf-8")
    assert replace in text
    bad = tmp_path / "program.yaml"
    bad.write_text(text.replace(replace, by, 1), encoding="utf-8")
    with pytest.raises(ProgramError) as error:
        load_program(bad)
    assert field in str(error.value) and str(bad) in str(error.value)


def test_missing_program_file(tmp_path: Path) -> None:
    with pytest.raises(ProgramError, match="cannot read"):
        load_program(tmp_path / "absent.yaml")


def test_format_and_rule_errors_come_together(rules: ProgramRules) -> None:
    data = submission_data(
        **{"referrer.email": "claire@", "prospect.sector": "public", "consent": False}
    )
    with pytest.raises(SubmissionRefused) as refused:
        parse_submission(data, rules)
    assert fields(refused.value) == {"referrer.email", "prospect.sector", "consent"}
    codes = {e.field: e.code for e in refused.value.errors}
    assert codes["prospect.sector"] == "public_sector"
    assert codes["consent"] == "consent_required"


def test_rules_checked_when_the_shape_is_fine(rules: ProgramRules) -> None:
    data = submission_data(**{"opportunity.product": "ln-on-premises"})
    with pytest.raises(SubmissionRefused) as refused:
        parse_submission(data, rules)
    assert [e.code for e in refused.value.errors] == ["product_not_eligible"]
    assert parse_submission(submission_data(), rules).prospect.domain
