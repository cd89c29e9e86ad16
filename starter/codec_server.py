"""The codec server: an operator who holds the key reads referral payloads decoded, in the
Temporal UI (`--ui-codec-endpoint`) and with `temporal workflow show --codec-endpoint`.

It answers `POST /decode` and `POST /encode` with the payloads in Temporal's JSON form.
Whoever reaches it can decrypt, so every caller presents a bearer token: the static one in
REFERRALS_CODEC_TOKEN (the CLI's `--codec-auth`), or the access token a Temporal UI forwards,
a JWT checked against its identity provider's key set, issuer and audience. Only the dev
stack's own codec server, on loopback with the dev key file, answers without one. Browsers get
an answer only from the Temporal UI's origin (CORS).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import jwt
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from temporalio.api.common.v1 import Payloads

from core.logs import configure_logging
from core.settings import (
    CODEC_AUDIENCE_ENV,
    CODEC_ISSUER_ENV,
    CODEC_JWKS_URL_ENV,
    AccessTokenIssuer,
    Need,
    Settings,
    loopback,
)
from core.temporal import EncryptionCodec, payload_codec

TOKEN_ENV = "REFERRALS_CODEC_TOKEN"
ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization"
# Signatures by a private key only: a symmetric (HS*) or unsigned (`none`) token would prove
# nothing the key set can check.
ACCESS_TOKEN_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
CLOCK_LEEWAY_S = 30  # the codec server's clock and the identity provider's may differ a little
KEY_SET_LIFESPAN_S = 300  # the key set is read again after this, to follow key rotations
# A token naming a key the set lacks re-reads it at most once in this time, so tokens with
# made-up key ids cannot make the codec server hammer the identity provider.
UNKNOWN_KEY_REFETCH_S = 60
KEY_SET_TIMEOUT_S = 10

log = logging.getLogger(__name__)


class CodecServerError(Exception):
    """The codec server would be unsafe to start as configured."""


class KeySetUnavailable(Exception):
    """The identity provider's key set cannot be read: no access token can be checked."""


class AccessTokenCheck:
    """Checks the access token a Temporal UI forwards: a JWT signed by a key of the issuer's
    key set (the one its `kid` names) with an asymmetric algorithm, naming the issuer and the
    audience, and not expired."""

    def __init__(self, issuer: AccessTokenIssuer) -> None:
        self.issuer = issuer
        self.key_set = jwt.PyJWKClient(
            issuer.jwks_url,
            lifespan=KEY_SET_LIFESPAN_S,
            timeout=KEY_SET_TIMEOUT_S,
            cooldown_duration=UNKNOWN_KEY_REFETCH_S,
        )

    async def refusal(self, token: str) -> str | None:
        """Why `token` is refused, in one line; None when it is good. Raises KeySetUnavailable
        when the key set cannot be read."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            return "bearer token not recognised (neither the codec token nor a JWT)"
        algorithm = header.get("alg")
        if algorithm not in ACCESS_TOKEN_ALGORITHMS:
            return f"token algorithm {algorithm} not accepted"
        key_id = header.get("kid")
        if not isinstance(key_id, str) or not key_id:
            return "token names no signing key (kid)"
        # The key set may have to be fetched: urllib, in a thread, off the event loop.
        key = await asyncio.to_thread(self.signing_key, key_id)
        if key is None:
            return "token signed by an unknown key"
        try:
            jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer.issuer,
                audience=self.issuer.audience,
                leeway=CLOCK_LEEWAY_S,
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            return "token expired"
        except jwt.InvalidAudienceError:
            return "token for another audience"
        except jwt.InvalidIssuerError:
            return "token from another issuer"
        except jwt.InvalidSignatureError:
            return "token signature does not verify"
        except jwt.MissingRequiredClaimError as error:
            return f"token has no {error.claim} claim"
        except jwt.ImmatureSignatureError:
            return "token not valid yet"
        except jwt.InvalidAlgorithmError:
            return f"token algorithm {algorithm} is not its key's"
        except jwt.InvalidKeyError:
            return "token signed by a key too short"
        except jwt.InvalidTokenError:
            return "malformed token"
        return None

    def signing_key(self, key_id: str) -> jwt.PyJWK | None:
        """The key set's key `key_id` (cached; an unknown id re-reads the set, within
        UNKNOWN_KEY_REFETCH_S), or None when the set has no such key. Blocks: run in a thread."""
        try:
            return self.key_set.get_signing_key(key_id)
        except (jwt.PyJWKClientConnectionError, jwt.PyJWKSetError, ValueError) as error:
            log.warning("cannot read the key set at %s: %s", self.issuer.jwks_url, error)
            raise KeySetUnavailable(
                "cannot read the identity provider's key set: no token can be checked"
            ) from error
        except jwt.PyJWKClientError:
            return None


def create_codec_app(
    codec: EncryptionCodec,
    *,
    origins: tuple[str, ...],
    token: str | None,
    access_tokens: AccessTokenCheck | None = None,
) -> FastAPI:
    """The codec server's app; with neither `token` nor `access_tokens` it asks no credential
    (`codec_app_from_settings` allows that only to the dev stack)."""
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

    def unauthorized(request: Request, reason: str) -> Response:
        """401 with the reason, readable by the UI's page (CORS) so it can show it."""
        return cors(request, JSONResponse({"detail": reason}, status_code=401))

    async def refused(request: Request) -> Response | None:
        origin = request.headers.get("origin")
        if origin is not None and origin not in origins:
            return JSONResponse({"detail": "origin not allowed"}, status_code=403)
        if token is None and access_tokens is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return unauthorized(request, "bearer token required")
        if token is not None and secrets.compare_digest(given.encode(), token.encode()):
            return None
        if access_tokens is None:
            return unauthorized(request, "wrong bearer token")
        try:
            reason = await access_tokens.refusal(given)
        except KeySetUnavailable as error:
            return cors(request, JSONResponse({"detail": str(error)}, status_code=503))
        return None if reason is None else unauthorized(request, reason)

    async def convert(request: Request, decode: bool) -> Response:
        problem = await refused(request)
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


def dev_stack_codec_server(settings: Settings, host: str) -> bool:
    """`referrals dev`'s own codec server, whose Temporal UI sends no token: the key ring is
    the dev stack's key file (it seals only the local stack's data) and only this machine
    reaches it."""
    return Need.ENCRYPTION.value in settings.from_dev_files and loopback(host)


def codec_app_from_settings(settings: Settings, host: str) -> FastAPI:
    """The codec server for these settings' key ring, bound to `host`."""
    settings.require(Need.ENCRYPTION)
    issuer = settings.codec_token_issuer
    if (
        settings.codec_token is None
        and issuer is None
        and not dev_stack_codec_server(settings, host)
    ):
        raise CodecServerError(
            f"the codec server decrypts for whoever reaches it (bound to {host}): it needs a "
            f"bearer token in {TOKEN_ENV} (or {TOKEN_ENV}_FILE), or {CODEC_JWKS_URL_ENV}, "
            f"{CODEC_ISSUER_ENV} and {CODEC_AUDIENCE_ENV} to check the Temporal UI's access "
            "tokens; only the dev stack's (its key file, on loopback) runs without"
        )
    return create_codec_app(
        payload_codec(settings),
        origins=settings.codec_origins,
        token=settings.codec_token,
        access_tokens=AccessTokenCheck(issuer) if issuer is not None else None,
    )


def run_codec_server(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    configure_logging(settings)
    app = codec_app_from_settings(settings, host)
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None)
