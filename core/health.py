"""Probes for a process that has no web app of its own (the worker): `GET /livez` answers 200
while the process runs; `GET /readyz` answers 200 when every check says "ok", else 503, with
each check's answer as JSON. Served on REFERRALS_HEALTH_PORT (REFERRALS_HEALTH_HOST, all
interfaces by default: a kubelet probes the pod's address). They say nothing but "ok" or the
name of what failed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.engine import Engine
from temporalio.client import Client

Checks = Callable[[], Awaitable[dict[str, str]]]
READ_SECONDS = 5.0
CHECK_SECONDS = 3.0


async def temporal_answers(client: Client) -> str:
    """ "ok" when Temporal's frontend says it is serving, within CHECK_SECONDS."""
    try:
        serving = await client.service_client.check_health(timeout=timedelta(seconds=CHECK_SECONDS))
    except Exception as error:  # noqa: BLE001 - any failure is "unavailable"
        return f"unavailable: {type(error).__name__}"
    return "ok" if serving else "unavailable: not serving"


def _select_one(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


async def database_answers(engine: Engine) -> str:
    """ "ok" when the database answers a query within CHECK_SECONDS."""
    try:
        await asyncio.wait_for(asyncio.to_thread(_select_one, engine), CHECK_SECONDS)
    except Exception as error:  # noqa: BLE001 - any failure is "unavailable"
        return f"unavailable: {type(error).__name__}"
    return "ok"


class HealthServer:
    def __init__(self, checks: Checks) -> None:
        self._checks = checks
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._answer, host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_SECONDS)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, body = await self._respond(method, path.split("?", 1)[0])
            payload = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass  # not HTTP, or too slow: nothing to answer
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", {"status": "method not allowed"}
        if path == "/livez":
            return "200 OK", {"status": "ok"}
        if path == "/readyz":
            results = await self._checks()
            ready = all(value == "ok" for value in results.values())
            body = {"status": "ok" if ready else "unavailable", **results}
            return ("200 OK" if ready else "503 Service Unavailable"), body
        return "404 Not Found", {"status": "not found"}
