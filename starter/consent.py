"""The consent statement a referrer accepts, and the version recorded with each referral.

The statement is the one the form shows (templates/web/messages/<lang>.yaml, `form.consent`);
its version changes whenever its text does, so a referral says exactly which text was
accepted, in which language.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import yaml

MESSAGES = Path(__file__).resolve().parent.parent / "templates" / "web" / "messages"


@cache
def consent_statement(language: str) -> tuple[str, str]:
    """(version, text) of the consent statement in `language`."""
    texts = yaml.safe_load((MESSAGES / f"{language}.yaml").read_text(encoding="utf-8"))
    text = " ".join(str(texts["form"]["consent"]).split())
    return f"{language}-{hashlib.sha256(text.encode()).hexdigest()[:12]}", text
