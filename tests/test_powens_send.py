"""`bridgehook send --provider powens`, as a process, against a receiver configured as `make run` does,
and against `make run` itself."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import redis

from bridgehook.devenv import POWENS_FILE, apply_dev_defaults
from service import bearer
from service.settings import Settings
from tests.faults.support import wait_until
from tests.support import POWENS_SECRET, free_port, queued_ids, running_receiver
from tests.test_cli import (
    dev_env,
    run,
    running,
    start_dev,
    started,  # noqa: F401 (the fixture that kills what a test left running)
    wait_for_stack,
)


def test_send_a_powens_fixture_to_the_local_stack(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    """`make run`'s defaults create a Powens secret; `send` finds it in the same home and signs with it."""
    env = {"REDIS_URL": redis_url}
    apply_dev_defaults(env, tmp_path)
    assert (tmp_path / POWENS_FILE).stat().st_mode & 0o777 == 0o600
    assert env["POWENS_WEBHOOK_SECRETS"] == (tmp_path / POWENS_FILE).read_text()
    client_env = {**os.environ, "BRIDGEHOOK_HOME": str(tmp_path), "POWENS_WEBHOOK_SECRETS": ""}
    with running_receiver(Settings.from_env(env)) as (base, _):
        url = base + "/webhooks/bridge"  # the receiver's URL, as `bridgehook dev` records it
        sent = run(
            "send", "--provider", "powens", "--fixture", "connection.synced", "--url", url, env=client_env
        )
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout[4:]) == {
            "status": "queued",
            "event_id": "powens-connection_synced-5537101",
        }
        again = run(
            "send", "--provider", "powens", "--fixture", "connection.synced", "--url", url, env=client_env
        )
        assert json.loads(again.stdout[4:])["status"] == "duplicate"
        fresh = run(
            "send",
            "--provider",
            "powens",
            "--fixture",
            "connection.synced",
            "--fresh",
            "--url",
            url,
            env=client_env,
        )
        assert json.loads(fresh.stdout[4:])["status"] == "queued"
        body = tmp_path / "deleted.json"
        body.write_text('{"id": 1093, "id_webhook_data": 77}')
        by_file = run(
            "send",
            "--provider",
            "powens",
            "--file",
            str(body),
            "--event",
            "USER_DELETED",
            "--url",
            url,
            env=client_env,
        )
        assert json.loads(by_file.stdout[4:])["event_id"] == "powens-user_deleted-77"
        wrong = run(
            "send",
            "--provider",
            "powens",
            "--fixture",
            "user.deleted",
            "--url",
            url,
            env={**client_env, "POWENS_WEBHOOK_SECRETS": "another-secret-xyz"},
        )
        assert wrong.returncode == 1 and wrong.stdout.startswith("401 ")
    assert len(queued_ids(r)) == 3


def test_powens_send_usage_errors(tmp_path: Path) -> None:
    env = {**os.environ, "BRIDGEHOOK_HOME": str(tmp_path), "POWENS_WEBHOOK_SECRETS": ""}
    url = f"http://127.0.0.1:{free_port()}/webhooks/bridge"
    listed = run("send", "--provider", "powens", "--list", env=env)
    assert "connection.synced" in listed.stdout.split() and "item.created" not in listed.stdout.split()
    no_secret = run("send", "--provider", "powens", "--fixture", "user.deleted", "--url", url, env=env)
    assert no_secret.returncode == 2 and "no secret: set POWENS_WEBHOOK_SECRETS" in no_secret.stderr
    env["POWENS_WEBHOOK_SECRETS"] = POWENS_SECRET
    unknown = run("send", "--provider", "powens", "--fixture", "item.created", env=env)
    assert unknown.returncode == 2 and "no Powens fixture" in unknown.stderr
    body = tmp_path / "b.json"
    body.write_text("{}")
    no_event = run("send", "--provider", "powens", "--file", str(body), env=env)
    assert no_event.returncode == 2 and "--event" in no_event.stderr
    bridge_event = run("send", "--fixture", "item.created", "--event", "x", env=env)
    assert bridge_event.returncode == 2
    unreachable = run("send", "--provider", "powens", "--fixture", "user.deleted", "--url", url, env=env)
    assert unreachable.returncode == 1 and "could not POST" in unreachable.stderr


def test_make_run_turns_the_powens_fixture_into_rows(
    tmp_path: Path,
    started: dict[int, str],  # noqa: F811 (the fixture imported above)
) -> None:
    """The README's Powens line on `make run`: the stack serves a fake Powens holding the fixtures' user
    and stores that user's token (encrypted), so that `send --provider powens --fixture
    connection.synced` ends with the connection's rows in SQLite, listed from the fake too, and no dead
    letter; `bridgehook dev --stop` then stops it all."""
    home = tmp_path / ".bridgehook"
    with open(tmp_path / "dev.log", "wb") as log:  # a file: a pipe nobody reads would fill and block dev
        proc = start_dev(started, tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        children = wait_for_stack(proc, home, started)
        sent = run(
            "send", "--provider", "powens", "--fixture", "connection.synced", env=dev_env(), cwd=tmp_path
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert json.loads(sent.stdout[4:])["status"] == "queued"
        db = sqlite3.connect(home / "bridgehook.db")
        query = "SELECT status FROM webhook_events WHERE type = 'CONNECTION_SYNCED'"
        wait_until(lambda: db.execute(query).fetchall() == [("done",)], 30, "the worker to take the event")
        assert db.execute("SELECT id, provider, status, user_uuid FROM items").fetchall() == [
            (-4102, "powens", 0, "powens-1093")
        ]
        accounts = "SELECT id, item_id, provider, balance, data_access FROM accounts ORDER BY id"
        assert db.execute(accounts).fetchall() == [
            (-7312, -4102, "powens", "310.0", "disabled"),  # awaiting consent: from the fake's listing
            (-7311, -4102, "powens", "1523.47", "enabled"),
        ]
        transactions = "SELECT id, account_id, amount, date, future FROM transactions ORDER BY id"
        assert db.execute(transactions).fetchall() == [
            (-900118, -7311, "-42.5", "2026-12-08", 1),
            (-900117, -7311, "-23.8", "2026-12-05", 0),
        ]
        [(token,)] = db.execute("SELECT token FROM user_tokens WHERE user_uuid = 'powens-1093'").fetchall()
        assert token.startswith("bh1:")  # encrypted with the stack's key
        db.close()
        published = redis.Redis.from_url((home / "redis.url").read_text().strip()).hgetall(bearer.KEY)
        assert list(published) == [b"1093"] and len(published[b"1093"]) == 64  # for bearer mode
        dead = run("dlq", "list", "--json", env=dev_env(), cwd=tmp_path)
        assert dead.returncode == 0 and dead.stdout == "", dead.stdout + dead.stderr
        stopped = run("dev", "--stop", env=dev_env(), cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    out = (tmp_path / "dev.log").read_text()
    assert "(fake, the Powens fixtures' user; its token stored)" in out  # the banner
    assert "powens.listed" in out and "written=2" in out  # the worker listed from the fake
    assert [pid for pid, when in children.items() if running(pid, when)] == []
