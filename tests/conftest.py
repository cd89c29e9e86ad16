"""Shared fixtures: real Temporal servers from the installed binaries, never downloads."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from starter.program import load_program
from workflows.models import ProgramRules
from workflows.referral import DOMAIN_KEY, PRODUCT_KEY, REFERRER_KEY, SLA_KEY, STAGE_KEY

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEARCH_ATTRIBUTES = [STAGE_KEY, DOMAIN_KEY, REFERRER_KEY, PRODUCT_KEY, SLA_KEY]


@pytest.fixture(scope="session")
def rules() -> ProgramRules:
    return load_program(ROOT / "program.yaml")


@pytest_asyncio.fixture(scope="session")
async def time_env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server: timers fire as soon as nothing else can happen."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(BIN / "temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """The real dev server, with the contract's search attributes registered."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
    )
    yield env
    await env.shutdown()
