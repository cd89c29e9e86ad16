"""The consent statement a referrer accepts, and the version recorded with each referral.

The statement is the one the form shows, in the form's language (its translations are in the
`messages` catalogs); its version changes whenever its text does, so a referral says exactly
which text was accepted, in which language.
"""

from __future__ import annotations

import hashlib
from functools import cache

from activities.i18n import N_, translations

CONSENT = N_("I have the contact's permission to share their details for this referral program.")


@cache
def consent_statement(language: str) -> tuple[str, str]:
    """(version, text) of the consent statement in `language`."""
    text = translations(language).gettext(CONSENT)
    return f"{language}-{hashlib.sha256(text.encode()).hexdigest()[:12]}", text
