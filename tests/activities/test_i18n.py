"""Every text in every language: the catalogs hold, translated, each message the sources use,
the compiled catalogs are those of the .po files, and Babel writes dates, money and country
names as each language does.

Pure: reads the sources and locale/, no Temporal, no database.
"""

from __future__ import annotations

import io
from datetime import date
from decimal import Decimal

import jinja2
import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import get_currency_precision
from babel.support import Translations

from activities import i18n
from activities.i18n import (
    LANGUAGES,
    LOCALE_DIR,
    countries,
    format_date,
    format_money,
    format_percent,
    territory_name,
    translations,
)
from workflows.models.values import COUNTRY_CODES, minor_unit_digits

ROOT = LOCALE_DIR.parent.parent  # the repository: mapping files name sources from it
SOURCE_LANGUAGE = "en"  # the msgids are English: an empty English msgstr means "as written"
DOMAINS = sorted(path.stem for path in LOCALE_DIR.glob("*.cfg"))

MessageId = str | tuple[str, ...]


def extracted(domain: str) -> set[MessageId]:
    """What `make messages` extracts for `domain`, as its mapping file locale/<domain>.cfg
    says (the same extraction, through Babel's API)."""
    with (LOCALE_DIR / f"{domain}.cfg").open() as mapping:
        method_map, options_map = parse_mapping_cfg(mapping)
    return {
        message if isinstance(message, str) else tuple(message)
        for _, _, message, *_ in extract_from_dir(ROOT, method_map, options_map)
        if message
    }


def catalog(lang: str, domain: str) -> Catalog:
    with (LOCALE_DIR / lang / "LC_MESSAGES" / f"{domain}.po").open("rb") as file:
        return read_po(file, locale=lang, domain=domain)


CASES = [(lang, domain) for lang in LANGUAGES for domain in DOMAINS]


def test_the_core_domains_and_languages_are_there() -> None:
    assert {"messages", "emails"} <= set(DOMAINS)
    assert {"fr", "en"} <= set(LANGUAGES)
    on_disk = {path.name for path in LOCALE_DIR.iterdir() if path.is_dir()}
    assert on_disk == set(LANGUAGES), "a language is its code in LANGUAGES and its catalogs"


@pytest.mark.parametrize(("lang", "domain"), CASES)
def test_every_message_is_in_the_catalog_translated(lang: str, domain: str) -> None:
    po = catalog(lang, domain)
    wanted = extracted(domain)
    assert wanted, f"nothing extracted for {domain}: is locale/{domain}.cfg right?"
    held = {message.id for message in po if message.id}
    assert not wanted - held, f"not in {lang}/{domain}.po: run `make messages`"
    assert not held - wanted, f"no longer used, in {lang}/{domain}.po: run `make messages`"
    for message in po:
        if not message.id:
            continue
        assert not message.fuzzy, f"fuzzy in {lang}/{domain}.po: {message.id!r}"
        forms = message.string if isinstance(message.string, tuple) else (message.string,)
        if lang != SOURCE_LANGUAGE:
            assert all(forms), f"untranslated in {lang}/{domain}.po: {message.id!r}"


@pytest.mark.parametrize(("lang", "domain"), CASES)
def test_translations_keep_placeholders_and_plural_forms(lang: str, domain: str) -> None:
    po = catalog(lang, domain)
    assert "Plural-Forms" in dict(po.mime_headers)
    for message in po:
        if message.pluralizable and lang != SOURCE_LANGUAGE:
            assert isinstance(message.string, tuple | list), message.id
            assert len(message.string) == po.num_plurals, message.id
    problems = [(message.id, errors) for message, errors in po.check() if errors]
    assert not problems  # e.g. a %(name)s missing or renamed in a translation


@pytest.mark.parametrize(("lang", "domain"), CASES)
def test_compiled_catalogs_are_those_of_the_po_files(lang: str, domain: str) -> None:
    mo = LOCALE_DIR / lang / "LC_MESSAGES" / f"{domain}.mo"
    assert mo.is_file(), f"{mo} missing: run `make catalogs`"
    compiled = io.BytesIO()
    write_mo(compiled, catalog(lang, domain))
    compiled.seek(0)
    with mo.open("rb") as file:
        on_disk = Translations(file)
    assert on_disk._catalog == Translations(compiled)._catalog, f"{mo} stale: `make catalogs`"


