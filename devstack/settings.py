"""The run's keys and settings: a payload key, a link secret and a staff signing key of the
run, set in the environment before anything reads it, so every process the run starts (CLI,
worker, web app) shares them; the client converter that uses them; the contract's search
attributes."""

from __future__ import annotations

import dataclasses
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from temporalio.common import SearchAttributeKey
from temporalio.converter import DataConverter

from core.actor_assertions import SIGNING_KEY_ENV, TRUSTED_KEYS_ENV, SigningKey, trust
from core.encryption import KEYS_ENV, new_key_entry
from core.settings import Need, Settings
from core.temporal import data_converter, payload_codec
from workflows.models.referral import StaffAction
from workflows.referral import (
    DOMAIN_KEY,
    PRODUCT_KEY,
    PROTECTED_KEY,
    REFERRER_EMAIL_KEY,
    REFERRER_KEY,
    SLA_KEY,
    STAGE_KEY,
)

if TYPE_CHECKING:
    from devstack.servers import MailSink

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Payloads are encrypted in every run with a key of the run, and links are signed with one
# secret; the CLI, worker and web processes the run starts inherit both.
os.environ.setdefault(KEYS_ENV, new_key_entry())
os.environ.setdefault(Need.SECRET.value, "test-secret-" + "x" * 32)
SECRET = os.environ[Need.SECRET.value]
# Staff actions are signed with a key of the test run, which every worker trusts.
os.environ.setdefault(SIGNING_KEY_ENV, SigningKey.new("tests", "tests").text())
os.environ.setdefault(
    TRUSTED_KEYS_ENV, SigningKey.parse(os.environ[SIGNING_KEY_ENV]).trusted_entry()
)
# The settings of this process (its environment above; no dev stack files are read from
# tests/): the in-process workers and web apps get these, or a copy with a change.
SETTINGS = Settings.from_env(cwd=ROOT / "tests")
# Workers built without `build_worker` (tests/desk.py) check assertions with the same keys.
trust(SETTINGS.actor_trusted_keys)


def converter() -> DataConverter:
    """The data converter of every client the tests connect: the test run's key."""
    return data_converter(payload_codec(SETTINGS))


def settings_with(sink: MailSink | None = None, **changes: Any) -> Settings:
    """The test settings, sending through `sink` and with `changes` (a task queue…)."""
    if sink is not None:
        changes["smtp"] = sink.settings()
    return dataclasses.replace(SETTINGS, **changes)


SEARCH_ATTRIBUTES: list[SearchAttributeKey[Any]] = [
    STAGE_KEY,
    DOMAIN_KEY,
    REFERRER_KEY,
    REFERRER_EMAIL_KEY,  # still set by referrals started before release 0.3
    PRODUCT_KEY,
    SLA_KEY,
    PROTECTED_KEY,
]


def signed(referral_id: str, request: StaffAction) -> StaffAction:
    """`request` as the run's surface sends it: with a request id, signed."""
    if request.request_id is None:
        request = request.model_copy(update={"request_id": f"test-{uuid.uuid4()}"})
    assert SETTINGS.actor_signing_key is not None
    return SETTINGS.actor_signing_key.sign(referral_id, request)
