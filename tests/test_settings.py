"""Settings: defaults, one clear error per bad variable, secrets that never show."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import BRIDGE_SOURCE_IPS, Secret, Settings, SettingsError, mask_url

SECRET = "whsec-settings-test-0123456789"


def test_defaults() -> None:
    s = Settings.from_env({"BRIDGE_WEBHOOK_SECRETS": SECRET})
    assert s.redis_url is None
    assert s.database_url == "sqlite:///.bridgehook/bridgehook.db"
    assert s.allowed_ips == tuple(ipaddress.ip_network(ip) for ip in BRIDGE_SOURCE_IPS)
    assert s.trusted_proxies == ()
    assert s.max_body_bytes == 65536
    assert s.dedupe_seconds == 259200
    assert s.log_format == "json"
    assert [x.reveal() for x in s.webhook_secrets] == [SECRET]


def test_everything_set() -> None:
    s = Settings.from_env(
        {
            "BRIDGE_WEBHOOK_SECRETS": f"{SECRET}, other-secret-abcdefgh",
            "REDIS_URL": "redis://:pw@redis:6379/1",
            "DATABASE_URL": "postgresql://app:pw@db/bridge",
            "BRIDGE_ALLOWED_IPS": "10.0.0.0/8, 2001:db8::1",
            "TRUSTED_PROXIES": "172.16.0.0/12",
            "WEBHOOK_MAX_BODY_BYTES": "1000",
            "WEBHOOK_DEDUPE_SECONDS": "60",
            "LOG_FORMAT": "CONSOLE",
        }
    )
    assert len(s.webhook_secrets) == 2
    assert s.allowed_ips[1] == ipaddress.ip_network("2001:db8::1/128")
    assert s.trusted_proxies == (ipaddress.ip_network("172.16.0.0/12"),)
    assert (s.max_body_bytes, s.dedupe_seconds, s.log_format) == (1000, 60, "console")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("BRIDGE_WEBHOOK_SECRETS", f"{SECRET},,", "BRIDGE_WEBHOOK_SECRETS: contains an empty secret"),
        ("BRIDGE_WEBHOOK_SECRETS", "short", "BRIDGE_WEBHOOK_SECRETS: every secret must be at least 8"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL: expected a URL starting with redis://"),
        ("DATABASE_URL", "mysql://x/y", "DATABASE_URL: expected postgresql://"),
        ("DATABASE_URL", "sqlite://relative.db", "DATABASE_URL: a SQLite URL has three slashes"),
        ("BRIDGE_ALLOWED_IPS", "", "BRIDGE_ALLOWED_IPS: must list at least one"),
        (
            "BRIDGE_ALLOWED_IPS",
            "63.32.31.5,bridge.example",
            "BRIDGE_ALLOWED_IPS: 'bridge.example' is not an IP",
        ),
        ("TRUSTED_PROXIES", "10.0.0.0/33", "TRUSTED_PROXIES: '10.0.0.0/33' is not an IP"),
        ("WEBHOOK_MAX_BODY_BYTES", "64k", "WEBHOOK_MAX_BODY_BYTES: expected a positive integer, got '64k'"),
        ("WEBHOOK_MAX_BODY_BYTES", "0", "WEBHOOK_MAX_BODY_BYTES: expected a positive integer"),
        ("WEBHOOK_DEDUPE_SECONDS", "-5", "WEBHOOK_DEDUPE_SECONDS: expected a positive integer"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT: expected one of json, console, got 'xml'"),
        ("RQ_QUEUE", "a queue", "RQ_QUEUE: use letters"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str, message: str) -> None:
    env = {"BRIDGE_WEBHOOK_SECRETS": SECRET, name: value}
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_require_names_what_a_command_needs() -> None:
    settings = Settings.from_env({})
    assert settings.webhook_secrets == ()
    with pytest.raises(SettingsError, match=r"^BRIDGE_WEBHOOK_SECRETS: required"):
        settings.require("BRIDGE_WEBHOOK_SECRETS")
    with pytest.raises(SettingsError, match=r"^BRIDGE_CLIENT_SECRET: required"):
        Settings.from_env({"BRIDGE_CLIENT_ID": "x"}).require("BRIDGE_CLIENT_ID", "BRIDGE_CLIENT_SECRET")


def test_worker_settings() -> None:
    s = Settings.from_env(
        {
            "BRIDGE_API_URL": "http://127.0.0.1:9/v3/aggregation",
            "BRIDGE_CLIENT_ID": "id",
            "BRIDGE_CLIENT_SECRET": "client-secret-value",
            "BRIDGE_RATE_LIMIT_USER": "30/60",
            "BRIDGE_BUDGET_MAX_WAIT_SECONDS": "0",
            "WORKER_RETRY_INTERVALS": "1, 2,3",
        }
    )
    assert s.rate_user == (30, 60)
    assert s.budget_max_wait_seconds == 0
    assert Settings.from_env({}).budget_max_wait_seconds == 10
    assert s.retry_intervals == (1, 2, 3)
    assert "client-secret-value" not in repr(s)
    assert Settings.from_env({"WORKER_RETRY_INTERVALS": ""}).retry_intervals == ()
    for name, value in (("BRIDGE_RATE_LIMIT_APP", "2000"), ("WORKER_RETRY_INTERVALS", "10,1m")):
        with pytest.raises(SettingsError, match=f"^{name}: expected"):
            Settings.from_env({name: value})


def test_powens_client_settings() -> None:
    unset = Settings.from_env({})
    assert (unset.powens_api_url, unset.powens_client_id, unset.powens_client_secret) == (None, None, None)
    assert (unset.powens_rate_app, unset.powens_rate_user, unset.powens_timeout_seconds) == (
        (1000, 60),
        (30, 60),
        30,
    )
    with pytest.raises(SettingsError, match=r"^POWENS_CLIENT_SECRET: required; set it to the client secret"):
        unset.require("POWENS_CLIENT_SECRET")
    s = Settings.from_env(
        {
            "POWENS_API_URL": "https://acme-sandbox.biapi.pro/2.0",
            "POWENS_CLIENT_ID": "12345678",
            "POWENS_CLIENT_SECRET": "powens-client-secret-value",
            "POWENS_RATE_LIMIT_USER": "20/60",
            "POWENS_TIMEOUT_SECONDS": "12",
        }
    )
    s.require("POWENS_API_URL", "POWENS_CLIENT_ID", "POWENS_CLIENT_SECRET")
    assert s.powens_rate_user == (20, 60) and s.powens_timeout_seconds == 12.0
    assert "powens-client-secret-value" not in repr(s) + str(s)
    with pytest.raises(SettingsError, match=r"^POWENS_API_URL: expected a URL starting with https://"):
        Settings.from_env({"POWENS_API_URL": "acme.biapi.pro/2.0"})


def test_secret_values_never_appear_in_errors() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"BRIDGE_WEBHOOK_SECRETS": "tiny,also-a-valid-long-one"})
    assert "tiny" not in str(info.value)
    assert "also-a-valid-long-one" not in str(info.value)


def test_repr_hides_secrets_and_urls() -> None:
    s = Settings.from_env(
        {
            "BRIDGE_WEBHOOK_SECRETS": SECRET,
            "REDIS_URL": "redis://:redispass@redis:6379/0",
            "DATABASE_URL": "postgresql://app:dbpass@db/bridge",
        }
    )
    text = repr(s) + str(s) + repr(s.webhook_secrets)
    for leaked in (SECRET, "redispass", "dbpass"):
        assert leaked not in text
    assert "Secret('**********')" in text
    assert s.redis_url_for_logs == "redis://:***@redis:6379/0"
    assert s.database_url_for_logs == "postgresql://app:***@db/bridge"


def test_mask_url_leaves_passwordless_urls_alone() -> None:
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert Secret("x") == Secret("x")
    assert f"{Secret('abc')}" == "Secret('**********')"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"WEBHOOK_MAX_BODY_BYTES": "lots"},
            "bridgehook: WEBHOOK_MAX_BODY_BYTES: expected a positive integer",
        ),
        ({"BRIDGE_WEBHOOK_SECRETS": ""}, "bridgehook: BRIDGE_WEBHOOK_SECRETS: required"),
        ({"REDIS_URL": ""}, "bridgehook: REDIS_URL: required; set it to redis://"),
        (
            {"BRIDGE_WEBHOOK_SECRETS_FILE": "/run/secrets/webhook"},
            "bridgehook: BRIDGE_WEBHOOK_SECRETS and BRIDGE_WEBHOOK_SECRETS_FILE are both set",
        ),
        (
            {"BRIDGE_WEBHOOK_SECRETS": "", "BRIDGE_WEBHOOK_SECRETS_FILE": "/nonexistent/webhook"},
            "bridgehook: BRIDGE_WEBHOOK_SECRETS_FILE: cannot read /nonexistent/webhook: No such file",
        ),
        (  # more than the process may open (file descriptors)
            {"WEBHOOK_MAX_CONNECTIONS": "100000000"},
            "bridgehook: WEBHOOK_MAX_CONNECTIONS: 100000000 connections need 100000128 file descriptors",
        ),
    ],
)
def test_serve_stops_at_start_with_one_line(env: dict[str, str], expected: str) -> None:
    full = {**os.environ, "BRIDGE_WEBHOOK_SECRETS": SECRET, "REDIS_URL": "redis://127.0.0.1:1/0", **env}
    proc = subprocess.run(
        [sys.executable, "-m", "bridgehook", "serve", "--port", "1"],
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(expected)
    assert SECRET not in proc.stderr


# -- secrets from files (NAME_FILE) and the migrations' own database URL ----------------------------

FILE_VALUES = {
    "BRIDGE_WEBHOOK_SECRETS": SECRET,
    "BRIDGE_CLIENT_ID": "client-id-from-a-file",
    "BRIDGE_CLIENT_SECRET": "client-secret-from-a-file",
    "ENCRYPTION_KEYS": "6mWqVnV0mQ8m1Wk0cJ3X2r9yqTQdM0tq4bXn5lq0e3Q=",
    "DATABASE_URL": "postgresql://app:filepass@db/bridge",
    "DATABASE_URL_MIGRATE": "postgresql://owner:migratepass@db/bridge",
    "REDIS_URL": "redis://:redisfilepass@redis:6379/0",
    "POWENS_CLIENT_ID": "powens-id-from-a-file",
    "POWENS_CLIENT_SECRET": "powens-secret-from-a-file",
}


def revealed(settings: Settings) -> dict[str, str | None]:
    """The settings of FILE_VALUES' variables, as plain text."""
    client_secret = settings.bridge_client_secret
    powens_secret = settings.powens_client_secret
    return {
        "BRIDGE_WEBHOOK_SECRETS": ",".join(s.reveal() for s in settings.webhook_secrets),
        "BRIDGE_CLIENT_ID": settings.bridge_client_id,
        "BRIDGE_CLIENT_SECRET": None if client_secret is None else client_secret.reveal(),
        "ENCRYPTION_KEYS": ",".join(k.reveal() for k in settings.encryption_keys),
        "DATABASE_URL": settings.database_url,
        "DATABASE_URL_MIGRATE": settings.database_url_migrate,
        "REDIS_URL": settings.redis_url,
        "POWENS_CLIENT_ID": settings.powens_client_id,
        "POWENS_CLIENT_SECRET": None if powens_secret is None else powens_secret.reveal(),
    }


