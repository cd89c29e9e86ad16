"""Every setting a process takes from its environment, read once, here; docs/deploy.md lists
them. Entry points build one `Settings` with `Settings.from_env()` and hand it down.

**Secrets from files.** Each secret may come from `<NAME>_FILE` (the Docker and Kubernetes
secrets convention) instead of `<NAME>`: REFERRALS_ENCRYPTION_KEYS, REFERRALS_SECRET_KEY,
REFERRALS_DATABASE_URL, REFERRALS_SMTP_PASSWORD, REFERRALS_CODEC_TOKEN,
REFERRALS_ACTOR_SIGNING_KEY.

**Fail closed.** Only `referrals dev` creates the dev stack's key file, secret and SQLite
database under `.data/` (`create_dev_files`). Any other process uses them when they already
exist and the variable is unset; otherwise `Settings.require` refuses, naming each missing
setting, and nothing is written. So two containers can never each invent a key of their own.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from core import DEFAULT_PROGRAM
from core.actor_assertions import (
    SIGNING_KEY_ENV,
    TRUSTED_KEYS_ENV,
    ActorKeyError,
    SigningKey,
    TrustedKeys,
)
from core.encryption import EncryptionKeyError, KeyRing, new_key_entry
from core.errors import SettingsError
from core.metrics import MetricsEndpoint

DEV_DATA = Path(".data")
DEV_KEY_FILE = DEV_DATA / "encryption-keys"
DEV_SECRET_FILE = DEV_DATA / "secret_key"
DEV_DATABASE = DEV_DATA / "referrals.db"
# The dev stack's one surface key: its web desk and CLI sign with it, its worker trusts it.
DEV_ACTOR_KEY_FILE = DEV_DATA / "actor-signing-key"

SECRETS_FROM_FILES = (
    "REFERRALS_ENCRYPTION_KEYS",
    "REFERRALS_SECRET_KEY",
    "REFERRALS_DATABASE_URL",
    "REFERRALS_SMTP_PASSWORD",
    "REFERRALS_CODEC_TOKEN",
    "REFERRALS_REFERRER_KEY_SECRET",
    SIGNING_KEY_ENV,
)
REFERRER_SECRET_ENV = "REFERRALS_REFERRER_KEY_SECRET"
STAFF_IDENTITY_ENV = "REFERRALS_STAFF_IDENTITY"
# The signing secret's least length (characters): a guessable one forges every status link.
# Only the key that signs: an older, shorter one may still verify while it is rotated out.
MIN_SECRET_LENGTH = 32
CODEC_JWKS_URL_ENV = "REFERRALS_CODEC_JWKS_URL"
CODEC_ISSUER_ENV = "REFERRALS_CODEC_ISSUER"
CODEC_AUDIENCE_ENV = "REFERRALS_CODEC_AUDIENCE"
TlsMode = Literal["starttls", "implicit", "none"]
TLS_MODES: tuple[TlsMode, ...] = ("starttls", "implicit", "none")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Need(Enum):
    """What a process cannot run without; the value is the variable that provides it."""

    DATABASE = "REFERRALS_DATABASE_URL"
    ENCRYPTION = "REFERRALS_ENCRYPTION_KEYS"
    SECRET = "REFERRALS_SECRET_KEY"
    # The web app signs its staff's actions; a worker checks them (core/actor_assertions.py).
    ACTOR_SIGNING = SIGNING_KEY_ENV
    ACTOR_KEYS = TRUSTED_KEYS_ENV


@dataclass(frozen=True)
class SmtpSettings:
    """The relay: `tls` is `starttls` (upgrade on port 587), `implicit` (TLS from the first
    byte, port 465) or `none` (loopback only, e.g. the dev sink). The relay's certificate is
    verified against the system's CAs, or `ca_file` for a private CA."""

    host: str = "127.0.0.1"
    port: int = 1025
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsMode = "none"
    ca_file: Path | None = None
    # One whole SMTP exchange, connection to QUIT; shorter than the activity's own timeout,
    # so a hung server fails the attempt instead of the attempt timing out unexplained.
    deadline_seconds: float = 30.0


