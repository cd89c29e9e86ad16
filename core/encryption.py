"""Encrypted payloads: what Temporal stores about a referral is unreadable without a key.

Every payload (workflow input, activity arguments, results, signals, updates, failure
messages and stack traces) is encrypted with AES-GCM by one payload codec before it leaves
the process (core/temporal.py), the key id in the payload's metadata. One key of the ring encrypts
(REFERRALS_ENCRYPTION_CURRENT_KEY, else the last); every key of the ring decrypts, so keys
can be rotated in two rolling steps while old histories stay readable: add the new key to
every process, then make it current.

Keys come from `REFERRALS_ENCRYPTION_KEYS` (`id:base64key,…`) or its `_FILE`, or, in the dev
stack only, from the key file `.data/encryption-keys` that `referrals dev` creates
(core/settings.py).
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.errors import SettingsError

KEYS_ENV = "REFERRALS_ENCRYPTION_KEYS"
CURRENT_ENV = "REFERRALS_ENCRYPTION_CURRENT_KEY"
ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class EncryptionKeyError(SettingsError):
    """The key ring is misconfigured, or a payload's key is not in it."""


@dataclass(frozen=True)
class KeyRing:
    """Keys by id, in the order given; `current_id` (default: the last) encrypts."""

    keys: tuple[tuple[str, bytes], ...]
    current_id: str | None = None

    @property
    def current(self) -> tuple[str, bytes]:
        if self.current_id is None:
            return self.keys[-1]
        return self.current_id, dict(self.keys)[self.current_id]

    def key(self, key_id: str) -> bytes | None:
        return dict(self.keys).get(key_id)

    @classmethod
    def parse(cls, text: str, where: str, current: str | None = None) -> KeyRing:
        """`id:base64key` entries, separated by commas or lines; `#` starts a comment.
        `current`: the id of the key that encrypts, which must be one of them."""
        keys: list[tuple[str, bytes]] = []
        lines = (line.split("#", 1)[0] for line in text.splitlines())
        for entry in (e.strip() for line in lines for e in line.split(",")):
            if not entry:
                continue
            key_id, _, encoded = entry.partition(":")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except ValueError:
                key = b""
            if not _ID.match(key_id.strip()) or len(key) != 32:
                # Never the entry itself: it holds the key.
                raise EncryptionKeyError(
                    f"{where}: expected id:base64 of a 32-byte key, got an entry with id "
                    f"{key_id.strip()[:64]!r}"
                )
            keys.append((key_id.strip(), key))
        if not keys:
            raise EncryptionKeyError(f"{where}: no key")
        if len({key_id for key_id, _ in keys}) != len(keys):
            raise EncryptionKeyError(f"{where}: key ids must be unique")
        if current is not None and current not in dict(keys):
            raise EncryptionKeyError(
                f"{CURRENT_ENV}={current!r} is not a key of {where} (add the key everywhere "
                "first, then make it current)"
            )
        return cls(tuple(keys), current)


def new_key_entry() -> str:
    key_id = f"{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(32)).decode()}"


def rotate_key_file(path: Path) -> str:
    """The dev stack's rotation: add a new key to its key file; it encrypts from then on (the
    last key of the file does). Returns its id."""
    if not path.is_file():
        raise EncryptionKeyError(f"no key file {path}: `referrals dev` creates it")
    entry = new_key_entry()
    with path.open("a", encoding="utf-8") as file:
        file.write(entry + "\n")
    return entry.partition(":")[0]
