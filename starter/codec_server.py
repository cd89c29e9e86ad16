"""The codec server: an operator who holds the key reads referral payloads decoded, in the
Temporal UI (`--ui-codec-endpoint`) and with `temporal workflow show --codec-endpoint`.

It answers `POST /decode` and `POST /encode` with the payloads in Temporal's JSON form.
Browsers get an answer only from the Temporal UI's origin (CORS); bound beyond loopback it
also demands a bearer token, since whoever reaches it can decrypt.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from temporalio.api.common.v1 import Payloads

from core.encryption import EncryptionCodec

TOKEN_ENV = "REFERRALS_CODEC_TOKEN"
ORIGINS_ENV = "REFERRALS_CODEC_ORIGINS"
DEFAULT_ORIGINS = ("http://127.0.0.1:8233", "http://localhost:8233")
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

    @app.options("/{path:path}")
    async def preflight(request: Request, path: str) -> Response:
        if request.headers.get("origin") not in origins:
            return Response(status_code=403)
        return cors(request, Response(status_code=204))

    return app


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def codec_app_from_env(host: str) -> FastAPI:
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not loopback(host):
        raise CodecServerError(
            f"the codec server decrypts for whoever reaches it: bound to {host}, it needs "
            f"a bearer token in {TOKEN_ENV}"
        )
    configured = os.environ.get(ORIGINS_ENV)
    origins = (
        tuple(o.strip().rstrip("/") for o in configured.split(",") if o.strip())
        if configured
        else DEFAULT_ORIGINS
    )
    return create_codec_app(EncryptionCodec(), origins=origins, token=token)


def run_codec_server(host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(codec_app_from_env(host), host=host, port=port, log_level="warning")
