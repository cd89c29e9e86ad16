"""How every entry point reaches Temporal: the connection the settings describe (Temporal's
envconfig: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_PROFILE, TEMPORAL_CONFIG_FILE, API
keys and mTLS, as the `temporal` CLI reads them), and the one data converter every process uses
(pydantic, payloads encrypted)."""

from __future__ import annotations

import dataclasses

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.runtime import Runtime

from core.encryption import EncryptionCodec, KeyRing
from core.settings import DEV_KEY_FILE, Need, Settings


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
    return await Client.connect(**settings.temporal, data_converter=pydantic_data_converter)


async def connect(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """`runtime`: the Temporal runtime (its telemetry: the worker's metrics) instead of the
    default one."""
    return await Client.connect(
        **settings.temporal,
        data_converter=data_converter(payload_codec(settings)),
        runtime=runtime,
    )
