"""Who acted, proven: a staff action carries an actor assertion, signed by the surface that
authenticated the person (the staff web desk, from the signed-in address; the CLI in a
toolbox, from REFERRALS_STAFF_IDENTITY), and the referral workflow refuses to move money on
a name alone (docs/operations.md, "Who acted").

An assertion is a JWT signed with Ed25519 (EdDSA), its key id in the header. It binds the
actor (`sub`), the referral (`aud`), the request id (`jti`) and a digest of the whole request
(`req`), and lasts ASSERTION_LIFETIME: it cannot be replayed on another referral, for another
amount, or once its request is applied. Surfaces hold private keys
(REFERRALS_ACTOR_SIGNING_KEY: `key id:surface:seed`); workers hold only the public ones they
trust (REFERRALS_ACTOR_KEYS: `key id:surface:public key,…`), so Temporal access, a worker's
secrets or the payload keys do not let anyone sign.

The `act` update's validator checks an assertion with the keys the worker trusts: it does not
run again when a history is replayed, and whether the update was accepted is itself in the
history, so a key rotated away later changes nothing already decided.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core.errors import Refused

if TYPE_CHECKING:  # the CLI reads keys without loading the models or PyJWT
    from workflows.models.referral import StaffAction
    from workflows.payouts import RunRequest

SIGNING_KEY_ENV = "REFERRALS_ACTOR_SIGNING_KEY"
TRUSTED_KEYS_ENV = "REFERRALS_ACTOR_KEYS"
# Long enough for a form filled slowly and a retry with the same request id; short enough that
# an assertion seen in a log or a history cannot wait for a better moment.
ASSERTION_LIFETIME = timedelta(minutes=15)
# Clocks of the surface and the worker may differ by this much.
CLOCK_LEEWAY = timedelta(seconds=60)
# What an action without a valid assertion is recorded as coming from.
UNAUTHENTICATED = "unauthenticated"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


# What a surface signs: a staff action on a referral, or an update to a payout run; the
# audience is the workflow id either way.
Request = TypeVar("Request", "StaffAction", "RunRequest")


class ActorKeyError(Exception):
    """A signing or trusted key is malformed; the message names the setting."""


def request_digest(referral_id: str, request: StaffAction | RunRequest) -> str:
    """SHA-256 of the request as sent, without its assertion: every value the action takes."""
    body = request.model_dump(mode="json", exclude={"assertion"})
    text = json.dumps({"referral": referral_id, **body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    """A surface's private key: it signs what that surface's signed-in staff do."""

    key_id: str
    surface: str
    private: Ed25519PrivateKey

    def sign(self, referral_id: str, request: Request, now: datetime | None = None) -> Request:
        """`request` with an assertion that its actor, as authenticated here, sends it."""
        if not request.request_id:
            raise ValueError("a signed action needs its request id")
        import jwt  # here: reading keys (every CLI command) does not load PyJWT

        issued = now or datetime.now(UTC)
        claims = {
            "iss": self.surface,
            "sub": request.actor,
            "aud": referral_id,
            "jti": request.request_id,
            "req": request_digest(referral_id, request),
            "iat": int(issued.timestamp()),
            "exp": int((issued + ASSERTION_LIFETIME).timestamp()),
        }
        token = jwt.encode(claims, self.private, algorithm="EdDSA", headers={"kid": self.key_id})
        return request.model_copy(update={"assertion": token})

    def trusted_entry(self) -> str:
        """This key's public half as REFERRALS_ACTOR_KEYS takes it."""
        public = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return f"{self.key_id}:{self.surface}:{_b64(public)}"

    def text(self) -> str:
        seed = self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return f"{self.key_id}:{self.surface}:{_b64(seed)}"

    @classmethod
    def new(cls, key_id: str, surface: str) -> SigningKey:
        _check_names(key_id, surface, SIGNING_KEY_ENV)
        return cls(key_id, surface, Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str, where: str = SIGNING_KEY_ENV) -> SigningKey:
        key_id, surface, raw = _entry(text.strip(), where)
        try:
            return cls(key_id, surface, Ed25519PrivateKey.from_private_bytes(raw))
        except ValueError:
            raise ActorKeyError(f"{where}: key {key_id!r} is not an Ed25519 key") from None


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a worker accepts assertions from, by key id, each with its surface."""

    keys: dict[str, tuple[str, Ed25519PublicKey]]

    @classmethod
    def parse(cls, text: str, where: str = TRUSTED_KEYS_ENV) -> TrustedKeys:
        """`key id:surface:public key` entries, separated by commas or lines."""
        keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
        for entry in re.split(r"[,\n]", text):
            if not entry.strip() or entry.strip().startswith("#"):
                continue
            key_id, surface, raw = _entry(entry.strip(), where)
            if key_id in keys:
                raise ActorKeyError(f"{where}: key id {key_id!r} is given twice")
            try:
                keys[key_id] = (surface, Ed25519PublicKey.from_public_bytes(raw))
            except ValueError:
                raise ActorKeyError(f"{where}: key {key_id!r} is not an Ed25519 key") from None
        if not keys:
            raise ActorKeyError(f"{where}: no key")
        return cls(keys)

    def verify(self, referral_id: str, request: StaffAction | RunRequest) -> str:
        """The surface that signed `request`'s assertion; Refused says why not."""
        import jwt

        token = request.assertion or ""
        try:
            key_id = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise Refused("the actor assertion is not a signed token") from None
        if key_id not in self.keys:
            raise Refused(f"the actor assertion's key {key_id!r} is not trusted")
        surface, public = self.keys[key_id]
        try:
            claims = jwt.decode(
                token,
                public,
                algorithms=["EdDSA"],
                audience=referral_id,
                issuer=surface,
                leeway=CLOCK_LEEWAY,
                options={"require": ["iss", "sub", "aud", "jti", "req", "iat", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise Refused("the actor assertion has expired: send it again") from None
        except jwt.InvalidAudienceError:
            raise Refused("the actor assertion is for another referral") from None
        except jwt.PyJWTError as error:
            raise Refused(f"the actor assertion is invalid ({error})") from None
        if claims["sub"] != request.actor:
            raise Refused(f"the actor assertion names {claims['sub']!r}, not the actor")
        if claims["jti"] != request.request_id or claims["req"] != request_digest(
            referral_id, request
        ):
            raise Refused("the actor assertion was signed for another request")
        return surface


def signed_surface(request: StaffAction | RunRequest) -> str:
    """Who a request's assertion says signed it, read without checking: only for a request
    the `act` validator has accepted (a replay must not depend on the keys of the day)."""
    if not request.assertion:
        return UNAUTHENTICATED
    import jwt

    claims: dict[str, Any] = jwt.decode(request.assertion, options={"verify_signature": False})
    return str(claims.get("iss") or UNAUTHENTICATED)


# The keys this process's workers trust (`trust`, from worker.py); None: none, so no assertion
# is valid. Read by the referral workflow's `act` validator.
_trusted: TrustedKeys | None = None


def trust(keys: TrustedKeys | None) -> None:
    global _trusted
    _trusted = keys


def trusted() -> TrustedKeys | None:
    return _trusted


def _entry(text: str, where: str) -> tuple[str, str, bytes]:
    key_id, _, rest = text.partition(":")
    surface, _, encoded = rest.partition(":")
    key_id, surface = key_id.strip(), surface.strip()
    if not encoded:
        raise ActorKeyError(f"{where}: an entry is 'key id:surface:base64 key', not {key_id!r}…")
    _check_names(key_id, surface, where)
    encoded = encoded.strip()
    try:
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
    except ValueError:
        raise ActorKeyError(f"{where}: key {key_id!r} is not base64") from None
    if len(raw) != 32:
        raise ActorKeyError(f"{where}: key {key_id!r} is not 32 bytes long (Ed25519)")
    return key_id, surface, raw


def _check_names(key_id: str, surface: str, where: str) -> None:
    for what, name in (("key id", key_id), ("surface", surface)):
        if not _NAME.match(name):
            raise ActorKeyError(
                f"{where}: {what} {name!r}: lower-case letters, digits, '.', '_' or '-'"
            )
    if surface == UNAUTHENTICATED:
        raise ActorKeyError(f"{where}: {UNAUTHENTICATED!r} cannot name a surface")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
