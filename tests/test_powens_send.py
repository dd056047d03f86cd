"""`bridgehook send --provider powens`, as a process, against a receiver configured as `make run` does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import redis

from bridgehook.devenv import POWENS_FILE, apply_dev_defaults
from service.settings import Settings
from tests.support import POWENS_SECRET, free_port, queued_ids, running_receiver
from tests.test_cli import run


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