def test_every_domain_is_merged_into_one_catalog_per_language() -> None:
    french = translations("fr")
    assert french.gettext("Refer an opportunity") == "Recommander une opportunité"  # messages
    assert french.gettext("Kind regards,") == "Cordialement,"  # emails
    assert french.ngettext("Payment terms: %(num)s day", "Payment terms: %(num)s days", 30) == (
        "Conditions de paiement : %(num)s jours"
    )
    assert translations("en").gettext("Kind regards,") == "Kind regards,"
    with pytest.raises(LookupError):
        translations("xx")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_a_text_in_several_domains_reads_the_same_in_each(lang: str) -> None:
    """The domains are merged into one catalog: a text two domains translate differently
    would show whichever loads last, on every page (a stage name, say)."""
    found: dict[tuple[str, str | None], dict[str, str]] = {}
    for domain in DOMAINS:
        for message in catalog(lang, domain):
            if message.id and message.string:
                msgid = message.id if isinstance(message.id, str) else message.id[0]
                found.setdefault((msgid, message.context), {})[domain] = str(message.string)
    differing = {key: seen for key, seen in found.items() if len(set(seen.values())) > 1}
    assert differing == {}


def test_one_template_environment_serves_every_language_at_once() -> None:
    env = jinja2.Environment(autoescape=True)
    i18n.install(env)
    page = env.from_string(
        '{{ _("Refer an opportunity") }} | {{ "DE"|country }} | {{ amount|money("EUR") }} | '
        "{% trans num=n %}Payment terms: {{ num }} day{% pluralize %}"
        "Payment terms: {{ num }} days{% endtrans %}"
    )
    values = {"amount": Decimal("12000"), "n": 1}
    assert page.render(lang="fr", **values) == (
        "Recommander une opportunité | Allemagne | 12\u202f000,00\xa0€ | "
        "Conditions de paiement : 1 jour"
    )
    assert page.render(lang="en", **values) == (
        "Refer an opportunity | Germany | €12,000.00 | Payment terms: 1 day"
    )


# --- Babel's formats --------------------------------------------------------------------------


def test_dates_as_written_in_a_sentence() -> None:
    assert format_date(date(2026, 12, 4), "fr") == "4 décembre 2026"
    assert format_date(date(2026, 12, 4), "en") == "December 4, 2026"
    assert format_date(date(2027, 1, 1), "fr") == "1 janvier 2027"


@pytest.mark.parametrize(
    ("amount", "currency", "french", "english"),
    [
        ("12000", "EUR", "12\u202f000,00\xa0€", "€12,000.00"),
        ("-5.5", "EUR", "-5,50\xa0€", "-€5.50"),
        ("2.665", "EUR", "2,67\xa0€", "€2.67"),  # half-up, as the ledger rounds: not to even
        ("1234.5", "JPY", "1\u202f235\xa0JPY", "¥1,235"),  # no minor unit
        ("1234.5", "CHF", "1\u202f234,50\xa0CHF", "CHF1,234.50"),
        ("1.0005", "KWD", "1,001\xa0KWD", "KWD1.001"),  # three decimals
    ],
)
def test_money_in_the_currency_precision(
    amount: str, currency: str, french: str, english: str
) -> None:
    assert format_money(Decimal(amount), currency, "fr") == french
    assert format_money(Decimal(amount), currency, "en") == english


def test_money_without_amount_or_currency() -> None:
    assert format_money(None, "EUR", "fr") == "—"
    assert format_money(Decimal("1500"), None, "fr") == "1\u202f500,00"


def test_the_workflow_rounds_money_as_babel_shows_it() -> None:
    """The workflow keeps its own table (a library upgrade must not change a running
    referral's amounts); where it names a currency, it agrees with CLDR."""
    for currency in ("EUR", "USD", "CHF", "JPY", "KRW", "CLP", "ISK", "VND", "BHD", "KWD", "TND"):
        assert minor_unit_digits(currency) == get_currency_precision(currency), currency


def test_percentages() -> None:
    assert format_percent(Decimal("0.075"), "fr") == "7,5\xa0%"
    assert format_percent(Decimal("0.10"), "fr") == "10\xa0%"
    assert format_percent(Decimal("0.15"), "en") == "15%"


def test_country_names_in_each_language() -> None:
    assert territory_name("DE", "fr") == "Allemagne"
    assert territory_name("DE", "en") == "Germany"
    for lang in LANGUAGES:
        listed = countries(lang)
        assert {code for code, _ in listed} == COUNTRY_CODES
    names = [name for _, name in countries("fr")]
    # In French order, accents aside: É sorts with E, not after Z.
    assert names.index("Égypte") < names.index("Équateur") < names.index("Espagne")
    assert names.index("Espagne") < names.index("Estonie") < names.index("Zimbabwe")


def test_the_language_switch_names_each_language_in_itself() -> None:
    assert i18n.LANGUAGE_NAMES == {"fr": "Français", "en": "English"}
