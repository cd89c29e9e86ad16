"""Signed tokens: the referrer's status link, the forms' CSRF tokens, and the keyed hash
that names a referrer in Temporal.

`REFERRALS_SECRET_KEY` is a comma-separated list: the first key signs, every key verifies, so
a secret is rotated in two rolling steps (add it last everywhere, then put it first) and a
link signed before the rotation still opens. Functions here take that list (or one key).
ReferrerKey has a key of its own that never rotates (Settings.referrer_key_secret).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

CSRF_MAX_AGE_SECONDS = 4 * 3600
Keys = str | Sequence[str]


def signer_keys(keys: Keys) -> list[str]:
    """As itsdangerous wants them: newest (the signing one) last."""
    listed = [keys] if isinstance(keys, str) else list(keys)
    if not listed:
        raise ValueError("no signing key")
    return list(reversed(listed))


def status_token(referral_id: str, keys: Keys) -> str:
    return URLSafeSerializer(signer_keys(keys), salt="referral-status").dumps(referral_id)


def referral_from_token(token: str, keys: Keys) -> str | None:
    """The referral id a status token was issued for, or None if it was not issued by us."""
    try:
        value = URLSafeSerializer(signer_keys(keys), salt="referral-status").loads(token)
    except BadSignature:
        return None
    return value if isinstance(value, str) else None


def status_url(public_url: str, referral_id: str, keys: Keys) -> str:
    return f"{public_url.rstrip('/')}/status/{status_token(referral_id, keys)}"


def referrer_key(email: str, key: str) -> str:
    """A keyed hash of a referrer's address: lets operations find a referrer's workflows in
    Temporal (search attribute ReferrerKey) without Temporal holding the address. `key` is
    `Settings.referrer_key_secret`, which a rotation leaves as it was."""
    normalized = email.strip().lower().encode()
    digest = hmac.new(key.encode(), normalized, hashlib.sha256)
    return digest.hexdigest()[:32]


def csrf_token(nonce: str, keys: Keys) -> str:
    return URLSafeTimedSerializer(signer_keys(keys), salt="intake-form").dumps(nonce)


def csrf_valid(token: str | None, nonce: str | None, keys: Keys) -> bool:
    """The form's token must be ours, recent, and match the nonce in the visitor's cookie."""
    if not token or not nonce:
        return False
    try:
        signed = URLSafeTimedSerializer(signer_keys(keys), salt="intake-form").loads(
            token, max_age=CSRF_MAX_AGE_SECONDS
        )
    except (BadSignature, SignatureExpired):
        return False
    return isinstance(signed, str) and secrets.compare_digest(signed, nonce)
