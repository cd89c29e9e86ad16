"""Encrypted payloads: what Temporal stores about a referral is unreadable without a key.

Every payload (workflow input, activity arguments, results, signals, updates, failure
messages and stack traces) is encrypted with AES-GCM by one payload codec before it
leaves the process, the key id in the payload's metadata. The newest key of the ring
encrypts; every key of the ring decrypts, so keys can be rotated while old histories stay
readable.

Keys come from `REFERRALS_ENCRYPTION_KEYS` (`id:base64key,…`, newest last) or from the key
file `.data/encryption-keys`, which the first process that needs a key creates (mode
0600): every process started from the same checkout finds it, so encryption is on in
development without a step.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

KEYS_ENV = "REFERRALS_ENCRYPTION_KEYS"
KEY_FILE = Path(".data") / "encryption-keys"
ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
_NONCE_BYTES = 12
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class EncryptionKeyError(Exception):
    """The key ring is misconfigured, or a payload's key is not in it."""


@dataclass(frozen=True)
class KeyRing:
    """Keys by id, oldest first; the last one encrypts."""

    keys: tuple[tuple[str, bytes], ...]

    @property
    def current(self) -> tuple[str, bytes]:
        return self.keys[-1]

    def key(self, key_id: str) -> bytes | None:
        return dict(self.keys).get(key_id)

    @classmethod
    def parse(cls, text: str, where: str) -> KeyRing:
        """`id:base64key` entries, separated by commas or lines; `#` starts a comment."""
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
                raise EncryptionKeyError(
                    f"{where}: expected id:base64 of a 32-byte key, got {entry!r}"
                )
            keys.append((key_id.strip(), key))
        if not keys:
            raise EncryptionKeyError(f"{where}: no key")
        if len({key_id for key_id, _ in keys}) != len(keys):
            raise EncryptionKeyError(f"{where}: key ids must be unique")
        return cls(tuple(keys))


def new_key_entry() -> str:
    key_id = f"{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(32)).decode()}"


def load_key_ring(path: Path = KEY_FILE) -> KeyRing:
    """The configured ring, or the key file's, created with one key if there is none yet."""
    configured = os.environ.get(KEYS_ENV)
    if configured:
        return KeyRing.parse(configured, KEYS_ENV)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # the first process to get here writes it; the others read what it wrote
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write("# Referral Desk payload keys, oldest first; the last encrypts.\n")
                file.write(new_key_entry() + "\n")
    return KeyRing.parse(path.read_text(encoding="utf-8"), str(path))


def rotate_key_file(path: Path = KEY_FILE) -> str:
    """Add a new key to the key file; it encrypts from now on. Returns its id."""
    if os.environ.get(KEYS_ENV):
        raise EncryptionKeyError(
            f"keys come from {KEYS_ENV}: add the new key there (id:base64 of 32 random bytes)"
        )
    load_key_ring(path)  # creates the file if needed
    entry = new_key_entry()
    with path.open("a", encoding="utf-8") as file:
        file.write(entry + "\n")
    return entry.partition(":")[0]


class EncryptionCodec(PayloadCodec):
    """AES-GCM over each serialized payload. A payload that is not encrypted (a history
    recorded before encryption) decodes as it is."""

    def __init__(self, ring: KeyRing | None = None, key_file: Path = KEY_FILE) -> None:
        self._ring = ring
        self._key_file = key_file

    def ring(self) -> KeyRing:
        if self._ring is None:
            self._ring = load_key_ring(self._key_file)
        return self._ring

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        key_id, key = self.ring().current
        cipher = AESGCM(key)
        encoded = []
        for payload in payloads:
            nonce = secrets.token_bytes(_NONCE_BYTES)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), key_id.encode())
            encoded.append(
                Payload(
                    metadata={"encoding": ENCODING, KEY_ID: key_id.encode()},
                    data=nonce + sealed,
                )
            )
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        decoded = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                decoded.append(payload)
                continue
            key_id = payload.metadata[KEY_ID].decode()
            key = self.ring().key(key_id)
            if key is None:  # rotated since this process started: look again
                self._ring = None
                key = self.ring().key(key_id)
            if key is None:
                raise EncryptionKeyError(
                    f"payload encrypted with key {key_id!r}, not in the key ring"
                )
            nonce, sealed = payload.data[:_NONCE_BYTES], payload.data[_NONCE_BYTES:]
            plain = Payload()
            plain.ParseFromString(AESGCM(key).decrypt(nonce, sealed, key_id.encode()))
            decoded.append(plain)
        return decoded
