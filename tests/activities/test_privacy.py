"""Personal data never sits readable in Temporal: after a whole lifecycle, the raw history
(as anyone who can read the namespace sees it, without the key) holds no name, address or
phone of the referrer or the prospect's contact, while staff read them all."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from activities.receipts import referrer_copy
from devstack.factories import submission_data
from devstack.ports import free_port
from devstack.settings import BIN
from tests.conftest import Cli, Live, eventually

PERSONAL = submission_data()
SECRETS = [
    PERSONAL["referrer"]["name"],
    PERSONAL["referrer"]["email"],
    PERSONAL["referrer"]["phone"],
    PERSONAL["contact"]["name"],
    PERSONAL["contact"]["email"],
    PERSONAL["contact"]["phone"],
]


async def temporal_show(live: Live, referral_id: str, *options: str) -> str:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "temporal"),
        "workflow",
        "show",
        "--workflow-id",
        referral_id,
        "--address",
        live.address,
        "--output",
        "json",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


def everything_readable(raw: str) -> str:
    """The history's JSON with every payload's base64 data and metadata decoded beside it."""
    found: list[str] = [raw]

    def decode(value: str) -> None:
        try:
            found.append(base64.b64decode(value).decode("utf-8", "replace"))
        except ValueError:
            pass

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "data" and isinstance(value, str):
                    decode(value)
                elif key == "metadata" and isinstance(value, dict):
                    for encoded in value.values():
                        decode(encoded)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(raw))
    return "\n".join(found)


async def test_the_raw_history_holds_no_personal_data(cli: Cli, live: Live, tmp_path: Path) -> None:
    data = submission_data(**{"prospect.website": f"https://private-{uuid.uuid4().hex[:8]}.fr"})
    path = tmp_path / "referral.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    rid = (await cli("submit", str(path))).out.strip()
    for command, *options in [
        ("contacted", "--note", "phoned the referrer"),
        ("accept",),
        ("approve",),
        ("won", "--amount", "180000", "--currency", "EUR"),
        ("payment", "--amount", "100000", "--reference", "INV-1"),
        ("payment", "--amount", "80000", "--reference", "INV-2"),
        ("payout", "--reference", "VIR-1"),
    ]:
        done = await cli(command, rid, *options)
        assert done.code == 0, done
    await live.client.get_workflow_handle(rid).result()

    raw = await temporal_show(live, rid)
    readable = everything_readable(raw)
    assert "workflowExecutionCompletedEventAttributes" in raw
    assert "binary/encrypted" in readable
    leaks = [secret for secret in SECRETS if secret in readable]
    assert leaks == [], f"readable in the raw history: {leaks}"
    # Nor does its receipt enter Temporal: no salt, commitment or signature, even decoded.
    copy = referrer_copy(live.engine, rid)
    assert copy is not None
    receipt_secrets = [
        *(shown["salt"] for shown in copy["disclosures"].values()),
        *copy["commitments"].values(),
        copy["sig"],
    ]
    assert not [secret for secret in receipt_secrets if secret in readable]
    description = await live.client.get_workflow_handle(rid).describe()
    summary = await description.static_summary() or ""
    assert PERSONAL["referrer"]["name"] not in summary and "CloudSuite" in summary
    attributes = json.dumps({k: str(v) for k, v in description.search_attributes.items()})
    assert not [secret for secret in SECRETS if secret in attributes]

    shown = json.loads((await cli("show", rid, "--json")).out)  # staff read everything
    assert shown["referrer"]["email"] == PERSONAL["referrer"]["email"]
    assert shown["contact"]["phone"] == PERSONAL["contact"]["phone"]

    # An operator with the key reads the same history in the clear through the codec server.
    port = free_port()
    codec = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "starter.cli", "codec-server", "--port", str(port),
        env={**os.environ, "REFERRALS_CODEC_TOKEN": "operator-token"},
    )  # fmt: skip
    try:

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True

        await eventually(listening)
        decoded = await temporal_show(
            live, rid, "--codec-endpoint", f"http://127.0.0.1:{port}",
            "--codec-auth", "Bearer operator-token",
        )  # fmt: skip
    finally:
        codec.terminate()
        await codec.wait()
    assert PERSONAL["contact"]["name"] in everything_readable(decoded)
    assert not [secret for secret in receipt_secrets if secret in everything_readable(decoded)]

    # Operations find a referrer's referrals by the keyed hash `referrals list` computes.
    listed = await cli("list", "--referrer", PERSONAL["referrer"]["email"])
    key = listed.out.strip().splitlines()[-1].split("'")[1]
    query = f"ReferrerKey = '{key}' AND WorkflowId = '{rid}'"

    async def found() -> bool:
        return [wf.id async for wf in live.client.list_workflows(query)] == [rid]

    await eventually(found, 30)