@dataclass(frozen=True)
class WebhookRetry:
    """How the delivery workflow retries an endpoint; None: the workflow's defaults."""

    initial_interval_s: float | None = None
    maximum_interval_s: float | None = None
    give_up_after_s: float | None = None


@dataclass(frozen=True)
class AccessTokenIssuer:
    """Who issues the access tokens a Temporal UI forwards to the codec server: the key set
    (JWKS) their signatures are checked against, and the issuer (`iss`) and audience (`aud`)
    they must name. The three only mean something together."""

    jwks_url: str
    issuer: str
    audience: str


@dataclass(frozen=True)
class Settings:
    """Secrets stay out of its repr, should it ever be logged."""

    task_queue: str = "referrals"
    database_url: str | None = field(default=None, repr=False)
    # The key ring's text (`id:base64,…`) and the id of the key that encrypts (default: the
    # last); every key of the ring decrypts.
    encryption_keys: str | None = field(default=None, repr=False)
    encryption_current_key: str | None = None
    encryption_keys_from: str = Need.ENCRYPTION.value  # where the ring came from, for errors
    # The first signs status links, CSRF tokens and sessions; all of them verify.
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    # Keys ReferrerKey, which must not change when the signing secret rotates: default the
    # secret when there is only one (see `referrer_key_secret`).
    referrer_secret: str | None = field(default=None, repr=False)
    program_path: Path = Path("program.yaml")
    public_url: str = "http://127.0.0.1:8000"
    temporal_ui_url: str = "http://127.0.0.1:8233"
    # Client.connect's arguments; None: read from `temporal_env` when first needed.
    temporal: Mapping[str, Any] | None = None
    temporal_env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    smtp: SmtpSettings = SmtpSettings()
    rate_limit: str | None = None
    trusted_proxies: str | None = None
    dev_maildir: Path | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    web_metrics_port: int | None = None
    metrics_refresh_s: float = 15.0
    codec_token: str | None = field(default=None, repr=False)
    codec_token_issuer: AccessTokenIssuer | None = None
    codec_origins: tuple[str, ...] = ("http://127.0.0.1:8233", "http://localhost:8233")
    webhook_retry: WebhookRetry = WebhookRetry()
    actor: str | None = None
    # Who the CLI acts as, when the deployment says so (a toolbox): an address of program.yaml's
    # `staff`, in lower case. Its roles then bound what the CLI may do (core/roles.py).
    staff_identity: str | None = None
    cli_timeout_s: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"
    health_port: int | None = None
    health_host: str = "0.0.0.0"  # a kubelet probes the pod's address
    # Worker Versioning (docs/rollout.md): the image's tag makes the worker a version of the
    # Worker Deployment named here (default: the task queue's name); none, an unversioned worker.
    build_id: str | None = None
    deployment_name: str = "referrals"
    # The key this process signs its staff's actions with (the web desk, a toolbox's CLI), and
    # the public keys a worker accepts them from (core/actor_assertions.py).
    actor_signing_key: SigningKey | None = field(default=None, repr=False)
    actor_trusted_keys: TrustedKeys | None = None
    # What came from the dev stack's files rather than the environment.
    from_dev_files: tuple[str, ...] = ()

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Settings:
        """The settings of this process: the environment, then the dev stack's files in
        `cwd` when they exist. Raises SettingsError naming every malformed setting."""
        return _Reader(os.environ if environ is None else environ, cwd or Path.cwd()).settings()

    def temporal_client(self) -> Mapping[str, Any]:
        """Client.connect's arguments: as given, else what Temporal's envconfig reads from the
        environment (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, profiles, API keys, mTLS), read the
        first time it is asked: a command that never reaches Temporal does not load its SDK.
        A process that does cannot start on a bad profile or file (SettingsError)."""
        return self._environment_client if self.temporal is None else self.temporal

    @cached_property
    def _environment_client(self) -> Mapping[str, Any]:
        return temporal_client_config(self.temporal_env)

    @property
    def namespace(self) -> str:
        return str(self.temporal_client().get("namespace") or "default")

    @property
    def temporal_address(self) -> str:
        return str(self.temporal_client().get("target_host") or "127.0.0.1:7233")

    def require(self, *needs: Need) -> None:
        """Refuse, naming each of `needs` this process was not given."""
        given = {
            Need.DATABASE: self.database_url,
            Need.ENCRYPTION: self.encryption_keys,
            Need.SECRET: self.secret_keys,
            Need.ACTOR_SIGNING: self.actor_signing_key,
            Need.ACTOR_KEYS: self.actor_trusted_keys,
        }
        missing = [need.value for need in needs if not given[need]]
        if missing:
            raise SettingsError(
                f"missing {', '.join(missing)} (each may also come from a file named in "
                "<NAME>_FILE; only `referrals dev` creates them, for the local stack)"
            )

    def key_ring(self) -> KeyRing:
        self.require(Need.ENCRYPTION)
        assert self.encryption_keys is not None
        return KeyRing.parse(
            self.encryption_keys, self.encryption_keys_from, current=self.encryption_current_key
        )

    @property
    def referrer_key_secret(self) -> str:
        """Keys ReferrerKey (a referrer's workflows found in Temporal by one value): the
        signing secret while there is one; during and after a rotation, the one that keyed it
        so far, named in REFERRALS_REFERRER_KEY_SECRET (checked when the settings are read)."""
        if self.referrer_secret:
            return self.referrer_secret
        self.require(Need.SECRET)
        return self.secret_keys[0]

    @property
    def worker_metrics(self) -> MetricsEndpoint | None:
        """Where the worker serves Temporal's and the program's metrics; None: nowhere."""
        if self.metrics_port is None:
            return None
        return MetricsEndpoint(self.metrics_host, self.metrics_port)

    def database(self) -> str:
        self.require(Need.DATABASE)
        assert self.database_url is not None
        return self.database_url


