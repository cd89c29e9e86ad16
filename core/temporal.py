"""How every entry point reaches Temporal: envconfig profiles, then the contract's defaults,
and the one data converter every process uses (pydantic, payloads encrypted)."""

from __future__ import annotations

import dataclasses
import os

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.envconfig import ClientConfig
from temporalio.runtime import Runtime

from core.encryption import EncryptionCodec

DEFAULT_ADDRESS = "127.0.0.1:7233"


def task_queue() -> str:
    return os.environ.get("REFERRALS_TASK_QUEUE", "referrals")


def temporal_address() -> str:
    config = ClientConfig.load_client_connect_config()
    return str(config.get("target_host") or DEFAULT_ADDRESS)


def temporal_namespace() -> str:
    config = ClientConfig.load_client_connect_config()
    return str(config.get("namespace") or "default")


def data_converter(codec: EncryptionCodec | None = None) -> DataConverter:
    """Pydantic models in, encrypted payloads out; failure messages and stack traces are
    encrypted too, since they can quote an address."""
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec or EncryptionCodec(),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect(*, runtime: Runtime | None = None) -> Client:
    """Honours TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_PROFILE, TEMPORAL_CONFIG_FILE,
    API keys and mTLS settings, as the `temporal` CLI does. `runtime`: the Temporal runtime
    (its telemetry: the worker's metrics) instead of the default one."""
    config = ClientConfig.load_client_connect_config()
    config.setdefault("target_host", DEFAULT_ADDRESS)
    return await Client.connect(**config, data_converter=data_converter(), runtime=runtime)
