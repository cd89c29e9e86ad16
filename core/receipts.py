"""Receipts: what proves when a prospect was registered, and why a later registration lost,
to anyone holding the receipt and our public key, without trusting us (docs/receipts.md).

A receipt is a JSON object. Its hash (`entry_hash`, SHA-256 of the RFC 8785 canonical JSON
of every field but `entry_hash`, `key_id` and `sig`) includes the hash of the receipt before
it (`prev_entry_hash`), so the receipts form one chain: changing, removing or inserting one
breaks every link after it. `sig` is an Ed25519 signature over the canonical JSON of every
field but `sig`. The public body names no one: the prospect's domain and the referrer's
address appear only as commitments, SHA-256 of `salt:value`; the referrer's own copy adds
`disclosures`, the clear values and their salts, so they can show what was committed.

This module is pure (no database, no clock): it builds, hashes, signs and checks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

VERSION = 1
GENESIS = "0" * 64  # the `prev_entry_hash` of the first receipt

REGISTERED = "registered"  # received: the first registration of this prospect
REFUSED_DUPLICATE = "refused_duplicate"  # another open referral registered it first
ACCEPTED = "accepted"  # accepted by the vendor: the prospect's protection starts
EXTENDED = "extended"  # the protection was extended
EXPIRED = "expired"  # the protection ended before the deal was won or lost
RELEASED = "released"  # the prospect is free to be registered again
KINDS = (REGISTERED, REFUSED_DUPLICATE, ACCEPTED, EXTENDED, EXPIRED, RELEASED)

# The rule a refused duplicate cites.
FIRST_REGISTRATION_WINS = "first_registration_wins"

# The fields that are hashed and signed, in the order a receipt is shown.
SIGNED = (
    "v",
    "program",
    "seq",
    "kind",
    "referral_id",
    "at",
    "rules_sha256",
    "commitments",
    "decision",
    "contact_by",
    "prev_entry_hash",
    "entry_hash",
    "key_id",
    "sig",
)
# What a referrer's commitments stand for, as a person reads it.
COMMITTED = {"prospect_domain": "the prospect's domain", "referrer_email": "the referrer's address"}


class ReceiptError(Exception):
    """A receipt is malformed; the message says what."""


def canonical(value: Any) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme): one byte string per JSON value."""
    return bytes(rfc8785.dumps(value))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_salt() -> str:
    return secrets.token_hex(32)


def commitment(salt: str, value: str) -> str:
    """What the public receipt shows of `value`: nobody can tell it from another value without
    the salt, and nobody holding the salt can find another value with the same commitment."""
    return sha256_hex(f"{salt}:{value}".encode())


def entry_hash(receipt: dict[str, Any]) -> str:
    body = {k: v for k, v in receipt.items() if k in SIGNED[: SIGNED.index("entry_hash")]}
    return sha256_hex(canonical(body))