def test_every_secret_can_be_read_from_a_file_without_its_trailing_newline(tmp_path: Path) -> None:
    env = {}
    for name, value in FILE_VALUES.items():
        (tmp_path / name).write_text(value + "\n")  # as `echo` or an editor leaves it
        env[f"{name}_FILE"] = str(tmp_path / name)
    s = Settings.from_env(env)
    assert revealed(s) == FILE_VALUES
    assert revealed(Settings.from_env(FILE_VALUES)) == FILE_VALUES  # the same as set directly
    text = repr(s) + str(s)
    secrets = (SECRET, "client-secret-from", FILE_VALUES["ENCRYPTION_KEYS"], "filepass", "migratepass",
               "powens-secret-from")  # fmt: skip
    assert not [secret for secret in secrets if secret in text]
    # Only the secrets: another variable's _FILE is no way to set it.
    (tmp_path / "level").write_text("debug")
    assert Settings.from_env({"LOG_LEVEL_FILE": str(tmp_path / "level")}).log_level == "info"


def test_a_secret_set_both_ways_is_one_line_naming_both(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("client-secret-from-a-file")
    env = {"BRIDGE_CLIENT_SECRET": "client-secret-set", "BRIDGE_CLIENT_SECRET_FILE": str(tmp_path / "secret")}
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value) == (
        "BRIDGE_CLIENT_SECRET and BRIDGE_CLIENT_SECRET_FILE are both set: set only one of them"
    )
    # An empty variable is an unset one (as everywhere): the file is read.
    assert Settings.from_env({**env, "BRIDGE_CLIENT_SECRET": ""}).bridge_client_secret == Secret(
        "client-secret-from-a-file"
    )


