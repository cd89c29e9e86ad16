"""The codec server's credentials: the access token a Temporal UI forwards, checked against a
key set served over HTTP here as an identity provider serves its JWKS; the static token of the
CLI; and the refusal to decrypt for a caller with neither, on loopback too, but for the dev
stack's own codec server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.json_format import MessageToDict
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from temporalio.api.common.v1 import Payload, Payloads

from core.encryption import KEYS_ENV, new_key_entry
from core.settings import Settings, SettingsError, create_dev_files
from core.temporal import payload_codec
from devstack.ports import free_port
from devstack.servers import REFERRALS
from starter import codec_server
from starter.codec_server import CodecServerError, codec_app_from_settings
from tests.conftest import in_process

UI = "https://temporal.example.com"
ISSUER = "https://login.example.com/"
AUDIENCE = "https://temporal.example.com/codec"
STATIC_TOKEN = "operator-token"
REFERRER = "claire.martin@conseil-martin.example"
# Someone else's key: what a forger signs with.
STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
# What a token is signed with: a private key, or for HS256 a shared secret.
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | str


@dataclass
class IdentityProvider:
    """The key set served at `url` (as an identity provider's JWKS endpoint), and its keys."""

    url: str
    rsa_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    ec_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    published: list[dict[str, Any]] = field(default_factory=list)  # the JWKS's keys
    fetches: int = 0  # how often the key set was fetched
    delay_s: float = 0.0  # how long the server takes to answer

    def publish(self, kid: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"alg": "RS256"}
        else:
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"alg": "ES256"}
        self.published.append(jwk | {"kid": kid, "use": "sig"})

    def claims(self, **changes: Any) -> dict[str, Any]:
        """An access token's claims as the provider issues them; a change to None drops one."""
        now = int(time.time())
        usual = {"iss": ISSUER, "aud": AUDIENCE, "sub": "operator-1", "iat": now, "exp": now + 300}
        return {name: value for name, value in (usual | changes).items() if value is not None}

    def token(
        self,
        *,
        kid: str = "rsa-1",
        key: SigningKey | None = None,
        algorithm: str = "RS256",
        **changes: Any,
    ) -> str:
        signer = key or self.rsa_key
        return jwt.encode(self.claims(**changes), signer, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
def provider() -> Iterator[IdentityProvider]:
    """A real HTTP server on loopback serving the key set; it counts the fetches."""

    class KeySet(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            idp.fetches += 1
            time.sleep(idp.delay_s)
            body = json.dumps({"keys": idp.published}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), KeySet)
    idp = IdentityProvider(url=f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json")
    idp.publish("rsa-1", idp.rsa_key)
    idp.publish("ec-1", idp.ec_key)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield idp
    server.shutdown()
    server.server_close()


def bare_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("REFERRALS_", "TEMPORAL_"))}


def environment(**settings: str) -> dict[str, str]:
    """A codec server's environment: a key of its own, the UI's origin, and `settings`."""
    return {KEYS_ENV: new_key_entry(), "REFERRALS_CODEC_ORIGINS": UI, **settings}


def token_settings(jwks_url: str, **settings: str) -> Settings:
    return Settings.from_env(
        environment(
            REFERRALS_CODEC_JWKS_URL=jwks_url,
            REFERRALS_CODEC_ISSUER=ISSUER,
            REFERRALS_CODEC_AUDIENCE=AUDIENCE,
            **settings,
        )
    )


def referrer() -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(REFERRER).encode())


@dataclass
class Codec:
    client: httpx.AsyncClient
    body: dict[str, Any]  # a payload sealed with the server's key, as the UI posts it

    async def decode(self, token: str | None, origin: str | None = UI) -> httpx.Response:
        headers = {"X-Namespace": "referrals"}
        if origin is not None:
            headers["Origin"] = origin
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.client.post("/decode", json=self.body, headers=headers)


@asynccontextmanager
async def codec_in_process(settings: Settings, host: str = "127.0.0.1") -> AsyncIterator[Codec]:
    """The codec server these settings start, driven in process."""
    app = codec_app_from_settings(settings, host)
    sealed = await payload_codec(settings).encode([referrer()])
    async with in_process(app, base_url="http://codec") as client:
        yield Codec(client, MessageToDict(Payloads(payloads=sealed)))


def decoded_referrer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    [payload] = response.json()["payloads"]
    return str(json.loads(base64.b64decode(payload["data"])))


# --- the Temporal UI's access token -----------------------------------------------------------


async def test_an_access_token_of_the_identity_provider_decodes(
    provider: IdentityProvider,
) -> None:
    async with codec_in_process(token_settings(provider.url)) as codec:
        for token in [
            provider.token(),
            provider.token(kid="ec-1", key=provider.ec_key, algorithm="ES256"),
            provider.token(exp=int(time.time()) - 5),  # within the clocks' leeway
        ]:
            decoded = await codec.decode(token)
            assert decoded_referrer(decoded) == REFERRER
            assert decoded.headers["access-control-allow-origin"] == UI
    assert provider.fetches == 1  # the key set is kept, not fetched for each request


