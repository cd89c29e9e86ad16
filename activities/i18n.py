"""Languages: the gettext catalogs under `core/locale/` and Babel's ways of writing dates, money,
percentages and country names, for the emails and the web pages alike.

Here rather than in `starter/` because the email activity needs it, and activities never
import the entry points. Adding a language is adding its catalogs (docs/i18n.md) and its
code to `LANGUAGES`.
"""

from __future__ import annotations

import unicodedata
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from functools import cache

import jinja2
from babel import Locale
from babel.dates import format_date as babel_format_date
from babel.numbers import format_currency, format_decimal, get_currency_precision
from babel.numbers import format_percent as babel_format_percent
from babel.support import Translations
from jinja2.runtime import Context

from core import LOCALE
from workflows.models.values import COUNTRY_CODES

LANGUAGES = ("fr", "en")
# Each language by its own name, as a visitor looks for it: `Français`, `English`.
LANGUAGE_NAMES = {
    code: str(Locale.parse(code).get_display_name()).capitalize() for code in LANGUAGES
}
LOCALE_DIR = LOCALE


def N_(message: str) -> str:
    """Marks a message for `pybabel extract` where it is defined; it is translated where it
    is shown, once the language is known."""
    return message


@cache
def translations(lang: str) -> Translations:
    """Every domain's compiled catalog for `lang` (`messages`, `emails`, `portal`, `staff`…)
    merged in one, so a template or a module need not know which domain holds a message."""
    if lang not in LANGUAGES:
        raise LookupError(f"{lang!r} is not one of the languages {LANGUAGES}")
    files = sorted((LOCALE_DIR / lang / "LC_MESSAGES").glob("*.mo"))
    if not files:
        raise LookupError(f"no compiled catalogs in {LOCALE_DIR / lang}: run `make catalogs`")
    merged: Translations | None = None
    for path in files:
        with path.open("rb") as file:
            catalog = Translations(file, domain=path.stem)
        merged = catalog if merged is None else merged.merge(catalog)
    assert merged is not None
    return merged


@jinja2.pass_context
def _gettext(context: Context, message: str) -> str:
    return translations(context["lang"]).gettext(message)


@jinja2.pass_context
def _ngettext(context: Context, singular: str, plural: str, n: int) -> str:
    return translations(context["lang"]).ngettext(singular, plural, n)


@jinja2.pass_context
def _date_filter(context: Context, day: date) -> str:
    return format_date(day, context["lang"])


@jinja2.pass_context
def _money_filter(context: Context, amount: Decimal | None, currency: str | None = None) -> str:
    return format_money(amount, currency, context["lang"])


@jinja2.pass_context
def _percent_filter(context: Context, rate: Decimal) -> str:
    return format_percent(rate, context["lang"])


@jinja2.pass_context
def _country_filter(context: Context, code: str) -> str:
    return territory_name(code, context["lang"])


def install(env: jinja2.Environment) -> None:
    """`_()`, `ngettext()`, `{% trans %}`, the `date`, `money`, `percent` and `country`
    filters and `language_names`, in the language of the `lang` variable of each render.

    The language is read from the render's context, never installed on the environment, so
    one environment serves visitors of every language at once."""
    env.add_extension("jinja2.ext.i18n")
    # A {% trans %} block's lines and indentation are layout, not text: collapsed, as in the
    # msgids `pybabel extract` takes (`trimmed = true` in locale/*.cfg).
    env.policies["ext.i18n.trimmed"] = True
    env.install_gettext_callables(_gettext, _ngettext, newstyle=True)  # type: ignore[attr-defined]
    env.globals["language_names"] = LANGUAGE_NAMES
    env.filters.update(
        date=_date_filter, money=_money_filter, percent=_percent_filter, country=_country_filter
    )


def format_date(day: date, lang: str) -> str:
    """A date as written in a sentence: `4 décembre 2026`, `December 4, 2026`."""
    return babel_format_date(day, "long", locale=lang)


def format_money(amount: Decimal | None, currency: str | None, lang: str) -> str:
    """`12 000,00 €`, `€12,000.00`, `¥1,234`: rounded half-up to the currency's precision
    (CLDR, through Babel); a bare number without a currency; `—` for no amount."""
    if amount is None:
        return "—"
    digits = get_currency_precision(currency) if currency else 2
    rounded = Decimal(amount).quantize(Decimal(1).scaleb(-digits), ROUND_HALF_UP)
    if not currency:
        return format_decimal(rounded, "#,##0.00", locale=lang)
    return format_currency(rounded, currency, locale=lang)


def format_percent(rate: Decimal, lang: str) -> str:
    """A rate given as a fraction: `0.075` is `7,5 %` in French, `7.5%` in English."""
    return babel_format_percent(rate, locale=lang, decimal_quantization=False)


def territory_name(code: str, lang: str) -> str:
    """`DE` is `Allemagne` in French, `Germany` in English."""
    return Locale.parse(lang).territories.get(code.upper(), code)


@cache
def countries(lang: str) -> list[tuple[str, str]]:
    """The countries a prospect may be in, `(code, name)` in alphabetical order of the name
    in `lang` (accents aside, so `Émirats arabes unis` comes before `Équateur`… and `Espagne`
    after `Érythrée`, as a French reader expects)."""

    def key(country: tuple[str, str]) -> str:
        bare = unicodedata.normalize("NFKD", country[1])
        return "".join(c for c in bare if not unicodedata.combining(c)).casefold()

    return sorted(((code, territory_name(code, lang)) for code in COUNTRY_CODES), key=key)