class _Reader:
    """Reads one environment; collects every problem, so one run names them all."""

    def __init__(self, environ: Mapping[str, str], cwd: Path) -> None:
        self.env = environ
        self.cwd = cwd
        self.problems: list[str] = []
        self.from_dev: list[str] = []

    def text(self, name: str) -> str | None:
        return (self.env.get(name) or "").strip() or None

    def secret(self, name: str) -> str | None:
        """`name`, or the content of the file `name`_FILE names (one trailing newline off)."""
        value, path = self.env.get(name) or None, self.text(f"{name}_FILE")
        if value and path:
            self.problems.append(f"{name} and {name}_FILE are both set: keep one")
            return None
        if path is None:
            return value
        try:
            content = Path(path).read_text(encoding="utf-8").removesuffix("\n")
        except OSError as error:
            self.problems.append(f"{name}_FILE={path}: cannot read it ({error.strerror})")
            return None
        if not content.strip():
            self.problems.append(f"{name}_FILE={path}: the file is empty")
            return None
        return content

    def dev_file(self, name: str, path: Path) -> str | None:
        """The dev stack's file for `name`, if `referrals dev` created it here."""
        try:
            content = (self.cwd / path).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        self.from_dev.append(name)
        return content or None

    def number(self, name: str, default: float, *, above: float = 0) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            number = above
        if not number > above:
            self.problems.append(f"{name}={value!r}: a number above {above:g}")
            return default
        return number

    def port(self, name: str) -> int | None:
        try:
            return parse_port(self.text(name), name)
        except SettingsError as error:
            self.problems.append(str(error))
            return None

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(name)
        if value is None:
            return default
        if value not in choices:
            self.problems.append(f"{name}={value!r}: one of {', '.join(choices)}")
            return default
        return value

    def smtp(self) -> SmtpSettings:
        host = self.text("REFERRALS_SMTP_HOST") or "127.0.0.1"
        port = self.port("REFERRALS_SMTP_PORT") or 1025
        legacy = (self.text("REFERRALS_SMTP_STARTTLS") or "").lower() in ("1", "true", "yes")
        # TLS unless the relay is on this machine: a sign-in link must not cross a network
        # in clear by default.
        default: TlsMode = "starttls" if legacy or not loopback(host) else "none"
        tls = self.choice("REFERRALS_SMTP_TLS", TLS_MODES, default)
        ca_file = self.text("REFERRALS_SMTP_CA_FILE")
        if ca_file is not None and not Path(ca_file).is_file():
            self.problems.append(f"REFERRALS_SMTP_CA_FILE={ca_file}: no such file")
        return SmtpSettings(
            host=host,
            port=port,
            user=self.text("REFERRALS_SMTP_USER"),
            password=self.secret("REFERRALS_SMTP_PASSWORD"),
            tls=tls,  # type: ignore[arg-type]  # one of TLS_MODES, checked above
            ca_file=Path(ca_file) if ca_file else None,
        )

    def codec_token_issuer(self) -> AccessTokenIssuer | None:
        """The codec server's check of the Temporal UI's access tokens: all three settings, or
        none (then only REFERRALS_CODEC_TOKEN is accepted)."""
        names = (CODEC_JWKS_URL_ENV, CODEC_ISSUER_ENV, CODEC_AUDIENCE_ENV)
        given = {name: self.text(name) for name in names}
        if not any(given.values()):
            return None
        missing = [name for name in names if given[name] is None]
        if missing:
            present = [name for name in names if given[name] is not None]
            self.problems.append(
                f"{', '.join(present)} set without {', '.join(missing)}: the codec server "
                "checks the Temporal UI's tokens against all three (set them all, or none)"
            )
            return None
        jwks_url, issuer, audience = (str(given[name]) for name in names)
        parts = urlsplit(jwks_url)
        if parts.scheme != "https" and not (
            parts.scheme == "http" and loopback(parts.hostname or "")
        ):
            # Whoever could alter the key set on its way could sign tokens of their own.
            self.problems.append(
                f"{CODEC_JWKS_URL_ENV}={jwks_url!r}: an https:// URL (http:// only on loopback)"
            )
            return None
        return AccessTokenIssuer(jwks_url=jwks_url, issuer=issuer, audience=audience)

    def settings(self) -> Settings:
        keys = self.secret(Need.ENCRYPTION.value)
        keys_from = Need.ENCRYPTION.value
        if keys is None and not self.text(f"{Need.ENCRYPTION.value}_FILE"):
            keys = self.dev_file(Need.ENCRYPTION.value, DEV_KEY_FILE)
            keys_from = str(DEV_KEY_FILE)
        secret = self.secret(Need.SECRET.value)
        if secret is None and not self.text(f"{Need.SECRET.value}_FILE"):
            secret = self.dev_file(Need.SECRET.value, DEV_SECRET_FILE)
        database = self.secret(Need.DATABASE.value)
        if database is None and not self.text(f"{Need.DATABASE.value}_FILE"):
            if (self.cwd / DEV_DATABASE).is_file():
                database = f"sqlite:///{(self.cwd / DEV_DATABASE).resolve()}"
                self.from_dev.append(Need.DATABASE.value)
        secret_keys = tuple(k.strip() for k in (secret or "").split(",") if k.strip())
        if secret_keys and len(secret_keys[0]) < MIN_SECRET_LENGTH:
            self.problems.append(
                f"{Need.SECRET.value}: the first key signs status links and sessions, so it "
                f"must be at least {MIN_SECRET_LENGTH} characters (it has "
                f"{len(secret_keys[0])}); make one with `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`"
            )
        if len(secret_keys) > 1 and not (
            self.text(REFERRER_SECRET_ENV) or self.text(f"{REFERRER_SECRET_ENV}_FILE")
        ):
            self.problems.append(
                f"{Need.SECRET.value} holds {len(secret_keys)} keys (a rotation): set "
                f"{REFERRER_SECRET_ENV} to the secret that keyed ReferrerKey so far (the one "
                "that signed before the rotation), so every referrer keeps the same key"
            )
        signing_key, trusted_keys = self.actor_keys()
        origins = self.text("REFERRALS_CODEC_ORIGINS")
        maildir = self.text("REFERRALS_DEV_MAILDIR")
        settings = Settings(
            task_queue=self.text("REFERRALS_TASK_QUEUE") or "referrals",
            database_url=database,
            encryption_keys=keys,
            encryption_current_key=self.text("REFERRALS_ENCRYPTION_CURRENT_KEY"),
            encryption_keys_from=keys_from,
            secret_keys=secret_keys,
            referrer_secret=self.secret(REFERRER_SECRET_ENV),
            program_path=self.program(),
            public_url=(self.text("REFERRALS_PUBLIC_URL") or "http://127.0.0.1:8000").rstrip("/"),
            temporal_ui_url=(
                self.text("REFERRALS_TEMPORAL_UI_URL") or "http://127.0.0.1:8233"
            ).rstrip("/"),
            temporal_env=dict(self.env),
            smtp=self.smtp(),
            rate_limit=self.text("REFERRALS_RATE_LIMIT"),
            trusted_proxies=self.text("REFERRALS_TRUSTED_PROXIES"),
            dev_maildir=Path(maildir) if maildir else None,
            metrics_host=self.text("REFERRALS_METRICS_HOST") or "127.0.0.1",
            metrics_port=self.port("REFERRALS_METRICS_PORT"),
            web_metrics_port=self.port("REFERRALS_WEB_METRICS_PORT"),
            metrics_refresh_s=self.number("REFERRALS_METRICS_REFRESH_S", 15.0),
            codec_token=self.secret("REFERRALS_CODEC_TOKEN"),
            codec_token_issuer=self.codec_token_issuer(),
            codec_origins=(
                tuple(o.strip().rstrip("/") for o in origins.split(",") if o.strip())
                if origins
                else Settings.codec_origins
            ),
            webhook_retry=WebhookRetry(
                initial_interval_s=self.optional_number("REFERRALS_WEBHOOK_RETRY_INITIAL_S"),
                maximum_interval_s=self.optional_number("REFERRALS_WEBHOOK_RETRY_MAX_S"),
                give_up_after_s=self.optional_number("REFERRALS_WEBHOOK_GIVE_UP_S"),
            ),
            actor=self.text("REFERRALS_ACTOR"),
            staff_identity=self.staff_identity(),
            cli_timeout_s=self.number("REFERRALS_CLI_TIMEOUT", 30.0),
            log_level=self.choice(
                "REFERRALS_LOG_LEVEL",
                LOG_LEVELS,
                "INFO",
            ),
            log_format=self.choice("REFERRALS_LOG_FORMAT", LOG_FORMATS, "text"),
            health_port=self.port("REFERRALS_HEALTH_PORT"),
            health_host=self.text("REFERRALS_HEALTH_HOST") or "0.0.0.0",
            build_id=self.text("REFERRALS_BUILD_ID"),
            deployment_name=self.deployment_name(),
            actor_signing_key=signing_key,
            actor_trusted_keys=trusted_keys,
            from_dev_files=tuple(self.from_dev),
        )
        if settings.encryption_keys is not None:
            try:
                settings.key_ring()
            except EncryptionKeyError as error:
                self.problems.append(str(error))
        if self.problems:
            raise SettingsError("; ".join(self.problems))
        return settings

    def actor_keys(self) -> tuple[SigningKey | None, TrustedKeys | None]:
        """The surface's signing key and the worker's trusted keys; in the dev stack, when
        neither variable says otherwise, its one key for both."""
        signing_text = self.secret(SIGNING_KEY_ENV)
        trusted_text = self.text(TRUSTED_KEYS_ENV)
        dev = None
        if signing_text is None and not self.text(f"{SIGNING_KEY_ENV}_FILE"):
            dev = signing_text = self.dev_file(SIGNING_KEY_ENV, DEV_ACTOR_KEY_FILE)
        signing = trusted = None
        try:
            if signing_text is not None:
                signing = SigningKey.parse(
                    signing_text, str(DEV_ACTOR_KEY_FILE) if dev else SIGNING_KEY_ENV
                )
            if trusted_text is not None:
                trusted = TrustedKeys.parse(trusted_text)
            elif dev is not None and signing is not None:
                trusted = TrustedKeys.parse(signing.trusted_entry(), str(DEV_ACTOR_KEY_FILE))
                self.from_dev.append(TRUSTED_KEYS_ENV)
        except ActorKeyError as error:
            self.problems.append(str(error))
        return signing, trusted

    def staff_identity(self) -> str | None:
        identity = self.text(STAFF_IDENTITY_ENV)
        if identity is None:
            return None
        local, at, domain = identity.partition("@")
        if not (local and at and "." in domain) or any(c.isspace() for c in identity):
            self.problems.append(
                f"{STAFF_IDENTITY_ENV}={identity!r}: an email address, the staff member the "
                "CLI acts as (program.yaml's staff)"
            )
            return None
        return identity.lower()

    def program(self) -> Path:
        """REFERRALS_PROGRAM; else program.yaml where the process runs; else the rules the
        package ships (core/program.yaml)."""
        given = self.text("REFERRALS_PROGRAM")
        if given is not None:
            return Path(given)
        here = Path("program.yaml")
        return here if (self.cwd / here).is_file() else DEFAULT_PROGRAM

    def deployment_name(self) -> str:
        """REFERRALS_DEPLOYMENT_NAME, else the task queue's name. Temporal names a version
        `<deployment>.<build id>`: a versioned worker's deployment name holds no dot."""
        name = self.text("REFERRALS_DEPLOYMENT_NAME") or self.text("REFERRALS_TASK_QUEUE")
        if name is not None and "." in name and self.text("REFERRALS_BUILD_ID"):
            self.problems.append(
                f"Worker Deployment name {name!r} (REFERRALS_DEPLOYMENT_NAME, default the task "
                "queue's): no '.' (Temporal names a version <deployment>.<build id>)"
            )
        return name or "referrals"

    def optional_number(self, name: str) -> float | None:
        if self.text(name) is None:
            return None
        return self.number(name, 0.0)


