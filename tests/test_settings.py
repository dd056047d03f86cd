"""Settings: defaults, one clear error per bad variable, secrets that never show."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

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
