"""Every stored history of every release replays on today's workflow code.

A change that broke one would break every referral in flight on that path; guard such
changes with `workflow.patched` (see docs/rollout.md). Sets live in
`tests/histories/<release>/` and are recorded by `make histories`; none is ever deleted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from core.encryption import KeyRing, new_key_entry
from core.temporal import EncryptionCodec, data_converter
from devstack.settings import ROOT
from worker import workflow_runner
from workflows.payout_run import PayoutRunWorkflow
from workflows.referral import ReferralWorkflow
from workflows.webhook_delivery import WebhookDeliveryWorkflow

HISTORIES = ROOT / "tests" / "histories"
# Sets recorded before a patch that has since been retired (docs/rollout.md): kept as the
# record of what ran, no longer replayed. None yet.
RETIRED: frozenset[str] = frozenset()
STORED = sorted(p for p in HISTORIES.glob("*/*.json") if p.parent.name not in RETIRED)
# The paths every set must hold, by the release that introduced them.
PATHS_SINCE: dict[str, set[str]] = {
    "0.1.0": {
        "full_lifecycle",
        "contact_sla_breach",
        "decline",
        "reject",
        "lost",
        "cancel_after_won",
        "temporal_cancellation",
        "refused_and_duplicated_signals",
    },
    "0.4.0": {
        "extension",
        "protection_expiry",
        "refund_before_payout",
        "refund_after_payout",
        "clawback_window_closed",
    },
    "0.5.0": {"webhook_delivered", "webhook_retried", "webhook_failed", "webhook_redelivered"},
    "0.9.0": {"payout_run_confirmed", "payout_run_failed_item", "payout_run_cancelled"},
}


def release(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split("."))


def recording_codec(folder: Path) -> EncryptionCodec:
    """The keys a set was recorded with (stored beside it, test keys only); sets recorded
    before encryption have none and their plain payloads decode as they are."""
    keys = folder / "encryption-keys"
    if not keys.exists():
        return EncryptionCodec(KeyRing.parse(new_key_entry(), "no key needed"))
    return EncryptionCodec(KeyRing.parse(keys.read_text(encoding="utf-8"), str(keys)))


@pytest.mark.parametrize("path", STORED, ids=[f"{p.parent.name}/{p.stem}" for p in STORED])
async def test_stored_history_replays(path: Path) -> None:
    replayer = Replayer(
        workflows=[ReferralWorkflow, WebhookDeliveryWorkflow, PayoutRunWorkflow],
        workflow_runner=workflow_runner(),
        data_converter=data_converter(recording_codec(path.parent)),
    )
    history = WorkflowHistory.from_json(path.stem, path.read_text(encoding="utf-8"))
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.parent.name}/{path.name}: {result.replay_failure}"


def test_every_set_covers_every_path() -> None:
    sets = sorted(p for p in HISTORIES.iterdir() if p.is_dir())
    assert sets, "no stored histories"
    for folder in sets:
        paths = set().union(
            *(p for since, p in PATHS_SINCE.items() if release(since) <= release(folder.name))
        )
        missing = paths - {p.stem for p in folder.glob("*.json")}
        assert not missing, f"{folder.name} lacks {sorted(missing)}"
