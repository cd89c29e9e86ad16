"""How every entry point reaches Temporal: envconfig profiles, then the contract's defaults."""

from __future__ import annotations

import os

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.envconfig import ClientConfig

DEFAULT_ADDRESS = "127.0.0.1:7233"


def task_queue() -> str:
    return os.environ.get("REFERRALS_TASK_QUEUE", "referrals")


def temporal_address() -> str:
    config = ClientConfig.load_client_connect_config()
    return str(config.get("target_host") or DEFAULT_ADDRESS)


async def connect() -> Client:
    """Honours TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_PROFILE, TEMPORAL_CONFIG_FILE,
    API keys and mTLS settings, as the `temporal` CLI does."""
    config = ClientConfig.load_client_connect_config()
    config.setdefault("target_host", DEFAULT_ADDRESS)
    return await Client.connect(**config, data_converter=pydantic_data_converter)
