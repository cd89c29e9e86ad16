"""A webhook endpoint that takes connections and never answers, and a backlog for it.

The endpoint reads each request to its end and then says nothing, so every attempt holds a
webhook slot until the sender's own timeout: the worst an endpoint can do. It counts what it
was sent, because the circuit breaker's promise is about that number (a few requests, not
one per pending message).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import yaml
from sqlalchemy.engine import Engine
from sqlmodel import Session

from activities.db import WebhookDeliveryRow
from activities.queries import load_referral
from activities.webhooks import PENDING, delivery_id, message

# The events the suite's lifecycle records (docs/webhooks.md's table): one message each.
LIFECYCLE_EVENTS = (
    "referral.submitted",
    "referral.contacted",
    "referral.accepted",
    "referral.approved",
    "referral.won",
    "commission.payable",
    "commission.paid",
)
BACKLOG_KEY = "backlog"


class BlackholeEndpoint:
    """HTTP on loopback that accepts, reads, and never writes a byte back."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.connections = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hooks/referrals"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:  # one connection may carry several requests (keep-alive)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.partition(b":")[2])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                self.requests += 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the sender gave up waiting and closed
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def write_program(source: Path, target: Path, url: str) -> Path:
    """`source`'s program with one webhook: `url`, subscribed to the lifecycle's events."""
    program = yaml.safe_load(source.read_text(encoding="utf-8"))
    program["webhooks"] = [
        {
            "url": url,
            "secret": new_secret(),
            "events": list(LIFECYCLE_EVENTS),
            "include_personal_data": False,
        }
    ]
    target.write_text(yaml.safe_dump(program, allow_unicode=True), encoding="utf-8")
    return target


def enqueue_backlog(
    engine: Engine, referral_ids: list[str], url: str, per_referral: int
) -> list[WebhookDeliveryRow]:
    """Messages pending for `url` from before the run: outbox rows as the product writes
    them (its message of each referral's submission, under keys of their own), returned for
    their delivery workflows to be started as `record_referral` starts them."""
    now = datetime.now(UTC)
    rows = []
    for referral_id in referral_ids:
        state = load_referral(engine, referral_id)
        assert state is not None and state.history, f"{referral_id} is not recorded"
        payload = json.dumps(message("referral.submitted", state.history[0], state))
        for number in range(per_referral):
            key = f"{referral_id}/{BACKLOG_KEY}-{number}"
            rows.append(
                WebhookDeliveryRow(
                    id=delivery_id(key, url),
                    event_key=key,
                    event_type="referral.submitted",
                    referral_id=referral_id,
                    endpoint_url=url,
                    payload=payload,
                    status=PENDING,
                    created_at=now,
                    updated_at=now,
                )
            )
    with Session(engine, expire_on_commit=False) as session:
        session.add_all(rows)
        session.commit()
    return rows
