"""The `bridgehook` command through its real entry point, as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from tests.support import SECRET, free_port, wait_for_http

BIN = [sys.executable, "-m", "bridgehook"]


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BIN, *args], env=env, capture_output=True, text=True, timeout=60)


def test_serve_and_send_a_fixture(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "BRIDGE_WEBHOOK_SECRETS": SECRET,
        "BRIDGE_ALLOWED_IPS": "127.0.0.1",
        "BRIDGEHOOK_HOME": str(tmp_path),
    }
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*BIN, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/livez")
        url = f"http://127.0.0.1:{port}/webhooks/bridge"
        sent = run("send", "--fixture", "item.refreshed", "--url", url, env=env)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.startswith("200 ")
        assert json.loads(sent.stdout[4:])["status"] == "queued"
        again = run("send", "--fixture", "item.refreshed", "--url", url, env=env)
        assert json.loads(again.stdout[4:])["status"] == "duplicate"
        fresh = run("send", "--fixture", "item.refreshed", "--fresh", "--url", url, env=env)
        assert json.loads(fresh.stdout[4:])["status"] == "queued"
        wrong = run(
            "send",
            "--fixture",
            "item.refreshed",
            "--url",
            url,
            env={**env, "BRIDGE_WEBHOOK_SECRETS": "some-other-secret-xyz"},
        )
        assert wrong.returncode == 1
        assert wrong.stdout.startswith("401 ")
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn drains, then re-raises the signal so that the exit status tells it.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert r.llen("rq:queue:bridgehook") == 2
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # production logs are JSON lines
    events = [rec["event"] for rec in records]
    assert "receiver.started" in events
    assert "receiver.stopped" in events  # the graceful shutdown ran
    assert [rec.get("outcome") for rec in records if rec["event"] == "webhook.accepted"] == [
        "queued",
        "duplicate",
        "queued",
    ]
    assert any(rec["event"] == "webhook.rejected" and rec["reason"] == "invalid_signature" for rec in records)
    assert all("request_id" in rec for rec in records if rec["event"].startswith("webhook."))
    assert SECRET not in log_path.read_text()


def test_send_usage_errors(tmp_path: Path) -> None:
    env = {**os.environ, "BRIDGEHOOK_HOME": str(tmp_path), "BRIDGE_WEBHOOK_SECRETS": ""}
    assert run("send", "--fixture", "nope", env=env).returncode == 2
    assert run("send", env=env).returncode == 2
    no_secret = run("send", "--fixture", "item.created", env=env)
    assert no_secret.returncode == 2
    assert "no secret" in no_secret.stderr
    listed = run("send", "--list", env=env)
    assert "item.refreshed" in listed.stdout.split()
    unreachable = run(
        "send",
        "--fixture",
        "item.created",
        "--url",
        f"http://127.0.0.1:{free_port()}/x",
        env={**env, "BRIDGE_WEBHOOK_SECRETS": SECRET},
    )
    assert unreachable.returncode == 1
    assert "could not POST" in unreachable.stderr


def test_dev_runs_on_the_embedded_default(tmp_path: Path) -> None:
    """What `make run` does: no REDIS_URL, no secret; an embedded valkey under BRIDGEHOOK_HOME."""
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "BRIDGE_WEBHOOK_SECRETS", "DATABASE_URL")
    }
    env["BRIDGEHOOK_HOME"] = str(tmp_path)
    proc = subprocess.Popen(
        [*BIN, "dev", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz")
        sent = run(
            "send",
            "--fixture",
            "item.refreshed",
            "--url",
            f"http://127.0.0.1:{port}/webhooks/bridge",
            env=env,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert json.loads(sent.stdout[4:])["status"] == "queued"
        redis_url = (tmp_path / "redis.url").read_text().strip()
        r = redis.Redis.from_url(redis_url)
        assert r.llen("rq:queue:bridgehook") == 1
        assert r.config_get("appendonly")["appendonly"] == "yes"
        r.close()
        assert (tmp_path / "webhook-secret").stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert not (tmp_path / "redis.url").exists()
    assert (tmp_path / "valkey" / "appendonlydir").is_dir()