def test_an_unreadable_secret_file_is_one_line_naming_the_variable_and_the_path(tmp_path: Path) -> None:
    (tmp_path / "binary").write_bytes(b"\xffnot-utf8-secret-content")
    (tmp_path / "locked").write_text("locked-secret-content")
    (tmp_path / "locked").chmod(0)
    cases = {
        tmp_path / "absent": f"REDIS_URL_FILE: cannot read {tmp_path / 'absent'}: No such file or directory",
        tmp_path: f"REDIS_URL_FILE: cannot read {tmp_path}: Is a directory",
        tmp_path / "binary": f"REDIS_URL_FILE: {tmp_path / 'binary'} is not UTF-8 text",
    }
    if os.geteuid() != 0:  # (root reads a file of mode 000)
        cases[tmp_path / "locked"] = f"REDIS_URL_FILE: cannot read {tmp_path / 'locked'}: Permission denied"
    for path, message in cases.items():
        with pytest.raises(SettingsError) as info:
            Settings.from_env({"REDIS_URL_FILE": str(path)})
        assert str(info.value) == message
        assert "content" not in str(info.value)


def test_migrations_connect_as_database_url_migrate_when_set() -> None:
    runtime = Settings.from_env({"DATABASE_URL": "postgresql://app:dbpass@db/bridge"})
    assert runtime.migrate_url == runtime.database_url
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://app:dbpass@db/bridge",
            "DATABASE_URL_MIGRATE": "postgresql://owner:ownerpass@db/bridge",
        }
    )
    assert s.database_url == "postgresql://app:dbpass@db/bridge"
    assert s.migrate_url == "postgresql://owner:ownerpass@db/bridge"
    assert s.migrate_url_for_logs == "postgresql://owner:***@db/bridge"
    assert "ownerpass" not in repr(s) + str(s)
    with pytest.raises(SettingsError, match=r"^DATABASE_URL_MIGRATE: expected postgresql://"):
        Settings.from_env({"DATABASE_URL_MIGRATE": "mysql://owner@db/bridge"})
