"""A TCP proxy between the worker and PostgreSQL that the suite can cut and restore.

Cutting closes every proxied connection mid-stream and stops listening, so the worker sees
what a database host going away looks like: pooled connections die, new ones are refused.
Only the worker goes through it; the harness reads the database directly, so its checks
never depend on the fault.
"""

from __future__ import annotations

import asyncio
import contextlib


class CuttableProxy:
    def __init__(
        self, listen_host: str, listen_port: int, target_host: str, target_port: int
    ) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.connections_cut = 0
        self._server: asyncio.AbstractServer | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._closing: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.listen_host, self.listen_port, reuse_address=True
        )

    def cut_now(self) -> None:
        """Refuse new connections and drop every open one (no goodbye to either side).
        Synchronous, so it can land between two steps of something else on the loop."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            self._closing.append(server)
        for client, upstream in list(self._links):
            self.connections_cut += 1
            client.transport.abort()
            upstream.transport.abort()
        self._links.clear()

    async def cut(self) -> None:
        self.cut_now()
        while self._closing:
            await self._closing.pop().wait_closed()

    @property
    def is_cut(self) -> bool:
        return self._server is None

    async def restore(self) -> None:
        if self._server is None:
            while self._closing:
                await self._closing.pop().wait_closed()
            await self.start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if self._server is None:  # cut while this connection was being set up
            up_writer.transport.abort()
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        pipes = {
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        }
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            self._links.discard(link)
            writer.transport.abort()
            up_writer.transport.abort()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """PostgreSQL never half-closes, so the end of either direction ends the link."""
    with contextlib.suppress(ConnectionError, OSError):
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()
