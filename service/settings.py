"""Configuration, read once from the environment into one frozen object.

Every variable is parsed and checked when the process starts; a bad value raises
:class:`SettingsError` whose message names the variable and what is wrong with it
(never the value of a secret). Secrets are wrapped in :class:`Secret` so that no
``repr``, log line or traceback can show them. Each secret may instead be read from a file,
``NAME_FILE=/path`` (:data:`FROM_FILE`), as orchestrators mount them (Kubernetes Secret volumes,
Docker secrets), so that it need not sit in the process's environment.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit

BRIDGE_SOURCE_IPS = ("63.32.31.5", "52.215.247.62", "34.249.92.209")
DEFAULT_DATABASE_URL = "sqlite:///.bridgehook/bridgehook.db"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# The variables NAME that may be given as NAME_FILE=/path instead: the keys of the deployment's Secret.
FROM_FILE = frozenset({
    "BRIDGE_WEBHOOK_SECRETS", "BRIDGE_CLIENT_ID", "BRIDGE_CLIENT_SECRET", "ENCRYPTION_KEYS",
    "DATABASE_URL", "DATABASE_URL_MIGRATE", "REDIS_URL", "POWENS_WEBHOOK_SECRETS", "POWENS_CLIENT_ID",
    "POWENS_CLIENT_SECRET",
})  # fmt: skip


class Rate(NamedTuple):
    """At most ``requests`` per ``seconds``; written ``requests/seconds`` in the environment."""

    requests: int
    seconds: int


# Bridge's documented limits: per application, per user, token requests per user.
RATE_APP, RATE_USER, RATE_TOKEN = Rate(2000, 300), Rate(60, 60), Rate(10, 60)
RATE_CONNECT = Rate(60, 60)  # callbacks at the end of Connect, all clients together
DEFAULT_BRIDGE_API_URL = "https://api.bridgeapi.io/v3/aggregation"
# Powens's: per user, its sandbox's documented 30 calls a minute; per application (the domain), production
# numbers are not published: a guess, well under the sandbox's 86,400 a day spread over a minute's window.
POWENS_RATE_APP, POWENS_RATE_USER = Rate(1000, 60), Rate(30, 60)


class SettingsError(ValueError):
    """A variable is missing or malformed; the message is one line naming it."""


class Secret:
    """A string that refuses to show itself: ``repr`` and ``str`` are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class Settings:
    webhook_secrets: tuple[Secret, ...] = ()
    redis_url: str | None = field(default=None, repr=False)
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    # `bridgehook db upgrade`'s, when migrations run as a role of their own (the tables' owner).
    database_url_migrate: str | None = field(default=None, repr=False)
    allowed_ips: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(ip) for ip in BRIDGE_SOURCE_IPS)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_body_bytes: int = 65536
    dedupe_seconds: int = 259200
    read_timeout_seconds: float = 10.0
    # Before the app sees a request (service/connections.py): its head's time and size, and connections.
    header_timeout_seconds: float = 10.0
    max_header_bytes: int = 32768
    max_connections: int = 2000
    # The probes and /metrics listen here, never on the webhook's port (the one the ingress publishes).
    admin_port: int = 9000
    archive_max_age_seconds: int = 7 * 86400
    archive_max_events: int = 500_000
    queue_name: str = "bridgehook"
    log_format: Literal["json", "console"] = "json"
    log_level: str = "info"
    # Workers: Bridge's API and how we pace, retry and serialise work.
    bridge_api_url: str = DEFAULT_BRIDGE_API_URL
    bridge_client_id: str | None = None
    bridge_client_secret: Secret | None = None
    bridge_version: str = "2025-01-15"
    bridge_accept_language: str = "en"
    bridge_timeout_seconds: float = 30.0
    bridge_max_attempts: int = 4
    bridge_backoff_ms: int = 500
    rate_app: Rate = RATE_APP
    rate_user: Rate = RATE_USER
    rate_token: Rate = RATE_TOKEN
    # The longest a worker waits in a job for a request budget (ours or a 429's Retry-After); a longer
    # wait ends the attempt and the job runs again when the budget frees (workers.jobs).
    budget_max_wait_seconds: int = 10
    retry_intervals: tuple[int, ...] = (10, 60, 300, 1800, 7200)
    sync_overlap_seconds: int = 300
    # A sync event younger than this steps aside (an account's, twice as long) so that its refresh's
    # other events arrive first and one sync serves them all (workers.jobs._coalesce); 0: off.
    sync_coalesce_seconds: int = 0
    item_lock_seconds: int = 60
    # Operations: reconciliation and metrics of the worker and scheduler processes.
    reconcile_interval_seconds: int = 3600
    reconcile_stale_seconds: int = 2 * 86400
    metrics_port: int = 9100
    # Encryption at rest of bank data (workers/codec.py): newest key first.
    encryption_keys: tuple[Secret, ...] = ()
    allow_plaintext_storage: bool = False
    # Powens's bodies (bank data) as Redis holds them (service/sealing.py): the receiver seals with the
    # public key; the workers and the CLI open with the private keys (newest first).
    body_seal_public_key: Secret | None = None
    body_seal_private_keys: tuple[Secret, ...] = ()
    # The application API (api/) and the end of Connect (the receiver's /connect/callback).
    api_tokens: tuple[Secret, ...] = ()
    connect_callback_url: str | None = None
    connect_return_url: str | None = None
    connect_callback_rate: Rate = RATE_CONNECT
    consent_warning_days: int = 14
    deleted_user_retention_days: int = 30
    # Powens's webhooks (service/powens.py): served only when configured. Its first sync's body can
    # be several MB, so its limit (on the decompressed body too) is its own.
    powens_webhook_secrets: tuple[Secret, ...] = ()
    powens_webhook_auth: Literal["hmac", "bearer"] = "hmac"  # bearer: the user's token (service/bearer.py)
    powens_max_body_bytes: int = 8 * 1024 * 1024
    powens_allowed_ips: tuple[IPNetwork, ...] = ()  # Powens publishes none: empty allows any source
    powens_signature_max_age_seconds: int = 300  # BI-Signature-Date's distance from our clock
    # Powens's API (workers/powens.py): https://<domain>.biapi.pro/2.0, no default (each client has a domain).
    powens_api_url: str | None = None
    powens_client_id: str | None = None
    powens_client_secret: Secret | None = None
    powens_timeout_seconds: float = 30.0
    powens_rate_app: Rate = POWENS_RATE_APP
    powens_rate_user: Rate = POWENS_RATE_USER

    @property
    def redis_url_for_logs(self) -> str | None:
        return mask_url(self.redis_url) if self.redis_url else None

    @property
    def database_url_for_logs(self) -> str:
        return mask_url(self.database_url)

    @property
    def migrate_url(self) -> str:
        """Where `bridgehook db upgrade` connects: DATABASE_URL_MIGRATE, else DATABASE_URL."""
        return self.database_url_migrate or self.database_url

    @property
    def migrate_url_for_logs(self) -> str:
        return mask_url(self.migrate_url)

    @property
    def serves_powens(self) -> bool:
        """Whether the receiver serves Powens's webhooks: its HMAC secrets, or bearer mode (no secret)."""
        return bool(self.powens_webhook_secrets) or self.powens_webhook_auth == "bearer"

    def require(self, *names: str) -> None:
        """Raise SettingsError for the first of ``names`` a command needs but is unset."""
        present = {
            "BRIDGE_WEBHOOK_SECRETS": bool(self.webhook_secrets),
            "REDIS_URL": self.redis_url is not None,
            "BRIDGE_CLIENT_ID": self.bridge_client_id is not None,
            "BRIDGE_CLIENT_SECRET": self.bridge_client_secret is not None,
            "ENCRYPTION_KEYS": bool(self.encryption_keys) or self.allow_plaintext_storage,
            "BODY_SEAL_PUBLIC_KEY": self.body_seal_public_key is not None or self.allow_plaintext_storage,
            "BODY_SEAL_PRIVATE_KEYS": bool(self.body_seal_private_keys) or self.allow_plaintext_storage,
            "API_TOKENS": bool(self.api_tokens),
            "CONNECT_CALLBACK_URL": self.connect_callback_url is not None,
            "CONNECT_RETURN_URL": self.connect_return_url is not None,
            "POWENS_API_URL": self.powens_api_url is not None,
            "POWENS_CLIENT_ID": self.powens_client_id is not None,
            "POWENS_CLIENT_SECRET": self.powens_client_secret is not None,
        }
        for name in names:
            if not present[name]:
                raise SettingsError(f"{name}: required; {_HOW_TO_SET[name]}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ)
        return cls(
            webhook_secrets=env.secrets("BRIDGE_WEBHOOK_SECRETS"),
            redis_url=env.url("REDIS_URL", ("redis", "rediss", "unix"), None),
            database_url=env.database_url("DATABASE_URL") or DEFAULT_DATABASE_URL,
            database_url_migrate=env.database_url("DATABASE_URL_MIGRATE"),
            allowed_ips=env.networks("BRIDGE_ALLOWED_IPS", BRIDGE_SOURCE_IPS, allow_empty=False),
            trusted_proxies=env.networks("TRUSTED_PROXIES", (), allow_empty=True),
            max_body_bytes=env.positive_int("WEBHOOK_MAX_BODY_BYTES", 65536),
            dedupe_seconds=env.positive_int("WEBHOOK_DEDUPE_SECONDS", 259200),
            read_timeout_seconds=float(env.positive_int("WEBHOOK_READ_TIMEOUT_SECONDS", 10)),
            header_timeout_seconds=float(env.positive_int("WEBHOOK_HEADER_TIMEOUT_SECONDS", 10)),
            max_header_bytes=env.positive_int("WEBHOOK_MAX_HEADER_BYTES", 32768),
            max_connections=env.positive_int("WEBHOOK_MAX_CONNECTIONS", 2000),
            admin_port=env.port("ADMIN_PORT", 9000),
            archive_max_age_seconds=env.positive_int("WEBHOOK_ARCHIVE_MAX_AGE_SECONDS", 7 * 86400),
            archive_max_events=env.positive_int("WEBHOOK_ARCHIVE_MAX_EVENTS", 500_000),
            queue_name=env.name("RQ_QUEUE", "bridgehook"),
            log_format=env.choice("LOG_FORMAT", ("json", "console"), "json"),  # type: ignore[arg-type]
            log_level=env.choice("LOG_LEVEL", ("debug", "info", "warning", "error"), "info"),
            bridge_api_url=env.url("BRIDGE_API_URL", ("https", "http"), None) or DEFAULT_BRIDGE_API_URL,
            bridge_client_id=env.get("BRIDGE_CLIENT_ID"),
            bridge_client_secret=env.secret("BRIDGE_CLIENT_SECRET"),
            bridge_version=env.get("BRIDGE_VERSION") or cls.bridge_version,
            bridge_accept_language=env.get("BRIDGE_ACCEPT_LANGUAGE") or cls.bridge_accept_language,
            bridge_timeout_seconds=float(env.positive_int("BRIDGE_TIMEOUT_SECONDS", 30)),
            bridge_max_attempts=env.positive_int("BRIDGE_MAX_ATTEMPTS", 4),
            bridge_backoff_ms=env.positive_int("BRIDGE_BACKOFF_MS", 500),
            rate_app=env.rate("BRIDGE_RATE_LIMIT_APP", RATE_APP),
            rate_user=env.rate("BRIDGE_RATE_LIMIT_USER", RATE_USER),
            rate_token=env.rate("BRIDGE_RATE_LIMIT_TOKEN", RATE_TOKEN),
            budget_max_wait_seconds=env.positive_int("BRIDGE_BUDGET_MAX_WAIT_SECONDS", 10, allow_zero=True),
            retry_intervals=env.intervals("WORKER_RETRY_INTERVALS", cls.retry_intervals),
            sync_overlap_seconds=env.positive_int("SYNC_OVERLAP_SECONDS", 300, allow_zero=True),
            sync_coalesce_seconds=env.positive_int("SYNC_COALESCE_SECONDS", 0, allow_zero=True),
            item_lock_seconds=env.positive_int("ITEM_LOCK_SECONDS", 60),
            reconcile_interval_seconds=env.positive_int("RECONCILE_INTERVAL_SECONDS", 3600),
            reconcile_stale_seconds=env.positive_int("RECONCILE_STALE_SECONDS", 2 * 86400),
            metrics_port=env.positive_int("METRICS_PORT", 9100, allow_zero=True),
            encryption_keys=env.keys("ENCRYPTION_KEYS"),
            allow_plaintext_storage=env.flag("ALLOW_PLAINTEXT_STORAGE"),
            body_seal_public_key=env.seal_key("BODY_SEAL_PUBLIC_KEY"),
            body_seal_private_keys=env.keys("BODY_SEAL_PRIVATE_KEYS", "bridgehook keys seal-pair"),
            api_tokens=env.secrets("API_TOKENS"),
            connect_callback_url=env.url("CONNECT_CALLBACK_URL", ("https", "http"), None),
            connect_return_url=env.url("CONNECT_RETURN_URL", ("https", "http"), None),
            connect_callback_rate=env.rate("CONNECT_CALLBACK_RATE_LIMIT", RATE_CONNECT),
            consent_warning_days=env.positive_int("CONSENT_WARNING_DAYS", 14),
            deleted_user_retention_days=env.positive_int("DELETED_USER_RETENTION_DAYS", 30, allow_zero=True),
            powens_webhook_secrets=env.secrets("POWENS_WEBHOOK_SECRETS"),
            powens_webhook_auth=env.choice("POWENS_WEBHOOK_AUTH", ("hmac", "bearer"), "hmac"),  # type: ignore[arg-type]
            powens_max_body_bytes=env.positive_int("POWENS_WEBHOOK_MAX_BODY_BYTES", 8 * 1024 * 1024),
            powens_allowed_ips=env.networks("POWENS_ALLOWED_IPS", (), allow_empty=True),
            powens_signature_max_age_seconds=env.positive_int("POWENS_SIGNATURE_MAX_AGE_SECONDS", 300),
            powens_api_url=env.url("POWENS_API_URL", ("https", "http"), None),
            powens_client_id=env.get("POWENS_CLIENT_ID"),
            powens_client_secret=env.secret("POWENS_CLIENT_SECRET"),
            powens_timeout_seconds=float(env.positive_int("POWENS_TIMEOUT_SECONDS", 30)),
            powens_rate_app=env.rate("POWENS_RATE_LIMIT_APP", POWENS_RATE_APP),
            powens_rate_user=env.rate("POWENS_RATE_LIMIT_USER", POWENS_RATE_USER),
        )


_HOW_TO_SET = {
    "BRIDGE_WEBHOOK_SECRETS": "set it to the webhook secret(s) from Bridge's dashboard, "
    "comma-separated during a rotation (`make run` sets a local one)",
    "REDIS_URL": "set it to redis://host:port/db (`make run` starts an embedded server, which other commands "
    "find from the project's directories, or from anywhere with BRIDGEHOOK_HOME=/path/to/.bridgehook)",
    "BRIDGE_CLIENT_ID": "set it to the client id of your Bridge application",
    "BRIDGE_CLIENT_SECRET": "set it to the client secret of your Bridge application",
    "ENCRYPTION_KEYS": "set it to a key from `bridgehook keys generate` (bank data is encrypted at rest), "
    "or set ALLOW_PLAINTEXT_STORAGE=1 to store it in clear on purpose",
    "BODY_SEAL_PUBLIC_KEY": "set it to the public key from `bridgehook keys seal-pair` (Powens's bodies "
    "carry bank data: Redis holds them sealed), or set ALLOW_PLAINTEXT_STORAGE=1 to hold them in clear",
    "BODY_SEAL_PRIVATE_KEYS": "set it to the private key(s) from `bridgehook keys seal-pair`, newest first "
    "(the workers open Powens's bodies with them), or set ALLOW_PLAINTEXT_STORAGE=1 if the receiver holds "
    "them in clear",
    "API_TOKENS": "set it to the token(s) your application sends as `Authorization: Bearer <token>`, "
    "comma-separated during a rotation (at least 8 characters each)",
    "CONNECT_CALLBACK_URL": "set it to the public URL of the receiver's /connect/callback, where Bridge "
    "sends the user's browser at the end of Connect",
    "CONNECT_RETURN_URL": "set it to the page of your application where the receiver sends the user's "
    "browser after Connect",
    "POWENS_API_URL": "set it to your Powens domain's API, https://<domain>.biapi.pro/2.0",
    "POWENS_CLIENT_ID": "set it to the client id of your Powens client application",
    "POWENS_CLIENT_SECRET": "set it to the client secret of your Powens client application",
}


class _Env:
    """Typed reads of one environment mapping; each error names its variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _get(self, name: str) -> str | None:
        value = self._environ.get(name)
        path = self._environ.get(f"{name}_FILE", "").strip() if name in FROM_FILE else ""
        if path:
            if value is not None and value.strip():
                raise SettingsError(f"{name} and {name}_FILE are both set: set only one of them")
            value = _read_file(f"{name}_FILE", path)
        if value is None or value.strip() == "":
            return None
        return value.strip()  # (a file's trailing newline too)

    def get(self, name: str) -> str | None:
        return self._get(name)

    def secret(self, name: str) -> Secret | None:
        raw = self._get(name)
        return None if raw is None else Secret(raw)

    def rate(self, name: str, default: Rate) -> Rate:
        raw = self._get(name)
        if raw is None:
            return default
        count, sep, seconds = raw.partition("/")
        valid = sep and count.strip().isdigit() and seconds.strip().isdigit()
        if not valid or int(count) < 1 or int(seconds) < 1:
            raise SettingsError(f"{name}: expected requests/seconds such as 60/60, got {raw!r}")
        return Rate(int(count), int(seconds))

    def intervals(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        raw = self._environ.get(name)
        if raw is None:
            return default
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        if not all(p.isdigit() for p in parts):
            raise SettingsError(f"{name}: expected seconds separated by commas (10,60,300), got {raw!r}")
        return tuple(int(p) for p in parts)

    def secrets(self, name: str) -> tuple[Secret, ...]:
        raw = self._get(name)
        if raw is None:
            return ()
        parts = [p.strip() for p in raw.split(",")]
        if any(p == "" for p in parts):
            raise SettingsError(f"{name}: contains an empty secret (check the commas)")
        if any(len(p) < 8 for p in parts):
            raise SettingsError(f"{name}: every secret must be at least 8 characters long")
        return tuple(Secret(p) for p in parts)

    def seal_key(self, name: str) -> Secret | None:
        """One key as :meth:`keys` reads them."""
        keys = self.keys(name, "bridgehook keys seal-pair")
        if len(keys) > 1:
            raise SettingsError(f"{name}: one key only (the receiver seals to one)")
        return keys[0] if keys else None

    def keys(self, name: str, source: str = "bridgehook keys generate") -> tuple[Secret, ...]:
        """256-bit keys in urlsafe base64 (44 characters each), comma-separated, newest first."""
        raw = self._get(name)
        if raw is None:
            return ()
        keys = []
        for part in (p.strip() for p in raw.split(",")):
            try:
                valid = len(base64.urlsafe_b64decode(part.encode())) == 32
            except (binascii.Error, ValueError):
                valid = False
            if not valid:  # the message never shows the value
                raise SettingsError(f"{name}: each key must be 32 bytes in urlsafe base64 (`{source}`)")
            keys.append(Secret(part))
        if len(set(keys)) != len(keys):
            raise SettingsError(f"{name}: the same key is listed twice")
        return tuple(keys)

    def flag(self, name: str) -> bool:
        raw = self._get(name)
        if raw is None or raw.lower() in ("0", "false", "no"):
            return False
        if raw.lower() in ("1", "true", "yes"):
            return True
        raise SettingsError(f"{name}: expected 1 or 0, got {raw!r}")

    def url(self, name: str, schemes: tuple[str, ...], default: str | None) -> str | None:
        raw = self._get(name)
        if raw is None:
            return default
        scheme = urlsplit(raw).scheme
        if scheme not in schemes:
            raise SettingsError(
                f"{name}: expected a URL starting with {' or '.join(s + '://' for s in schemes)}"
            )
        return raw

    def database_url(self, name: str) -> str | None:
        raw = self._get(name)
        if raw is None:
            return None
        scheme = urlsplit(raw).scheme
        if scheme not in ("postgresql", "postgres", "sqlite"):
            raise SettingsError(
                f"{name}: expected postgresql://… or sqlite:///path, got a {scheme or 'bare'} URL"
            )
        if scheme == "sqlite" and not raw.startswith("sqlite:///"):
            raise SettingsError(
                f"{name}: a SQLite URL has three slashes: sqlite:///relative/or//absolute/path"
            )
        return raw

    def networks(self, name: str, default: tuple[str, ...], *, allow_empty: bool) -> tuple[IPNetwork, ...]:
        raw = self._environ.get(name)
        values = default if raw is None else tuple(p.strip() for p in raw.split(",") if p.strip())
        if not values and not allow_empty:
            raise SettingsError(f"{name}: must list at least one IP address or CIDR")
        networks = []
        for value in values:
            try:
                networks.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise SettingsError(f"{name}: {value!r} is not an IP address or CIDR") from None
        return tuple(networks)

    def port(self, name: str, default: int) -> int:
        value = self.positive_int(name, default)
        if value > 65535:
            raise SettingsError(f"{name}: a port is at most 65535, got {value}")
        return value

    def positive_int(self, name: str, default: int, *, allow_zero: bool = False) -> int:
        raw = self._get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected a positive integer, got {raw!r}") from None
        if value < 0 or (value == 0 and not allow_zero):
            raise SettingsError(f"{name}: expected a positive integer, got {raw!r}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        raw = self._get(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise SettingsError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()

    def name(self, name: str, default: str) -> str:
        raw = self._get(name) or default
        if not raw.replace("-", "").replace("_", "").isalnum():
            raise SettingsError(f"{name}: use letters, digits, '-' and '_' only, got {raw!r}")
        return raw


def _read_file(name: str, path: str) -> str:
    """The content of the file ``name`` points to; an error names the variable and the path only."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{name}: {path} is not UTF-8 text") from None


def configured(environ: Mapping[str, str], name: str) -> bool:
    """Whether ``name`` is set, as itself or as ``NAME_FILE`` (see :data:`FROM_FILE`)."""
    given = [name, f"{name}_FILE"] if name in FROM_FILE else [name]
    return any(environ.get(n, "").strip() for n in given)


def variable(environ: Mapping[str, str], name: str) -> str | None:
    """One variable as Settings reads it (from ``NAME_FILE`` too), for what reads one outside Settings."""
    return _Env(environ).get(name)
