"""Payload encryption: the key ring, the codec, key rotation and the codec server."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography.exceptions import InvalidTag
from google.protobuf.json_format import MessageToDict
from temporalio.api.common.v1 import Payload, Payloads

from core.encryption import (
    CURRENT_ENV,
    ENCODING,
    KEY_ID,
    KEYS_ENV,
    EncryptionKeyError,
    KeyRing,
    new_key_entry,
    rotate_key_file,
)
from core.settings import (
    DEV_ACTOR_KEY_FILE,
    DEV_KEY_FILE,
    DEV_SECRET_FILE,
    Settings,
    SettingsError,
    create_dev_files,
)
from core.temporal import EncryptionCodec, payload_codec
from devstack.servers import REFERRALS
from starter.codec_server import CodecServerError, codec_app_from_settings, create_codec_app
from tests.conftest import in_process

UI = "http://127.0.0.1:8233"


def plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


async def test_payloads_round_trip_encrypted_under_the_newest_key() -> None:
    ring = KeyRing.parse(f"{new_key_entry()}\n{new_key_entry()}", "test")
    codec = EncryptionCodec(ring)
    original = [plain("claire.martin@conseil-martin.example"), plain("Julien Roche")]
    sealed = await codec.encode(original)
    for payload in sealed:
        assert payload.metadata["encoding"] == ENCODING
        assert payload.metadata[KEY_ID].decode() == ring.current[0]
        assert b"claire" not in payload.data and b"Julien" not in payload.data
    assert await codec.decode(sealed) == original
    assert sealed[0].data != (await codec.encode(original[:1]))[0].data  # a fresh nonce each time


async def test_a_payload_recorded_before_encryption_decodes_as_it_is() -> None:
    codec = EncryptionCodec(KeyRing.parse(new_key_entry(), "test"))
    assert await codec.decode([plain("old")]) == [plain("old")]


async def test_a_tampered_payload_or_an_unknown_key_is_refused(tmp_path: Path) -> None:
    codec = EncryptionCodec(KeyRing.parse(new_key_entry(), "test"))
    [sealed] = await codec.encode([plain("x")])
    # One bit flipped in the tag (setting a byte to 0 changes nothing 1 time in 256).
    tampered = Payload(
        metadata=sealed.metadata, data=sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    )
    with pytest.raises(InvalidTag):  # AES-GCM authenticates every payload
        await codec.decode([tampered])
    stranger = EncryptionCodec(KeyRing.parse(new_key_entry(), "other"))
    with pytest.raises(EncryptionKeyError, match="not in the key ring"):
        await stranger.decode([sealed])


async def test_the_dev_key_file_is_created_once_private_and_rotated(tmp_path: Path) -> None:
    """`referrals dev` creates the key file; `keys rotate` adds a key that encrypts from then
    on; a process started before the rotation re-reads the file for a key it does not know."""
    environment = {k: v for k, v in os.environ.items() if k != KEYS_ENV}
    assert create_dev_files(tmp_path) == [
        tmp_path / DEV_KEY_FILE,
        tmp_path / DEV_SECRET_FILE,
        tmp_path / DEV_ACTOR_KEY_FILE,
    ]
    assert stat.S_IMODE((tmp_path / DEV_ACTOR_KEY_FILE).stat().st_mode) == 0o600
    assert create_dev_files(tmp_path) == []  # every later start finds the same ones
    path = tmp_path / DEV_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = Settings.from_env(environment, cwd=tmp_path)
    assert before.from_dev_files == (KEYS_ENV,)
    old_codec = payload_codec_in(tmp_path, before)
    [sealed_before] = await old_codec.encode([plain("before")])

    new_id = rotate_key_file(path)
    after = Settings.from_env(environment, cwd=tmp_path)
    assert [key_id for key_id, _ in after.key_ring().keys][-1] == new_id
    new_codec = payload_codec_in(tmp_path, after)
    [sealed_after] = await new_codec.encode([plain("after")])
    assert sealed_after.metadata[KEY_ID].decode() == new_id
    # The old key still decrypts; a process started before the rotation reloads the ring.
    assert await new_codec.decode([sealed_before]) == [plain("before")]
    assert await old_codec.decode([sealed_after]) == [plain("after")]


def payload_codec_in(folder: Path, settings: Settings) -> EncryptionCodec:
    """The codec a process started in `folder` gets (the dev key file is relative)."""
    here = Path.cwd()
    os.chdir(folder)
    try:
        return payload_codec(settings)
    finally:
        os.chdir(here)


def test_configured_keys_are_checked_and_never_echoed() -> None:
    entry = new_key_entry()
    for bad in ("k1:notbase64!", "k1:" + base64.b64encode(b"short").decode(), "bad id:x"):
        with pytest.raises(SettingsError, match=KEYS_ENV) as refused:
            Settings.from_env({KEYS_ENV: f"{entry},{bad}"})
        assert entry.partition(":")[2] not in str(refused.value)
    with pytest.raises(SettingsError, match="unique"):
        Settings.from_env({KEYS_ENV: f"{entry},{entry}"})
    with pytest.raises(SettingsError, match=CURRENT_ENV):
        Settings.from_env({KEYS_ENV: entry, CURRENT_ENV: "not-a-key"})


async def test_the_current_key_encrypts_and_every_key_decrypts() -> None:
    """The two rolling steps of a rotation: the new key is added everywhere (the old one still
    encrypts), then made current; a process at either step reads what the other wrote."""
    old, new = new_key_entry(), new_key_entry()
    old_id, new_id = old.partition(":")[0], new.partition(":")[0]
    before = EncryptionCodec(Settings.from_env({KEYS_ENV: old}).key_ring())
    added = EncryptionCodec(
        Settings.from_env({KEYS_ENV: f"{old},{new}", CURRENT_ENV: old_id}).key_ring()
    )
    current = EncryptionCodec(
        Settings.from_env({KEYS_ENV: f"{old},{new}", CURRENT_ENV: new_id}).key_ring()
    )
    [by_before] = await before.encode([plain("1")])
    [by_added] = await added.encode([plain("2")])
    [by_current] = await current.encode([plain("3")])
    assert by_added.metadata[KEY_ID].decode() == old_id
    assert by_current.metadata[KEY_ID].decode() == new_id
    assert await added.decode([by_before, by_current]) == [plain("1"), plain("3")]
    assert await current.decode([by_before, by_added]) == [plain("1"), plain("2")]


def test_keys_rotate_from_the_cli(tmp_path: Path) -> None:
    """In the dev stack it adds a key to the key file; with the keys in the environment it
    says how to rotate them; with neither it refuses and writes nothing."""
    environment = {k: v for k, v in os.environ.items() if k != KEYS_ENV}

    def rotate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [REFERRALS, "keys", "rotate"], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    nothing = rotate(environment)
    assert nothing.returncode == 1 and "referrals dev" in nothing.stderr
    assert list(tmp_path.iterdir()) == []
    create_dev_files(tmp_path)
    done = rotate(environment)
    assert done.returncode == 0, done.stderr
    written = (tmp_path / DEV_KEY_FILE).read_text()
    assert len(KeyRing.parse(written, "key file").keys) == 2
    assert "older keys still decrypt" in done.stdout
    configured = rotate({**environment, KEYS_ENV: new_key_entry()})
    assert configured.returncode == 0, configured.stderr
    assert CURRENT_ENV in configured.stdout and "two rolling steps" in configured.stdout


# --- the codec server ------------------------------------------------------------------------


async def codec_server(token: str | None = None) -> tuple[httpx.AsyncClient, EncryptionCodec]:
    codec = EncryptionCodec(KeyRing.parse(new_key_entry(), "test"))
    app = create_codec_app(codec, origins=(UI,), token=token)
    client = in_process(app, base_url="http://codec")
    return client, codec


async def test_the_codec_server_decodes_for_the_ui_origin_only() -> None:
    client, codec = await codec_server()
    sealed = await codec.encode([plain("Claire Martin")])
    body = MessageToDict(Payloads(payloads=sealed))
    async with client:
        preflight = await client.options(
            "/decode", headers={"Origin": UI, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == UI
        assert "X-Namespace" in preflight.headers["access-control-allow-headers"]
        decoded = await client.post(
            "/decode", json=body, headers={"Origin": UI, "X-Namespace": "default"}
        )
        assert decoded.status_code == 200
        assert decoded.headers["access-control-allow-origin"] == UI
        [payload] = decoded.json()["payloads"]
        assert base64.b64decode(payload["data"]) == b'"Claire Martin"'
        # The temporal CLI sends no Origin; a page from elsewhere gets nothing.
        assert (await client.post("/decode", json=body)).status_code == 200
        evil = await client.post("/decode", json=body, headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403 and "Claire" not in evil.text
        elsewhere = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        assert (await client.options("/decode", headers=elsewhere)).status_code == 403
        assert (await client.post("/decode", content=b"nonsense")).status_code == 400


async def test_the_codec_server_can_demand_a_bearer_token() -> None:
    client, codec = await codec_server(token="s3cret")
    body = MessageToDict(Payloads(payloads=await codec.encode([plain("x")])))
    async with client:
        assert (await client.post("/decode", json=body)).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.post("/decode", json=body, headers=wrong)).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/decode", json=body, headers=right)).status_code == 200


def test_the_codec_server_refuses_to_start_without_a_token() -> None:
    environment = {k: v for k, v in os.environ.items() if k != "REFERRALS_CODEC_TOKEN"}
    for host in ("0.0.0.0", "127.0.0.1"):  # on loopback too: any local process could decrypt
        with pytest.raises(CodecServerError, match="REFERRALS_CODEC_TOKEN"):
            codec_app_from_settings(Settings.from_env(environment), host)
    token = Settings.from_env({**environment, "REFERRALS_CODEC_TOKEN": "t"})
    codec_app_from_settings(token, "0.0.0.0")
    done = subprocess.run(
        [REFERRALS, "codec-server", "--host", "0.0.0.0", "--port", "1"],
        env={k: v for k, v in os.environ.items() if k != "REFERRALS_CODEC_TOKEN"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "needs a bearer token" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
