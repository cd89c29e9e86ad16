"""The codec server: an operator who holds the key reads referral payloads decoded, in the
Temporal UI (`--ui-codec-endpoint`) and with `temporal workflow show --codec-endpoint`.

It answers `POST /decode` and `POST /encode` with the payloads in Temporal's JSON form.
Browsers get an answer only from the Temporal UI's origin (CORS); bound beyond loopback it
also demands a bearer token, since whoever reaches it can decrypt.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from temporalio.api.common.v1 import Payloads

from core.encryption import EncryptionCodec
from core.logs import configure_logging
from core.settings import Need, Settings, loopback
from core.temporal import payload_codec

TOKEN_ENV = "REFERRALS_CODEC_TOKEN"
ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization"


class CodecServerError(Exception):
    """The codec server would be unsafe to start as configured."""


def create_codec_app(
    codec: EncryptionCodec, *, origins: tuple[str, ...], token: str | None
) -> FastAPI:
    app = FastAPI(title="Referral Desk codec server", docs_url=None, redoc_url=None)

    def cors(request: Request, response: Response) -> Response:
        origin = request.headers.get("origin")
        if origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            response.headers["Vary"] = "Origin"
        return response

    def refused(request: Request) -> Response | None:
        origin = request.headers.get("origin")
        if origin is not None and origin not in origins:
            return JSONResponse({"detail": "origin not allowed"}, status_code=403)
        if token is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return cors(request, JSONResponse({"detail": "bearer token required"}, 401))
        return None

    async def convert(request: Request, decode: bool) -> Response:
        problem = refused(request)
        if problem is not None:
            return problem
        try:
            body: Any = await request.json()
            payloads = ParseDict(body, Payloads()).payloads
        except (ValueError, ParseError):
            return cors(request, JSONResponse({"detail": 'expected {"payloads": [...]}'}, 400))
        try:
            done = await (codec.decode(payloads) if decode else codec.encode(payloads))
        except Exception as error:  # noqa: BLE001 - a wrong key or a damaged payload
            return cors(request, JSONResponse({"detail": str(error)}, status_code=422))
        return cors(request, JSONResponse(MessageToDict(Payloads(payloads=done))))

    @app.post("/decode")
    async def decode(request: Request) -> Response:
        return await convert(request, decode=True)

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        return await convert(request, decode=False)

    @app.get("/livez")
    async def livez() -> JSONResponse:
        """Liveness, for the orchestrator: no token needed, nothing decoded."""
        return JSONResponse({"status": "ok"})

    @app.options("/{path:path}")
    async def preflight(request: Request, path: str) -> Response:
        if request.headers.get("origin") not in origins:
            return Response(status_code=403)
        return cors(request, Response(status_code=204))

    return app


def codec_app_from_settings(settings: Settings, host: str) -> FastAPI:
    """The codec server for these settings' key ring, bound to `host`."""
    settings.require(Need.ENCRYPTION)
    if settings.codec_token is None and not loopback(host):
        raise CodecServerError(
            f"the codec server decrypts for whoever reaches it: bound to {host}, it needs "
            f"a bearer token in {TOKEN_ENV} (or {TOKEN_ENV}_FILE)"
        )
    return create_codec_app(
        payload_codec(settings), origins=settings.codec_origins, token=settings.codec_token
    )


def run_codec_server(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    configure_logging(settings)
    app = codec_app_from_settings(settings, host)
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None)
