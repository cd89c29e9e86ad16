"""How every entry point reaches Temporal: the connection the settings describe (Temporal's
envconfig: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_PROFILE, TEMPORAL_CONFIG_FILE, API
keys and mTLS, as the `temporal` CLI reads them), and the one data converter every process uses
(pydantic, payloads encrypted)."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)
from temporalio.runtime import Runtime

from core.encryption import ENCODING, KEY_ID, NONCE_BYTES, EncryptionKeyError, KeyRing
from core.settings import DEV_KEY_FILE, Need, Settings


class EncryptionCodec(PayloadCodec):
    """AES-GCM over each serialized payload. A payload that is not encrypted (a history
    recorded before encryption) decodes as it is. `reload` (the dev stack's key file) gives
    the ring again when a payload names a key added since this process started."""

    def __init__(self, ring: KeyRing, reload: Callable[[], KeyRing] | None = None) -> None:
        self._ring = ring
        self._reload = reload

    def ring(self) -> KeyRing:
        return self._ring

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        key_id, key = self.ring().current
        cipher = AESGCM(key)
        encoded = []
        for payload in payloads:
            nonce = secrets.token_bytes(NONCE_BYTES)
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
            key = self._ring.key(key_id)
            if key is None and self._reload is not None:  # rotated since: look again
                self._ring = self._reload()
                key = self._ring.key(key_id)
            if key is None:
                raise EncryptionKeyError(
                    f"payload encrypted with key {key_id!r}, not in the key ring"
                )
            nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
            plain = Payload()
            plain.ParseFromString(AESGCM(key).decrypt(nonce, sealed, key_id.encode()))
            decoded.append(plain)
        return decoded


def data_converter(codec: EncryptionCodec) -> DataConverter:
    """Pydantic models in, encrypted payloads out; failure messages and stack traces are
    encrypted too, since they can quote an address."""
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def payload_codec(settings: Settings) -> EncryptionCodec:
    """The settings' key ring; in the dev stack, one that re-reads the key file when a payload
    names a key `referrals keys rotate` added since this process started."""
    ring = settings.key_ring()
    if Need.ENCRYPTION.value not in settings.from_dev_files:
        return EncryptionCodec(ring)
    path = DEV_KEY_FILE.resolve()
    return EncryptionCodec(
        ring, reload=lambda: KeyRing.parse(path.read_text(encoding="utf-8"), str(path))
    )


async def connect_for_operations(settings: Settings) -> Client:
    """A client that carries no payloads (namespace, search attributes, Schedules without
    arguments): it needs no key, so `referrals temporal setup` runs before any is given."""
    return await Client.connect(
        **settings.temporal_client(), data_converter=pydantic_data_converter
    )


async def connect(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """`runtime`: the Temporal runtime (its telemetry: the worker's metrics) instead of the
    default one."""
    return await Client.connect(
        **settings.temporal_client(),
        data_converter=data_converter(payload_codec(settings)),
        runtime=runtime,
    )
