"""Loopback ports for the servers a run starts."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_HANDED_OUT: set[int] = set()


def _ephemeral_start() -> int:
    """Where the system's ephemeral ports (those `bind(0)` hands out) begin."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Below the ephemeral range and above the usual services' ports.
PORTS = range(20_000, max(20_001, min(_ephemeral_start(), 32_768)))


def take_share(index: int, count: int) -> None:
    """Processes that start servers side by side (the test suite's parallel workers) each
    take a slice of the ports of their own, so no two hand out the same port."""
    global PORTS
    size = len(PORTS) // count
    PORTS = range(PORTS.start + index * size, PORTS.start + (index + 1) * size)


def free_port() -> int:
    """A loopback port nothing listens on, never the same one twice, and never one the system
    can give someone else meanwhile: a port handed out is bound only later, by a server that
    starts after other servers, and a Temporal dev server binds its internal services to
    ports the system picks as it starts (once one of them took the web app's port). So the
    port comes from below the ephemeral range, where the system picks none."""
    start = random.randrange(len(PORTS))
    for offset in range(len(PORTS)):
        port = PORTS[(start + offset) % len(PORTS)]
        if port in _HANDED_OUT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {PORTS.start}-{PORTS.stop - 1}")
