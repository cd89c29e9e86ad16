"""Signed tokens: the referrer's status link and the intake form's CSRF token.

One secret signs both: `REFERRALS_SECRET_KEY`, or a random key kept in
`.data/secret_key` so links keep working across restarts of the dev stack.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

SECRET_FILE = Path(".data") / "secret_key"
CSRF_MAX_AGE_SECONDS = 4 * 3600


def secret_key() -> str:
    configured = os.environ.get("REFERRALS_SECRET_KEY")
    if configured:
        return configured
    try:
        return SECRET_FILE.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        SECRET_FILE.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        try:
            with SECRET_FILE.open("x", encoding="utf-8") as file:  # first writer wins
                file.write(key)
            SECRET_FILE.chmod(0o600)
        except FileExistsError:
            return SECRET_FILE.read_text(encoding="utf-8").strip()
        return key


def public_url() -> str:
    return os.environ.get("REFERRALS_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")


def status_token(referral_id: str, key: str | None = None) -> str:
    return URLSafeSerializer(key or secret_key(), salt="referral-status").dumps(referral_id)


def referral_from_token(token: str, key: str | None = None) -> str | None:
    """The referral id a status token was issued for, or None if it was not issued by us."""
    try:
        value = URLSafeSerializer(key or secret_key(), salt="referral-status").loads(token)
    except BadSignature:
        return None
    return value if isinstance(value, str) else None


def status_url(referral_id: str, key: str | None = None) -> str:
    return f"{public_url()}/status/{status_token(referral_id, key)}"


def referrer_key(email: str, key: str | None = None) -> str:
    """A keyed hash of a referrer's address: lets operations find a referrer's workflows in
    Temporal (search attribute ReferrerKey) without Temporal holding the address."""
    normalized = email.strip().lower().encode()
    digest = hmac.new((key or secret_key()).encode(), normalized, hashlib.sha256)
    return digest.hexdigest()[:32]


def csrf_token(nonce: str, key: str) -> str:
    return URLSafeTimedSerializer(key, salt="intake-form").dumps(nonce)


def csrf_valid(token: str | None, nonce: str | None, key: str) -> bool:
    """The form's token must be ours, recent, and match the nonce in the visitor's cookie."""
    if not token or not nonce:
        return False
    try:
        signed = URLSafeTimedSerializer(key, salt="intake-form").loads(
            token, max_age=CSRF_MAX_AGE_SECONDS
        )
    except (BadSignature, SignatureExpired):
        return False
    return isinstance(signed, str) and secrets.compare_digest(signed, nonce)
