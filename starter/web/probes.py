"""The probes an orchestrator calls (docs/deploy.md): liveness says only that the process
answers; readiness, and the older `/healthz`, that the database and Temporal answer too;
readiness also that the process can sign receipts (its key ring opens the receipt key)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from activities.receipts import signing_answers
from core.health import database_answers, temporal_answers
from starter.web.deps import SiteDep
from starter.web.site import Site

router = APIRouter()


async def _temporal(site: Site) -> str:
    try:
        client = await site.temporal()
    except Exception as error:  # noqa: BLE001 - cannot even connect
        return f"unavailable: {type(error).__name__}"
    return await temporal_answers(client)


async def _database(site: Site) -> str:
    return await database_answers(site.engine)


async def _receipts(site: Site) -> str:
    if site.settings.encryption_keys is None:  # signs with what this process was given
        return "ok"
    return await signing_answers(site.engine)


PROBES: dict[str, Callable[[Site], Awaitable[str]]] = {
    "temporal": _temporal,
    "database": _database,
    "receipts": _receipts,
}


async def checked(site: Site, *checks: str) -> JSONResponse:
    """Each of `checks` (temporal, database, receipts): "ok" or why not; 503 unless all are
    ok."""
    results = dict(
        zip(checks, await asyncio.gather(*(PROBES[name](site) for name in checks)), strict=True)
    )
    healthy = all(v == "ok" for v in results.values())
    return JSONResponse(
        {"status": "ok" if healthy else "unavailable", **results},
        status_code=200 if healthy else 503,
    )


@router.get("/livez", summary="Liveness: the process answers (restart it if not)")
async def livez() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: the database and Temporal answer, receipts can be signed (send traffic)",
)
async def readyz(site: SiteDep) -> JSONResponse:
    return await checked(site, "database", "temporal", "receipts")


@router.get("/healthz", summary="Health: Temporal and the database")
async def healthz(site: SiteDep) -> JSONResponse:
    return await checked(site, "temporal", "database")
