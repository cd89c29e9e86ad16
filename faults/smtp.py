"""A real SMTP server on loopback whose behaviour the scenarios switch while the worker sends.

It keeps every message it accepts, raw, so duplicates are judged by what a mailbox would hold
(one delivery per Message-ID), not by what the product believes it sent. A message counts as
delivered only when DATA is answered 250: a 4xx/5xx answer or a dropped connection means
the sender still owns it, exactly as for a real mail exchanger.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class Mode(enum.Enum):
    ACCEPT = "accept"
    TEMPFAIL_RCPT = "451 on RCPT"
    TEMPFAIL_DATA = "451 on DATA"


@dataclass(frozen=True)
class Delivery:
    """One accepted message, as received."""

    raw: bytes
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str
    idempotency_key: str
    referral_id: str
    at: float


@dataclass
class Replies:
    """What the server answered, so a scenario can prove its fault was really exercised."""

    tempfail: int = 0
    rejected: int = 0


class _Handler:
    def __init__(self, server: RecordingSmtpServer) -> None:
        self._server = server

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        server = self._server
        if address.lower() in server.rejected_addresses:
            server.replies.rejected += 1
            return "550 5.1.1 mailbox unavailable (refused by the fault suite)"
        if server.mode is Mode.TEMPFAIL_RCPT:
            server.replies.tempfail += 1
            return "451 4.3.0 try again later (fault suite)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_QUIT(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        return self._server.quit_reply(smtp) or "221 Bye"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        server = self._server
        if server.mode is Mode.TEMPFAIL_DATA:
            server.replies.tempfail += 1
            return "451 4.3.0 try again later (fault suite)"
        await server.gate.wait()
        if smtp.transport is None or smtp.transport.is_closing():
            return "451 4.3.0 sender went away"  # never reaches anyone: not accepted
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        server.record(raw, envelope)
        # The 250 below is written before any other task runs: whatever a hook does, the
        # sender learns that this message was accepted.
        hooks, server.on_delivery = server.on_delivery, []
        for hook in hooks:
            try:
                hook(smtp)
            except Exception as error:  # never turn a fault hook into an SMTP refusal
                server.hook_errors.append(f"{type(error).__name__}: {error}")
        return "250 Message accepted for delivery"


class RecordingSmtpServer:
    """Runs on the harness's event loop, so a scenario can switch its behaviour between two
    SMTP commands of the same session; `start()` after `stop()` listens on the same port,
    where the worker is configured to find it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.mode = Mode.ACCEPT
        self.rejected_addresses: set[str] = set()
        self.replies = Replies()
        self.deliveries: list[Delivery] = []
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[SMTP] = set()
        self._handler = _Handler(self)
        # Cleared, the server holds every DATA reply: a message is then neither accepted nor
        # refused, so a sender killed meanwhile provably did not get it through.
        self.gate = asyncio.Event()
        self.gate.set()
        # Called once, synchronously, as the next message is accepted (before its 250), with
        # the session that is accepting it.
        self.on_delivery: list[Callable[[SMTP], object]] = []
        self._quit_refused: set[SMTP] = set()
        self._closing: list[asyncio.AbstractServer] = []
        self.hook_errors: list[str] = []

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        while self._closing:
            await self._closing.pop().wait_closed()
        loop = asyncio.get_running_loop()

        def protocol() -> SMTP:
            return _TrackedSMTP(self._handler, self._sessions, hostname="faults.invalid")

        self._server = await loop.create_server(protocol, self.host, self.port, reuse_address=True)

    def stop_now(self, accepting: SMTP | None = None) -> None:
        """Shut down as RFC 5321 3.8 has a server do it: stop listening, and answer the next
        command of an open session with 421. The session `accepting` a message right now
        gets its 250 first, then 421 to its QUIT; every other session is cut. Synchronous,
        so it can run as a delivery hook."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._closing.append(server)
        for session in list(self._sessions):
            if session is accepting:
                self._quit_refused.add(session)
                continue
            transport = session.transport
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]

    async def stop(self) -> None:
        self.stop_now()
        while self._closing:
            await self._closing.pop().wait_closed()

    def quit_reply(self, session: SMTP) -> str | None:
        if session in self._quit_refused:
            self._quit_refused.discard(session)
            return "421 4.3.2 Service shutting down, closing transmission channel"
        return None

    def record(self, raw: bytes, envelope: Envelope) -> None:
        parsed = message_from_bytes(raw, policy=policy.default)
        self.deliveries.append(
            Delivery(
                raw=raw,
                mail_from=str(envelope.mail_from or ""),
                rcpt_tos=tuple(envelope.rcpt_tos),
                message_id=str(parsed.get("Message-ID", "")).strip(),
                idempotency_key=str(parsed.get("X-Idempotency-Key", "")).strip(),
                referral_id=str(parsed.get("X-Referral-Id", "")).strip(),
                at=time.time(),
            )
        )

    def deliveries_by_message_id(self) -> Counter[str]:
        return Counter(d.message_id for d in self.deliveries)


class _TrackedSMTP(SMTP):
    """Remembers its live sessions so `stop()` can cut them (asyncio 3.11 servers cannot)."""

    def __init__(self, handler: Any, sessions: set[SMTP], **options: Any) -> None:
        super().__init__(handler, **options)
        self._live = sessions

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._live.discard(self)
        super().connection_lost(error)
