"""Settings (core/settings.py): read once from the environment, secrets from files, and closed
by default: outside the dev stack a process without its key, secret or database refuses to
start, naming each, and writes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from core.encryption import KEYS_ENV, new_key_entry
from core.settings import (
    DEV_DATABASE,
    DEV_KEY_FILE,
    DEV_SECRET_FILE,
    REFERRER_SECRET_ENV,
    Need,
    Settings,
    SettingsError,
    create_dev_files,
)
from devstack.servers import REFERRALS
from devstack.settings import ROOT
from workflows.models.referral import StaffAction
from workflows.models.values import Action

OLD, NEW = "old-" + "o" * 32, "new-" + "n" * 32
LONG = "s" * 32

MISSING = "missing REFERRALS_DATABASE_URL, REFERRALS_ENCRYPTION_KEYS, REFERRALS_SECRET_KEY"


def bare_environment() -> dict[str, str]:
    """The test run's environment without any REFERRALS_ or TEMPORAL_ setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("REFERRALS_", "TEMPORAL_"))}


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        (["worker"], f"{MISSING}, REFERRALS_ACTOR_KEYS "),
        (["web", "--port", "1"], f"{MISSING}, REFERRALS_ACTOR_SIGNING_KEY "),
        (["codec-server", "--port", "1"], "missing REFERRALS_ENCRYPTION_KEYS"),
        (["list"], "missing REFERRALS_DATABASE_URL"),
        (["db", "upgrade"], "missing REFERRALS_DATABASE_URL"),
        (["contacted", "R-ANY"], "missing REFERRALS_DATABASE_URL, REFERRALS_ENCRYPTION_KEYS"),
        (["submit", str(ROOT / "examples" / "referral.json")], MISSING),
    ],
)
def test_a_process_without_its_settings_names_them_and_writes_nothing(
    tmp_path: Path, command: list[str], missing: str
) -> None:
    done = subprocess.run(
        [REFERRALS, *command],
        cwd=tmp_path,
        env={**bare_environment(), "REFERRALS_PROGRAM": str(ROOT / "program.yaml")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    [line] = done.stderr.strip().splitlines()
    assert missing in line
    assert list(tmp_path.iterdir()) == []  # no key, no secret, no database file


def test_the_dev_stack_files_are_used_only_once_they_exist(tmp_path: Path) -> None:
    environment = bare_environment()
    assert Settings.from_env(environment, cwd=tmp_path).encryption_keys is None
    create_dev_files(tmp_path)
    (tmp_path / DEV_DATABASE).touch()  # as the dev stack's `db upgrade` leaves it

    found = Settings.from_env(environment, cwd=tmp_path)

    found.require(*Need)
    assert found.from_dev_files == (
        KEYS_ENV,
        Need.SECRET.value,
        Need.DATABASE.value,
        Need.ACTOR_SIGNING.value,
        Need.ACTOR_KEYS.value,  # the dev stack's worker trusts its one signing key
    )
    assert found.actor_signing_key is not None and found.actor_trusted_keys is not None
    signed = found.actor_signing_key.sign("R-1", StaffAction(action=Action.WON, request_id="a"))
    assert found.actor_trusted_keys.verify("R-1", signed) == "dev"
    assert found.database() == f"sqlite:///{(tmp_path / DEV_DATABASE).resolve()}"
    assert found.secret_keys == ((tmp_path / DEV_SECRET_FILE).read_text(),)
    # A variable, when set, wins over the file.
    configured = Settings.from_env({**environment, "REFERRALS_SECRET_KEY": LONG}, cwd=tmp_path)
    assert configured.secret_keys == (LONG,)
    assert (tmp_path / DEV_KEY_FILE).exists()


def test_secrets_come_from_files(tmp_path: Path) -> None:
    key, secret, url = (
        new_key_entry(),
        "from-a-file-" + "f" * 32,
        "postgresql+psycopg://u:p@db/referrals",
    )
    for name, value in ((KEYS_ENV, key), ("REFERRALS_SECRET_KEY", secret)):
        (tmp_path / name).write_text(value + "\n")  # as `echo` and Kubernetes write them
    (tmp_path / "url").write_text(url)
    (tmp_path / "password").write_text("smtp-pass\n")
    (tmp_path / "token").write_text("codec-token")
    (tmp_path / "empty").write_text("")
    files = {
        f"{KEYS_ENV}_FILE": str(tmp_path / KEYS_ENV),
        "REFERRALS_SECRET_KEY_FILE": str(tmp_path / "REFERRALS_SECRET_KEY"),
        "REFERRALS_DATABASE_URL_FILE": str(tmp_path / "url"),
        "REFERRALS_SMTP_PASSWORD_FILE": str(tmp_path / "password"),
        "REFERRALS_CODEC_TOKEN_FILE": str(tmp_path / "token"),
    }

    settings = Settings.from_env(files, cwd=tmp_path)

    assert settings.key_ring().current[0] == key.partition(":")[0]
    assert settings.secret_keys == (secret,)
    assert settings.database() == url
    assert settings.smtp.password == "smtp-pass"
    assert settings.codec_token == "codec-token"
    with pytest.raises(SettingsError, match="both set"):
        Settings.from_env({**files, "REFERRALS_SECRET_KEY": LONG}, cwd=tmp_path)
    with pytest.raises(SettingsError, match="cannot read") as unreadable:
        Settings.from_env({"REFERRALS_SECRET_KEY_FILE": str(tmp_path / "nope")}, cwd=tmp_path)
    assert "REFERRALS_SECRET_KEY_FILE" in str(unreadable.value)
    with pytest.raises(SettingsError, match="empty"):
        Settings.from_env({"REFERRALS_DATABASE_URL_FILE": str(tmp_path / "empty")})
    shown = repr(settings)  # should settings ever be logged, no secret goes with them
    assert not any(s in shown for s in (key, secret, url, "smtp-pass", "codec-token"))
    # A file named but unreadable never falls back to the dev stack's file.
    create_dev_files(tmp_path)
    with pytest.raises(SettingsError):
        Settings.from_env({f"{KEYS_ENV}_FILE": str(tmp_path / "nope")}, cwd=tmp_path)


def test_every_malformed_setting_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(
            {
                "REFERRALS_SMTP_PORT": "twenty-five",
                "REFERRALS_SMTP_TLS": "maybe",
                "REFERRALS_CLI_TIMEOUT": "-1",
                "REFERRALS_LOG_FORMAT": "xml",
                "REFERRALS_STAFF_IDENTITY": "bob",
            }
        )
    message = str(refused.value)
    for name in ("SMTP_PORT", "SMTP_TLS", "CLI_TIMEOUT", "LOG_FORMAT", "STAFF_IDENTITY"):
        assert f"REFERRALS_{name}=" in message
    assert len(message.splitlines()) == 1


def test_the_staff_identity_is_an_address_in_lower_case() -> None:
    assert Settings.from_env({}).staff_identity is None
    given = {"REFERRALS_STAFF_IDENTITY": " Bob@Staff.Example "}
    assert Settings.from_env(given).staff_identity == "bob@staff.example"


def test_the_relay_is_reached_over_tls_unless_it_is_on_this_machine() -> None:
    assert Settings.from_env({}).smtp.tls == "none"  # the dev sink, on loopback
    assert Settings.from_env({"REFERRALS_SMTP_HOST": "smtp.example.com"}).smtp.tls == "starttls"
    implicit = {"REFERRALS_SMTP_HOST": "smtp.example.com", "REFERRALS_SMTP_TLS": "implicit"}
    assert Settings.from_env(implicit).smtp.tls == "implicit"
    legacy = {"REFERRALS_SMTP_STARTTLS": "true"}
    assert Settings.from_env(legacy).smtp.tls == "starttls"


def test_referrer_key_survives_a_secret_rotation() -> None:
    """One secret keys ReferrerKey; during a rotation (two secrets) the one that keyed it so
    far must be named, or the process refuses to start."""
    before = Settings.from_env({"REFERRALS_SECRET_KEY": OLD})
    with pytest.raises(SettingsError, match=REFERRER_SECRET_ENV):
        Settings.from_env({"REFERRALS_SECRET_KEY": f"{OLD},{NEW}"})
    added = Settings.from_env({"REFERRALS_SECRET_KEY": f"{OLD},{NEW}", REFERRER_SECRET_ENV: OLD})
    current = Settings.from_env({"REFERRALS_SECRET_KEY": f"{NEW},{OLD}", REFERRER_SECRET_ENV: OLD})

    assert before.referrer_key_secret == added.referrer_key_secret == OLD
    assert current.referrer_key_secret == OLD
    assert (added.secret_keys[0], current.secret_keys[0]) == (OLD, NEW)  # what signs


def test_the_signing_secret_is_long_enough() -> None:
    """A short secret is guessed offline from one status link, then forges them all; an
    older, shorter one may still verify while it is rotated out."""
    with pytest.raises(SettingsError, match="at least 32 characters"):
        Settings.from_env({"REFERRALS_SECRET_KEY": "CHANGE-ME"})
    rotating = {"REFERRALS_SECRET_KEY": f"{NEW},short", REFERRER_SECRET_ENV: "short"}
    assert Settings.from_env(rotating).secret_keys == (NEW, "short")


def test_a_build_id_makes_the_worker_a_version_of_its_deployment() -> None:
    """REFERRALS_BUILD_ID (the image's tag) versions the worker, within the Worker Deployment
    REFERRALS_DEPLOYMENT_NAME names, by default the task queue's name; none: unversioned."""
    assert Settings.from_env({}).build_id is None
    versioned = Settings.from_env({"REFERRALS_TASK_QUEUE": "desk", "REFERRALS_BUILD_ID": "0.7.0"})
    assert (versioned.build_id, versioned.deployment_name) == ("0.7.0", "desk")
    named = {"REFERRALS_BUILD_ID": "0.7.0", "REFERRALS_DEPLOYMENT_NAME": "referral-desk"}
    assert Settings.from_env(named).deployment_name == "referral-desk"
    # Temporal names a version <deployment>.<build id>: no dot in the deployment's name.
    dotted = {"REFERRALS_TASK_QUEUE": "referrals.eu"}
    assert Settings.from_env(dotted).build_id is None
    with pytest.raises(SettingsError, match="REFERRALS_DEPLOYMENT_NAME"):
        Settings.from_env({**dotted, "REFERRALS_BUILD_ID": "0.7.0"})