def unsigned(claims: dict[str, Any]) -> str:
    """A token with `alg: none` and no signature, as a forger would send it."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'kid': 'rsa-1', 'typ': 'JWT'})}.{part(claims)}."


def refused(name: str, make: Callable[[IdentityProvider], str | None], reason: str) -> Any:
    return pytest.param(make, reason, id=name)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        refused("missing", lambda idp: None, "bearer token required"),
        refused("expired", lambda idp: idp.token(exp=int(time.time()) - 120), "token expired"),
        refused("no expiry", lambda idp: idp.token(exp=None), "token has no exp claim"),
        refused(
            "another audience",
            lambda idp: idp.token(aud="https://other.example"),
            "token for another audience",
        ),
        refused(
            "another issuer",
            lambda idp: idp.token(iss="https://other.example/"),
            "token from another issuer",
        ),
        refused(
            "another key, same kid",
            lambda idp: idp.token(key=STRANGER),
            "token signature does not verify",
        ),
        refused(
            "another key, unknown kid",
            lambda idp: idp.token(kid="forged", key=STRANGER),
            "token signed by an unknown key",
        ),
        refused(
            "the key's algorithm not",
            lambda idp: idp.token(key=idp.ec_key, algorithm="ES256"),
            "token algorithm ES256 is not its key's",
        ),
        refused(
            "alg none",
            lambda idp: unsigned(idp.claims()),
            "token algorithm none not accepted",
        ),
        refused(
            "HS256",
            lambda idp: idp.token(key="a secret the codec server never shares", algorithm="HS256"),
            "token algorithm HS256 not accepted",
        ),
        refused(
            "no kid",
            lambda idp: jwt.encode(idp.claims(), idp.rsa_key, algorithm="RS256"),
            "token names no signing key (kid)",
        ),
        refused(
            "not a JWT",
            lambda idp: "s3cret",
            "bearer token not recognised (neither the codec token nor a JWT)",
        ),
    ],
)
async def test_a_token_that_fails_is_refused_saying_why(
    provider: IdentityProvider, make: Callable[[IdentityProvider], str | None], reason: str
) -> None:
    async with codec_in_process(token_settings(provider.url)) as codec:
        refused = await codec.decode(make(provider))
    assert refused.status_code == 401
    assert refused.json() == {"detail": reason}
    assert REFERRER not in refused.text
    # The UI's page may read the refusal, so it can show why.
    assert refused.headers["access-control-allow-origin"] == UI


async def test_an_unknown_key_refetches_the_key_set_at_most_once_a_while(
    provider: IdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codec_server, "UNKNOWN_KEY_REFETCH_S", 1.0)
    async with codec_in_process(token_settings(provider.url)) as codec:
        assert (await codec.decode(provider.token())).status_code == 200
        rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        provider.publish("rsa-2", rotated)  # the provider rotates a key in
        new = provider.token(kid="rsa-2", key=rotated)
        made_up = [provider.token(kid=f"made-up-{n}", key=STRANGER) for n in range(5)]
        for token in [new, *made_up]:  # within the pause after a fetch: no fetch
            assert (await codec.decode(token)).json()["detail"] == "token signed by an unknown key"
        assert provider.fetches == 1
        await asyncio.sleep(1.1)
        assert decoded_referrer(await codec.decode(new)) == REFERRER
        assert provider.fetches == 2
        for token in made_up:
            assert (await codec.decode(token)).status_code == 401
        assert provider.fetches == 2


async def test_fetching_the_key_set_leaves_the_server_answering(provider: IdentityProvider) -> None:
    provider.delay_s = 1.0  # a slow identity provider
    async with codec_in_process(token_settings(provider.url)) as codec:
        decoding = asyncio.create_task(codec.decode(provider.token()))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        assert (await codec.client.get("/livez")).status_code == 200
        assert time.monotonic() - started < 0.5 and not decoding.done()
        assert decoded_referrer(await decoding) == REFERRER


async def test_an_unreachable_key_set_is_a_503_that_says_so() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"
    token = jwt.encode({"iss": ISSUER}, STRANGER, algorithm="RS256", headers={"kid": "rsa-1"})
    async with codec_in_process(token_settings(nowhere)) as codec:
        unavailable = await codec.decode(token)
    assert unavailable.status_code == 503
    assert "key set" in unavailable.json()["detail"]
    assert unavailable.headers["access-control-allow-origin"] == UI


async def test_the_static_token_still_opens_it_for_the_cli(provider: IdentityProvider) -> None:
    both = token_settings(provider.url, REFERRALS_CODEC_TOKEN=STATIC_TOKEN)
    async with codec_in_process(both) as codec:
        # `temporal workflow show --codec-auth "Bearer …"` sends no Origin.
        assert decoded_referrer(await codec.decode(STATIC_TOKEN, origin=None)) == REFERRER
        assert decoded_referrer(await codec.decode(provider.token())) == REFERRER
        assert (await codec.decode("operator-tokex", origin=None)).status_code == 401
    static = Settings.from_env(environment(REFERRALS_CODEC_TOKEN=STATIC_TOKEN))
    async with codec_in_process(static, host="0.0.0.0") as codec:
        assert decoded_referrer(await codec.decode(STATIC_TOKEN)) == REFERRER
        # No identity provider configured: a JWT is only a wrong token.
        refused = await codec.decode(provider.token())
        assert refused.status_code == 401 and refused.json() == {"detail": "wrong bearer token"}


async def test_cors_answers_the_ui_origin_only(provider: IdentityProvider) -> None:
    asking = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    elsewhere = "https://evil.example"
    async with codec_in_process(token_settings(provider.url)) as codec:
        preflight = await codec.client.options("/decode", headers={"Origin": UI, **asking})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == UI
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
        foreign = await codec.client.options("/decode", headers={"Origin": elsewhere, **asking})
        assert foreign.status_code == 403
        for token in (provider.token(), None):
            refused = await codec.decode(token, origin=elsewhere)
            assert refused.status_code == 403 and REFERRER not in refused.text
            assert "access-control-allow-origin" not in refused.headers


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        (
            {"REFERRALS_CODEC_JWKS_URL": "https://login.example.com/jwks"},
            "REFERRALS_CODEC_ISSUER, REFERRALS_CODEC_AUDIENCE",
        ),
        (
            {"REFERRALS_CODEC_ISSUER": ISSUER, "REFERRALS_CODEC_AUDIENCE": AUDIENCE},
            "REFERRALS_CODEC_JWKS_URL",
        ),
    ],
)
def test_the_access_token_settings_come_all_three_together(
    given: dict[str, str], missing: str
) -> None:
    with pytest.raises(SettingsError, match=f"set without {missing}: ") as refused:
        Settings.from_env(environment(**given))
    assert "\n" not in str(refused.value)


def test_the_key_set_comes_over_https_unless_on_this_machine() -> None:
    with pytest.raises(SettingsError, match="REFERRALS_CODEC_JWKS_URL='http://login.example.com/"):
        token_settings("http://login.example.com/jwks")
    issuer = token_settings("https://login.example.com/jwks").codec_token_issuer
    assert issuer is not None
    assert (issuer.jwks_url, issuer.issuer, issuer.audience) == (
        "https://login.example.com/jwks", ISSUER, AUDIENCE,
    )  # fmt: skip
    assert token_settings("http://localhost:8080/jwks").codec_token_issuer is not None


# --- no credential: the dev stack's only ------------------------------------------------------

CREDENTIAL_SETTINGS = (
    "REFERRALS_CODEC_TOKEN",
    "REFERRALS_CODEC_JWKS_URL",
    "REFERRALS_CODEC_ISSUER",
    "REFERRALS_CODEC_AUDIENCE",
)


def test_outside_the_dev_stack_it_needs_a_credential_even_on_loopback(tmp_path: Path) -> None:
    create_dev_files(tmp_path)  # nearby, but this process is given its key elsewhere
    settings = Settings.from_env(environment(), cwd=tmp_path)
    for host in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        with pytest.raises(CodecServerError) as refused:
            codec_app_from_settings(settings, host)
        assert all(name in str(refused.value) for name in CREDENTIAL_SETTINGS)
    done = subprocess.run(
        [REFERRALS, "codec-server", "--host", "127.0.0.1", "--port", str(free_port())],
        env={**bare_environment(), **environment()},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "REFERRALS_CODEC_TOKEN" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_the_dev_stack_codec_server_needs_no_credential_on_loopback(tmp_path: Path) -> None:
    create_dev_files(tmp_path)  # what `referrals dev` makes
    dev = Settings.from_env(bare_environment(), cwd=tmp_path)
    with pytest.raises(CodecServerError):
        codec_app_from_settings(dev, "0.0.0.0")
    # As `referrals dev` starts it, for its Temporal UI, which sends no token.
    port = free_port()
    process = subprocess.Popen(
        [REFERRALS, "codec-server", "--host", "127.0.0.1", "--port", str(port)],
        env=bare_environment(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        sealed = await payload_codec(dev).encode([referrer()])
        body = MessageToDict(Payloads(payloads=sealed))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, process.stderr and process.stderr.read()
                try:
                    await client.get("/livez")
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline, "the dev codec server did not start"
                    await asyncio.sleep(0.2)
            dev_ui = {"Origin": "http://127.0.0.1:8233"}
            decoded = await client.post("/decode", json=body, headers=dev_ui)
        assert decoded_referrer(decoded) == REFERRER
    finally:
        process.terminate()
        process.wait(timeout=30)
