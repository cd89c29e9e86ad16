"""The intake under load: `POST /api/referrals` from concurrent clients against `referrals web`
as it is served (its own process), while the worker runs what it starts."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import httpx

from devstack.factories import submission_data


@dataclass
class IntakeRun:
    posts: int
    seconds: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    errors: dict[int, int] = field(default_factory=dict)  # status (0: no answer) -> count

    @property
    def per_second(self) -> float:
        return self.posts / self.seconds


async def post_referrals(base: str, posts: int, clients: int = 20) -> IntakeRun:
    """`posts` submissions, each for a new prospect, shared out among `clients` connections
    that each send one after the other; anything but 201 counts as an error."""
    run = IntakeRun(posts)
    left = iter(range(posts))

    async def client() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            for _ in left:
                body = submission_data(**{"prospect.website": f"i-{uuid.uuid4().hex[:10]}.example"})
                started = time.perf_counter()
                try:
                    status = (await http.post("/api/referrals", json=body)).status_code
                except httpx.HTTPError:
                    status = 0
                run.latency_ms.append((time.perf_counter() - started) * 1000)
                if status != 201:
                    run.errors[status] = run.errors.get(status, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    run.seconds = time.perf_counter() - started
    return run