def temporal_client_config(environ: Mapping[str, str]) -> dict[str, Any]:
    from temporalio.envconfig import ClientConfig

    try:
        config = dict(ClientConfig.load_client_connect_config(override_env_vars=dict(environ)))
    except Exception as error:  # noqa: BLE001 - a bad profile or TOML file
        raise SettingsError(f"Temporal client configuration: {error}") from error
    config.setdefault("target_host", "127.0.0.1:7233")
    return config


def environment_secret(name: str, environ: Mapping[str, str] | None = None) -> str:
    """A secret the program names by its variable (a webhook's `secret_env`): `name`, or the
    file `name`_FILE names. Raises SettingsError when neither gives one."""
    reader = _Reader(os.environ if environ is None else environ, Path.cwd())
    value = reader.secret(name)
    if reader.problems:
        raise SettingsError("; ".join(reader.problems))
    if not value:
        raise SettingsError(f"missing {name} (or {name}_FILE), named by a webhook's secret_env")
    return value


def parse_port(value: str | None, name: str) -> int | None:
    """A port setting: None when unset, empty or "off"."""
    value = (value or "").strip()
    if not value or value.lower() == "off":
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SettingsError(f"{name}={value!r}: a port number (1-65535) or 'off'")
    return int(value)


def loopback(host: str) -> bool:
    """`host` is this machine only (a name or address of the loopback interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_dev_files(cwd: Path | None = None) -> list[Path]:
    """For `referrals dev` only: the local stack's payload key, signing secret and actor key, each
    created once (mode 0600) and kept, so links and histories survive restarts. The database
    file comes from the stack's `db upgrade`. Returns what it created."""
    base = cwd or Path.cwd()
    created = []
    for path, content in (
        (DEV_KEY_FILE, "# Referral Desk payload keys, oldest first; the last encrypts.\n"
         f"{new_key_entry()}\n"),
        (DEV_SECRET_FILE, secrets.token_urlsafe(32)),
        (DEV_ACTOR_KEY_FILE, SigningKey.new("dev", "dev").text()),
    ):  # fmt: skip
        target = base / path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # the first process to get here writes it
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(content)
        created.append(target)
    return created
