"""Real servers on loopback, from the installed binaries (nothing is downloaded): a Temporal
dev server, an SMTP sink that keeps a Maildir, an ASGI app in this event loop, and `referrals
web` in its own process."""

from __future__ import annotations

import asyncio
import mailbox
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from temporalio.testing import WorkflowEnvironment

from core.settings import SmtpSettings
from devstack.ports import free_port
from devstack.settings import BIN, ROOT, SEARCH_ATTRIBUTES, converter

# A deleted workflow is gone once the transfer queue's acknowledged level passes the deletion,
# which the server moves every 30 s by default: a test waiting for a deletion (erasure) waited
# that long, and past its limit when the suite loaded the server.
PROMPT_DELETION = 'history.transferProcessorUpdateAckInterval="1s"'


@asynccontextmanager
async def dev_server(
    *dynamic_config: str, search_attributes: bool = True
) -> AsyncIterator[WorkflowEnvironment]:
    """A dev server of its own (in memory), with the contract's search attributes unless told
    otherwise, and `dynamic_config` values (`key=value`) besides PROMPT_DELETION."""
    env = await WorkflowEnvironment.start_local(
        port=free_port(),  # never one handed out for another server of the run
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES if search_attributes else (),
        data_converter=converter(),
        dev_server_extra_args=[
            arg
            for value in (PROMPT_DELETION, *dynamic_config)
            for arg in ("--dynamic-config-value", value)
        ],
    )
    try:
        yield env
    finally:
        await env.shutdown()


@dataclass
class MailSink:
    """A real SMTP server on loopback that keeps what it receives in a Maildir."""

    host: str
    port: int
    maildir: Path
    # Each message parsed once: the session's sink holds every test's mail, and a bench's
    # thousands, so parsing them all again on every poll would cost seconds a poll.
    _parsed: dict[str, EmailMessage] = field(default_factory=dict, repr=False, compare=False)

    def _delivered(self) -> list[EmailMessage]:
        """Every message, oldest first (by the delivery time in the Maildir key, finer than
        the Date header's second)."""
        box = mailbox.Maildir(self.maildir, create=False)

        def delivered(key: str) -> tuple[int, ...]:
            found = re.match(r"(\d+)\.M(\d+)P\d+Q(\d+)", key)
            return tuple(int(n) for n in found.groups()) if found else ()

        for key in box.keys():
            if key not in self._parsed:
                parsed = message_from_bytes(box.get_bytes(key), policy=policy.default)
                if isinstance(parsed, EmailMessage):
                    self._parsed[key] = parsed
        return [self._parsed[key] for key in sorted(self._parsed, key=delivered)]

    def messages(self) -> list[EmailMessage]:
        return self._delivered()

    def settings(self) -> SmtpSettings:
        return SmtpSettings(host=self.host, port=self.port)

    def sign_in_links(self, to: str) -> list[str]:
        """The paths (with query) of the sign-in links emailed to `to`, oldest first."""
        links = []
        for message in self._delivered():
            if str(message["To"]).lower() != to.lower():
                continue
            body = message.get_body(("plain",))
            text = body.get_content() if body is not None else ""
            for url in re.findall(r"https?://\S+/sign-in/\S+", text):
                links.append(f"{urlsplit(url).path}?{urlsplit(url).query}")
        return links


REFERRALS = str(BIN / "referrals")


@asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """`app` on a loopback port (uvicorn, in this event loop); its base URL while it runs."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the server stopped"
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@asynccontextmanager
async def referrals_web(workdir: Path, ready: str, **settings: str) -> AsyncIterator[str]:
    """`referrals web` as its own process, with `settings` added to its environment; the base
    URL once `ready` answers 200."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REFERRALS_DEV_MAILDIR", "TEMPORAL_PROFILE", "TEMPORAL_CONFIG_FILE")
    }
    env.update(
        {
            "REFERRALS_PROGRAM": str(ROOT / "program.yaml"),
            "REFERRALS_PUBLIC_URL": base,
            "REFERRALS_SECRET_KEY": "browser-test-secret-" + "x" * 32,
            **settings,
        }
    )
    log_path = workdir / "web.log"
    with log_path.open("wb") as log:
        # Asynchronously, so the in-process worker keeps serving while the server runs.
        process = await asyncio.create_subprocess_exec(
            REFERRALS, "web", "--host", "127.0.0.1", "--port", str(port),
            env=env, cwd=workdir, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            async with httpx.AsyncClient(timeout=2) as http:
                while True:
                    if process.returncode is not None:
                        raise RuntimeError(f"referrals web exited early:\n{log_path.read_text()}")
                    try:
                        if (await http.get(f"{base}{ready}")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"referrals web never answered {ready}:\n{log_path.read_text()}"
                        )
                    await asyncio.sleep(0.2)
            yield base
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), timeout=10)
                except TimeoutError:
                    process.kill()
                    await process.wait()
