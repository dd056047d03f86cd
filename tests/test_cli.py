"""The `bridgehook` command through its real entry point, as processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
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
        "LOG_LEVEL": "debug",  # accepted deliveries log at debug
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


def worker_pids(r: redis.Redis, timeout: float) -> set[int]:
    """The pids of the RQ workers registered in ``r``, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {int(r.hget(key, "pid") or 0) for key in r.smembers("rq:workers")} - {0}
        if pids:
            return pids
        time.sleep(0.2)
    return set()


def test_dev_runs_everything_on_the_embedded_default(tmp_path: Path) -> None:
    """What `make run` does: no REDIS_URL, no database, no Bridge; a fixture becomes rows in SQLite."""
    port = free_port()
    unset = ("REDIS_URL", "BRIDGE_WEBHOOK_SECRETS", "DATABASE_URL", "BRIDGE_API_URL", "BRIDGE_CLIENT_ID",
             "BRIDGE_CLIENT_SECRET", "ENCRYPTION_KEYS", "ALLOW_PLAINTEXT_STORAGE")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["BRIDGEHOOK_HOME"] = str(tmp_path)
    proc = subprocess.Popen([*BIN, "dev", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz")
        url = f"http://127.0.0.1:{port}/webhooks/bridge"
        for fixture in ("item.created", "item.refreshed"):
            sent = run("send", "--fixture", fixture, "--url", url, env=env)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert json.loads(sent.stdout[4:])["status"] == "queued"
        redis_url = (tmp_path / "redis.url").read_text().strip()
        r = redis.Redis.from_url(redis_url)
        assert r.config_get("appendonly")["appendonly"] == "yes"
        r.close()
        assert (tmp_path / "webhook-secret").stat().st_mode & 0o777 == 0o600
        db = sqlite3.connect(tmp_path / "bridgehook.db")
        deadline = time.monotonic() + 20
        while db.execute("SELECT count(*) FROM webhook_events WHERE type = 'item.created' AND status = 'done'"
                         ).fetchone() != (1,):  # fmt: skip
            assert time.monotonic() < deadline, "the worker did not process item.created"
            time.sleep(0.2)
        # The fixture's item, its two accounts and their transactions, fetched from the fake Bridge.
        assert db.execute("SELECT id, status FROM items WHERE id = 4568477").fetchall() == [(4568477, 0)]
        assert db.execute("SELECT count(*) FROM accounts WHERE item_id = 4568477").fetchone() == (2,)
        assert db.execute("SELECT count(*) FROM transactions").fetchone()[0] == 150
        # Bank data is encrypted with a local key made for the purpose, and readable through the CLI.
        assert (tmp_path / "encryption-key").stat().st_mode & 0o777 == 0o600
        [(iban, name)] = db.execute("SELECT iban, name FROM accounts WHERE id = 22908771").fetchall()
        assert iban.startswith("bh1:") and name.startswith("bh1:")
        db.close()
        show = run("accounts", "show", "22908771", "--reveal", env=env)
        assert show.returncode == 0, show.stderr
        assert "Livret A" in show.stdout and "FR7630006000019876543210128" in show.stdout
        # A worker that dies is restarted, as Kubernetes would restart its pod.
        r = redis.Redis.from_url(redis_url)
        first = worker_pids(r, timeout=20)
        os.killpg(first.pop(), signal.SIGKILL)
        r.delete(*r.smembers("rq:workers"))  # what RQ's cleanup would do, minutes later
        assert worker_pids(r, timeout=20), "the worker was not restarted"
        r.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "warm shut down requested" in out
    assert not (tmp_path / "redis.url").exists()
    assert (tmp_path / "valkey" / "appendonlydir").is_dir()


def test_db_upgrade_twice_and_concurrently(tmp_path: Path, pg_schema_url: str) -> None:
    for url in (f"sqlite:///{tmp_path / 'x.db'}", pg_schema_url):
        env = {**os.environ, "DATABASE_URL": url}
        procs = [subprocess.Popen([*BIN, "db", "upgrade"], env=env, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]  # fmt: skip
        outputs = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        assert sum("applied migrations [1, 2, 3, 4]" in o for o in outputs) == 1
        assert sum("is up to date" in o for o in outputs) == 2
        again = run("db", "upgrade", env=env)
        assert again.returncode == 0
        assert "is up to date" in again.stderr
    bad = run("db", "upgrade", env={**os.environ, "DATABASE_URL": "postgresql://nobody:pw@127.0.0.1:1/x"})
    assert bad.returncode == 1
    assert bad.stderr.startswith(
        "bridgehook: database postgresql://nobody:***@127.0.0.1:1/x: OperationalError"
    )
    assert "pw@" not in bad.stderr