def signed_bytes(receipt: dict[str, Any]) -> bytes:
    return canonical({k: v for k, v in receipt.items() if k in SIGNED and k != "sig"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_text(key: Ed25519PublicKey) -> str:
    """A public key as /receipts/keys publishes it: base64url of its 32 raw bytes."""
    return _b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def parse_public_key(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(_unb64(text))
    except ValueError as error:
        raise ReceiptError("not an Ed25519 public key") from error


def seal(receipt: dict[str, Any], key_id: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """`receipt` (every field before `entry_hash`) with its hash, key id and signature."""
    sealed = {k: receipt[k] for k in SIGNED[: SIGNED.index("entry_hash")]}
    sealed["entry_hash"] = entry_hash(sealed)
    sealed["key_id"] = key_id
    sealed["sig"] = _b64(key.sign(signed_bytes(sealed)))
    return sealed


def readable(at: str) -> str:
    """A receipt's instant as people read it: `2026-12-14 23:00:00 UTC`."""
    return f"{at.replace('T', ' ')[:19]} UTC"


def fingerprint(receipt: dict[str, Any]) -> str:
    """A short fingerprint to read aloud or compare at a glance: the hash's first 16 digits."""
    digest = str(receipt.get("entry_hash", ""))[:16].upper()
    return " ".join(digest[i : i + 4] for i in range(0, len(digest), 4))


@dataclass(frozen=True)
class Verdict:
    """A verified receipt, or why it is not one: `problem` names what is wrong."""

    valid: bool
    problem: str | None = None
    seq: int | None = None
    kind: str | None = None
    at: str | None = None
    key_id: str | None = None
    # What went wrong, for a page to say in its language: malformed, unknown_key, altered
    # (`fields` names what was changed, when known), not_in_log.
    code: str = "valid"
    fields: tuple[str, ...] = ()


def parse(text: str | bytes) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ReceiptError("not JSON") from error
    if not isinstance(document, dict):
        raise ReceiptError("not a receipt: a JSON object is expected")
    return document


def verify(
    document: dict[str, Any],
    keys: dict[str, Ed25519PublicKey],
    logged: dict[str, Any] | None = None,
) -> Verdict:
    """Whether `document` is a receipt we signed, unaltered, and its disclosures (if any) are
    what it committed to. `keys`: every public key, by id; `logged`: the receipt of the same
    number in our log, when there is one, to name the field that was changed."""
    missing = [k for k in SIGNED if k not in document]
    if missing:
        return Verdict(False, f"not a receipt: {', '.join(missing)} missing", code="malformed")
    seq, kind, at = document["seq"], document["kind"], document["at"]
    if document["v"] != VERSION:
        problem = f"receipt version {document['v']!r} is not known here"
        return Verdict(False, problem, code="malformed")
    if not isinstance(seq, int) or isinstance(seq, bool) or kind not in KINDS:
        return Verdict(False, "not a receipt: seq or kind is not one", code="malformed")
    found: dict[str, Any] = dict(seq=seq, kind=kind, at=at, key_id=document["key_id"])

    def altered(problem: str) -> Verdict:
        changed = tuple(_changed(document, logged))
        if changed:
            problem = f"{', '.join(changed)} changed: it differs from receipt {seq} in our log"
        return Verdict(False, f"altered: {problem}", code="altered", fields=changed, **found)

    if entry_hash(document) != document["entry_hash"]:
        return altered("its content does not match its entry_hash")
    key = keys.get(str(document["key_id"]))
    if key is None:
        problem = f"signed with an unknown key {document['key_id']!r}"
        return Verdict(False, problem, code="unknown_key", **found)
    try:
        key.verify(_unb64(str(document["sig"])), signed_bytes(document))
    except (InvalidSignature, ValueError):
        return altered(f"the signature is not key {document['key_id']}'s over this content")
    wrong = _disclosure_problem(document)
    if wrong is not None:
        field, problem = wrong
        fields = (field,) if field else ()
        return Verdict(False, f"altered: {problem}", code="altered", fields=fields, **found)
    if logged is not None and logged.get("entry_hash") != document["entry_hash"]:
        return Verdict(False, f"not receipt {seq} of our log", code="not_in_log", **found)
    return Verdict(True, None, **found)


def _changed(document: dict[str, Any], logged: dict[str, Any] | None) -> list[str]:
    if logged is None or logged.get("seq") != document.get("seq"):
        return []
    return [k for k in SIGNED if canonical(document.get(k)) != canonical(logged.get(k))]


def _disclosure_problem(document: dict[str, Any]) -> tuple[str, str] | None:
    """(the disclosure's name, what is wrong with it), or None."""
    disclosures = document.get("disclosures")
    if disclosures is None:
        return None
    commitments = document.get("commitments")
    if not isinstance(disclosures, dict) or not isinstance(commitments, dict):
        return "", "disclosures are not an object"
    for name, shown in disclosures.items():
        what = COMMITTED.get(name, name)
        if not isinstance(shown, dict) or not {"value", "salt"} <= shown.keys():
            return name, f"the disclosure of {what} is not a value and a salt"
        if commitment(str(shown["salt"]), str(shown["value"])) != commitments.get(name):
            return name, f"{what} ({name}) does not match its commitment"
    return None


def disclosed(values: dict[str, str], salts: dict[str, str]) -> dict[str, dict[str, str]]:
    """The referrer's disclosures: each committed value with its salt."""
    return {name: {"value": values[name], "salt": salts[name]} for name in values}


def commitments_of(values: dict[str, str], salts: dict[str, str]) -> dict[str, str]:
    return {name: commitment(salts[name], value) for name, value in values.items()}
