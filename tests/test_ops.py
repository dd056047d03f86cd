"""Operations through the real `bridgehook` entry point (click's runner), on SQLite and PostgreSQL,
with real Redis, the fake Bridge over HTTP and RQ workers."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from click.testing import CliRunner
from freezegun import freeze_time
from prometheus_client import REGISTRY, CollectorRegistry
from rq.job import Job
from rq.serializers import JSONSerializer

from bridgehook.cli import main
from fakebridge.world import World
from tests.harness import Harness, storage_at
from tests.support import TEST_ENCRYPTION_KEY, Cli, make_settings, queued_ids
from workers import context, jobs
from workers.codec import generate_key
from workers.db import Database, to_datetime
from workers.deadletters import DeadLetters
from workers.observe import StatusCollector, snapshot
from workers.reconcile import Reconciler
from workers.replay import Enqueuer
from workers.scheduler import enqueue_sweep
from workers.schema import upgrade
from workers.storage import Storage


def items(world: World, n: int, per_account: int = 30) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        user = world.add_user()
        item = world.add_item(user)
        account = world.add_account(item)
        world.add_transactions(account, per_account)
        out.append((user, item))
    return out


# The event loops of the fake Bridge and the receiver (threads of this process) keep real time;
# what we freeze is our code's and RQ's clock.
REAL_TIME = [
    "asyncio",
    "anyio",
    "uvicorn",
    "httpcore",
    "h11",
    "httptools",
    "selectors",
    "concurrent",
    "threading",
]


def frozen(at: datetime) -> Any:
    return freeze_time(at, tick=True, ignore=REAL_TIME)


def dead_ids(harness: Harness) -> set[str]:
    return set(harness.failed_ids())


def test_dead_letters_list_show_replay(harness: Harness, world: World, cli: Cli) -> None:
    (_, good), (_, bad) = items(world, 2)
    world.faults.fail_item(bad, status=500)
    harness.send(world.event_item_created(good))
    harness.send(world.event_item_created(bad))
    harness.send(world.event_item_refreshed(bad))
    harness.drain()
    assert len(dead_ids(harness)) == 2

    listed = cli("dlq", "list")
    assert listed.exit_code == 0
    assert "2 dead letter(s)" in listed.output
    assert "item.created" in listed.output and "item.refreshed" in listed.output
    rows = [json.loads(line) for line in cli("dlq", "list", "--json").output.splitlines()]
    assert {r["item_id"] for r in rows} == {bad}
    assert all(r["attempts"] == 4 and "TransientError" in r["error"] for r in rows)
    assert len(cli("dlq", "list", "--json", "--type", "item.refreshed").output.splitlines()) == 1
    assert len(cli("dlq", "list", "--json", "--item", str(good)).output.splitlines()) == 0
    assert len(cli("dlq", "list", "--json", "--error", "500 FROM BRIDGE").output.splitlines()) == 2
    assert len(cli("dlq", "list", "--json", "--since", "1h", "--limit", "1").output.splitlines()) == 1
    assert cli("dlq", "list", "--json", "--until", "1h").output == ""

    shown = cli("dlq", "show", rows[0]["id"][:12])
    assert shown.exit_code == 0
    assert rows[0]["id"] in shown.output
    attempts = shown.output.split("attempts", 1)[1].split("last traceback")[0]
    assert attempts.count("TransientError: 500 from Bridge") == 4, shown.output  # each attempt, its error
    assert "Traceback" in shown.output and "TransientError" in shown.output
    # Issue #17: a prefix too short to take said the dead letter was not there. It is named instead.
    short = cli("dlq", "show", rows[0]["id"][:5])
    assert short.exit_code == 1
    assert short.stdout == "" and len(short.stderr.splitlines()) == 1, short.stderr
    assert rows[0]["id"][:12] in short.stderr and "not in the dead-letter queue" not in short.stderr

    # Fix Bridge; a dry run reports the right count and changes nothing.
    world.faults.unfail_item(bad)
    dry = cli("dlq", "replay", "--all", "--dry-run")
    assert dry.exit_code == 0
    assert "would replay 2 dead letter(s)" in dry.output
    assert len(dead_ids(harness)) == 2
    assert harness.r.llen("rq:queue:bridgehook") == 0

    replayed = cli("dlq", "replay", "--all")
    assert replayed.exit_code == 0, replayed.output
    assert "requeued 2, missing 0" in replayed.output
    for job_id in {r["id"] for r in rows}:  # its retries back: one more blip would not send it back
        job = Job.fetch(job_id, connection=harness.r, serializer=JSONSerializer)
        assert job.retries_left == len(job.retry_intervals or ()) == 3
    harness.drain()
    assert dead_ids(harness) == set()
    assert harness.tables() == harness.truth()
    assert harness.rows("SELECT status, attempts FROM webhook_events WHERE item_id = %s", (bad,)) == [
        ("done", 5),
        ("done", 5),
    ]
    assert harness.r.hget("bridgehook:replays", "requeued") == b"2"


def test_replay_asks_above_ten_and_survives_interruption(harness: Harness, world: World, cli: Cli) -> None:
    made = items(world, 12, per_account=3)
    for _, item in made:
        world.faults.fail_item(item, status=400)  # permanent: straight to the DLQ
        harness.send(world.event_item_created(item))
    harness.drain()
    assert len(dead_ids(harness)) == 12

    refused = cli("dlq", "replay", "--all", input="n\n")
    assert refused.exit_code == 1
    assert "Replay 12 events?" in refused.output
    assert len(dead_ids(harness)) == 12

    for _, item in made:
        world.faults.unfail_item(item)
    # An operator's Ctrl-C after five requeues…
    letters = DeadLetters(harness.r, harness.settings.queue_name, None)
    done: list[str] = []

    def interrupt(job_id: str, outcome: str) -> None:
        done.append(job_id)
        if len(done) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        letters.replay(sorted(letters.ids()), progress=interrupt)
    assert len(dead_ids(harness)) == 7
    # …then the same command again: only what is left goes, nothing twice.
    assert cli("dlq", "replay", "--all", "--rate", "fast").exit_code == 2
    rerun = cli("dlq", "replay", "--all", "--yes", "--rate", "6000/m")
    assert rerun.exit_code == 0
    assert "requeued 7, missing 0" in rerun.output
    assert harness.r.llen("rq:queue:bridgehook") == 12
    harness.drain()
    assert dead_ids(harness) == set()
    assert harness.tables() == harness.truth()


def test_event_failing_again_returns_with_one_more_attempt(harness: Harness, world: World, cli: Cli) -> None:
    [(_, item)] = items(world, 1)
    world.faults.fail_item(item, status=400)
    harness.send(world.event_item_created(item))
    harness.drain()
    [job_id] = dead_ids(harness)
    assert cli("dlq", "replay", job_id).exit_code == 0
    harness.drain()
    assert dead_ids(harness) == {job_id}
    assert harness.rows("SELECT status, attempts FROM webhook_events") == [("failed", 2)]
    missing = cli("dlq", "replay", "0" * 64)
    assert missing.exit_code == 1
    assert "is not in the dead-letter queue" in missing.output


def test_purge_keeps_the_ledger_row(harness: Harness, world: World, cli: Cli) -> None:
    (_, a), (_, b) = items(world, 2)
    for item in (a, b):
        world.faults.fail_item(item, status=400)
        harness.send(world.event_item_created(item))
    harness.drain()
    ids = sorted(dead_ids(harness))
    assert cli("dlq", "purge").exit_code == 2  # says which, or nothing happens
    assert cli("dlq", "purge", "--all", "--dry-run").output.startswith("would purge 2")
    assert cli("dlq", "purge", "nonexistent-id").exit_code == 1
    purged = cli("dlq", "purge", ids[0])
    assert purged.exit_code == 0 and "purged 1" in purged.output
    assert dead_ids(harness) == {ids[1]}
    assert harness.rows("SELECT status FROM webhook_events WHERE id = %s", (ids[0],)) == [("purged",)]
    assert harness.r.exists(f"rq:job:{ids[0]}") == 0


def test_events_replay_from_the_archive_by_window(harness: Harness, world: World, cli: Cli) -> None:
    batches: list[list[int]] = []
    marks: list[datetime] = []
    for _ in range(3):
        marks.append(datetime.now(UTC))
        time.sleep(0.02)
        made = items(world, 2, per_account=2)
        for _, item in made:
            harness.send(world.event_item_created(item))
        batches.append([item for _, item in made])
        time.sleep(0.02)
    marks.append(datetime.now(UTC))
    harness.drain()
    # "We lost a bug's worth of rows": wipe them, then replay the middle window only.
    with harness.db.transaction() as tx:
        for table in ("items", "accounts", "transactions"):
            tx.execute(f"DELETE FROM {table}")  # noqa: S608
    window = ("--since", marks[1].isoformat(), "--until", marks[2].isoformat())
    dry = cli("events", "replay", *window, "--dry-run")
    assert dry.exit_code == 0
    assert "would replay 2 event(s) from the archive" in dry.output
    assert harness.r.llen("rq:queue:bridgehook") == 0
    done = cli("events", "replay", *window)
    assert done.exit_code == 0 and "queued 2" in done.output
    harness.drain()
    assert sorted(row[0] for row in harness.rows("SELECT id FROM items")) == sorted(batches[1])
    only = cli("events", "replay", "--since", marks[0].isoformat(), "--item", str(batches[2][0]))
    assert "queued 1" in only.output


def test_events_replay_from_the_ledger_with_frozen_time(harness: Harness, world: World, cli: Cli) -> None:
    made = items(world, 3, per_account=2)
    start = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    for _, item in made:
        harness.send(world.event_item_created(item))
    harness.drain()
    # Received an hour apart: the ledger keeps when the receiver took each event (its job's meta).
    with harness.db.transaction() as tx:
        for hour, (_, item) in enumerate(made):
            tx.execute(
                "UPDATE webhook_events SET received_at = %s WHERE item_id = %s",
                (start + timedelta(hours=hour), item),
            )
    received = [row[0] for row in harness.rows("SELECT received_at FROM webhook_events ORDER BY received_at")]
    assert len(received) == 3
    window = ("--since", "2026-03-01T09:30:00", "--until", "2026-03-01T10:30:00Z", "--from", "ledger")
    dry = cli("events", "replay", *window, "--dry-run")
    assert "would replay 1 event(s) from the ledger" in dry.output
    assert f"item {made[1][1]}" in dry.output
    assert "queued 1" in cli("events", "replay", *window).output
    assert cli("events", "replay", "--since", "yesterday").exit_code == 2


def test_resync(harness: Harness, world: World, cli: Cli) -> None:
    [(user, item)] = items(world, 1, per_account=40)
    harness.send(world.event_item_created(item))
    harness.drain()
    # A bug wrote wrong rows and pushed the cursor past them.
    with harness.db.transaction() as tx:
        tx.execute("DELETE FROM transactions WHERE id IN (SELECT id FROM transactions ORDER BY id LIMIT 10)")
        tx.execute("UPDATE accounts SET transactions_cursor = %s", (datetime(2099, 1, 1, tzinfo=UTC),))
    assert harness.tables() != harness.truth()
    assert cli("resync").exit_code == 2
    assert cli("resync", "--item", "999999").exit_code == 1
    out = cli("resync", "--item", str(item))
    assert out.exit_code == 0 and f"item {item}: queued" in out.output
    assert "in_flight" in cli("resync", "--item", str(item)).output  # not twice
    harness.drain()
    assert harness.tables() == harness.truth()
    with world.lock:  # a cursor in the future is wrong for sure: forgotten, never sent as `since`
        assert not any("since=2099" in q.query for q in world.requests)

    with harness.db.transaction() as tx:
        tx.execute("DELETE FROM transactions")
    assert "queued" in cli("resync", "--user", user).output
    harness.drain()
    assert harness.tables() == harness.truth()

    with harness.db.transaction() as tx:
        tx.execute("UPDATE items SET last_synced_at = %s", (datetime.now(UTC) - timedelta(hours=3),))
    assert "nothing to resync" in cli("resync", "--all-stale", "4h").output
    stale = cli("resync", "--all-stale", "2h")
    assert f"item {item}: queued" in stale.output
    assert cli("resync", "--all-stale", "soon").exit_code == 2


def test_a_resync_leaves_an_item_whose_bank_is_down(harness: Harness, world: World, cli: Cli) -> None:
    """Issue #17: `resync --item` on an item in 1003 queued a job that retried into the dead letters."""
    [(_, item)] = items(world, 1)
    world.set_item_status(item, 1003)
    harness.send(world.event_item_created(item))
    harness.drain()  # the item's row is written, in 1003; the job ends in the dead letters
    assert harness.rows("SELECT status FROM items") == [(1003,)]
    out = cli("resync", "--item", str(item))
    assert out.exit_code == 0
    assert (
        out.output.splitlines() == [out.output.strip()] and "skipped" in out.output and "1003" in out.output
    )
    assert not queued_ids(harness.r)


def test_a_user_resync_leaves_the_item_whose_bank_is_down(harness: Harness, world: World, cli: Cli) -> None:
    """Issue #17, for `resync --user`: its job failed on the user's item in 1003 and retried into the
    dead letters. That item is skipped with the same one line as `--item`; the others are resynced."""
    [(user, down)] = items(world, 1)
    up = world.add_item(user)
    world.add_transactions(world.add_account(up), 10)
    world.set_item_status(down, 1003)
    for item in (down, up):
        harness.send(world.event_item_created(item))
    harness.drain()  # the item in 1003 is stored so, its job a dead letter
    dead = harness.failed_ids()
    assert len(dead) == 1
    with harness.db.transaction() as tx:
        tx.execute("DELETE FROM transactions")
    skipped = cli("resync", "--item", str(down)).output.strip()
    assert skipped.startswith(f"item {down}: skipped: its bank is unavailable (status 1003)")
    assert cli("resync", "--user", user, "--dry-run").output.splitlines() == [
        skipped,
        f"would resync user {user}",
    ]
    assert not queued_ids(harness.r)
    out = cli("resync", "--user", user)
    assert out.exit_code == 0
    assert out.output.splitlines() == [skipped, f"user {user}: queued"]
    harness.drain()
    assert harness.failed_ids() == dead
    assert harness.ledger()[f"resync-user-{user}"] == ("done", 1)
    [(n,)] = harness.rows("SELECT count(*) FROM transactions")
    assert n == 10  # the other item's, synced again


def test_a_resync_marks_what_bridge_deleted_since_the_cursor(
    harness: Harness, world: World, cli: Cli
) -> None:
    """Webhooks were missed: a transaction we hold was deleted at Bridge, another one added. The
    resync that catches up lists each account since its cursor before everything (a whole listing
    leaves deleted transactions out): the deleted one does not stay live."""
    [(_, item)] = items(world, 1, per_account=40)
    harness.send(world.event_item_created(item))
    harness.drain()
    [(account,)] = harness.rows("SELECT id FROM accounts WHERE item_id = %s", (item,))
    gone = sorted(harness.tables()["transactions"])[5]
    world.delete_transaction(gone)
    added = world.add_transactions(account, 2)
    # An account whose data access was withdrawn keeps its cursor: it is neither listed nor reset.
    disabled = world.add_account(item, data_access="disabled", name="Livret")
    harness.send(world.event_account(disabled, "created"))
    harness.drain()
    then = datetime(2026, 1, 1, tzinfo=UTC)
    with harness.db.transaction() as tx:
        tx.execute("UPDATE accounts SET transactions_cursor = %s WHERE id = %s", (then, disabled))

    assert f"item {item}: queued" in cli("resync", "--item", str(item)).output
    harness.drain()
    tables = harness.tables()
    assert gone not in tables["transactions"] and set(added) <= set(tables["transactions"])
    assert harness.rows("SELECT deleted_at IS NOT NULL FROM transactions WHERE id = %s", (gone,)) == [(True,)]
    assert tables == harness.truth()
    [(cursor,)] = harness.rows("SELECT transactions_cursor FROM accounts WHERE id = %s", (disabled,))
    assert to_datetime(cursor) == then


def sweep(harness: Harness, now: datetime | None = None, *, drain: bool = True) -> dict[str, Any]:
    if drain:
        harness.drain()  # runs what is queued, and builds the worker context
    reconciler = Reconciler(context.current(), now=(lambda: now) if now else (lambda: datetime.now(UTC)))
    return reconciler.run()


def test_1100_is_found_by_polling_until_it_leaves(harness: Harness, world: World) -> None:
    [(_, item)] = items(world, 1, per_account=5)
    harness.send(world.event_item_created(item))
    harness.drain()
    names = harness.rows("SELECT name, iban FROM accounts")
    world.set_item_status(item, 1100)  # Bridge never sends a webhook for this
    counts = sweep(harness)
    assert counts["changed"] == 1 and counts["deltas"] == 0
    assert harness.rows("SELECT status, needs_user_action FROM items") in ([(1100, True)], [(1100, 1)])
    assert sweep(harness)["changed"] == 0  # polled again, still 1100
    assert harness.rows("SELECT name, iban FROM accounts") == names  # never overwritten by XXXX

    account = harness.rows("SELECT id FROM accounts")[0][0]
    world.add_transactions(account, 4)
    world.set_item_status(item, 0)  # verified: it leaves 1100
    counts = sweep(harness)
    assert counts["changed"] == 1 and counts["deltas"] == 1
    harness.drain()
    assert harness.rows("SELECT needs_user_action FROM items") in ([(False,)], [(0,)])
    assert harness.tables() == harness.truth()


def test_missed_webhook_is_caught_by_the_sweep(harness: Harness, world: World) -> None:
    [(_, item)] = items(world, 1, per_account=5)
    harness.send(world.event_item_created(item))
    harness.drain()
    account = harness.rows("SELECT id FROM accounts")[0][0]
    world.add_transactions(account, 6)
    world.set_item_status(item, 0)  # Bridge refreshed; the webhook never reached us
    assert harness.tables() != harness.truth()
    assert sweep(harness)["deltas"] == 1
    assert sweep(harness, drain=False)["deltas"] == 1  # the same refresh: the same job id, not a second job
    assert harness.r.llen("rq:queue:bridgehook") == 1
    harness.drain()
    assert harness.tables() == harness.truth()
    assert sweep(harness)["deltas"] == 0


def test_schedulers_racing_enqueue_one_sweep_per_period(harness: Harness) -> None:
    """Two schedulers (or more) started by mistake: one sweep per period, even once it has run."""
    interval, now, racers = 3600, 1_800_000_123.0, 8
    slot = int(now // interval)
    barrier = threading.Barrier(racers)
    outcomes: list[str] = []

    def scheduler() -> None:
        connection = redis.Redis.from_url(str(harness.settings.redis_url))
        enqueuer = Enqueuer(connection, harness.settings)
        barrier.wait()
        outcomes.append(enqueue_sweep(enqueuer, interval, now))
        connection.close()

    threads = [threading.Thread(target=scheduler) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["duplicate"] * (racers - 1) + ["queued"]
    assert queued_ids(harness.r) == [f"reconcile-sweep-{slot}"]
    harness.drain()  # the sweep runs
    assert harness.failed_ids() == []
    enqueuer = Enqueuer(harness.r, harness.settings)
    assert enqueue_sweep(enqueuer, interval, now + 60) == "duplicate"  # done, but still this period
    assert queued_ids(harness.r) == []
    assert enqueue_sweep(enqueuer, interval, now + interval) == "queued"
    assert queued_ids(harness.r) == [f"reconcile-sweep-{slot + 1}"]


def test_item_stuck_in_1003_raises_an_alert(harness: Harness, world: World, cli: Cli) -> None:
    [(_, item)] = items(world, 1)
    world.set_item_status(item, 1003)
    start = datetime.now(UTC)
    with frozen(start):
        harness.send(world.event_item_refreshed(item))
        harness.drain()  # recorded as 1003, retried, dead-lettered
    with structlog.testing.capture_logs() as logs:
        assert sweep(harness, now=start + timedelta(hours=23))["stuck"] == 0
    assert not [e for e in logs if e["event"] == "reconcile.item_stuck_1003"]
    with structlog.testing.capture_logs() as logs:
        assert sweep(harness, now=start + timedelta(hours=25))["stuck"] == 1
    [alert] = [e for e in logs if e["event"] == "reconcile.item_stuck_1003"]
    assert alert["log_level"] == "warning" and alert["item_id"] == item
    assert harness.r.hget(f"rq:job:resync-item-{item}", "status") == b"queued"

    ctx = context.current()
    with frozen(start + timedelta(hours=25)):
        snap = snapshot(ctx.settings, ctx.redis, ctx.storage)
        metrics = {m.name: m for m in StatusCollector(ctx.settings, ctx.redis, ctx.storage).collect()}
        status = cli("status")
    assert snap.stuck_1003 == [item]
    assert metrics["bridgehook_items_stuck_1003"].samples[0].value == 1
    assert metrics["bridgehook_dead_letter_oldest_age_seconds"].samples[0].value > 0
    assert status.exit_code == 0
    assert "stuck in 1003 > 24 h: 1" in status.output
    assert "dead letters 1" in status.output


def test_status_and_metrics(harness: Harness, world: World, cli: Cli) -> None:
    (_, good), (_, bad) = items(world, 2)
    world.set_item_status(bad, 402)
    harness.send(world.event_item_created(good))
    harness.send(world.event_item_created(bad))
    harness.drain()
    data = json.loads(cli("status", "--json").output)
    assert data["queues"]["queued"] == 0 and data["dead_letters"] == 0
    assert data["needs_user_action"] == 1
    assert {(i["status"], i["needs_user_action"]) for i in data["items"]} == {(0, False), (402, True)}
    ctx = context.current()
    metrics = {m.name: m for m in StatusCollector(ctx.settings, ctx.redis, ctx.storage).collect()}
    flagged = {tuple(s.labels.values()): s.value for s in metrics["bridgehook_items"].samples}
    assert flagged == {("0", "false"): 1, ("402", "true"): 1}
    assert jobs.JOBS.labels("bridge", "item.created", "done")._value.get() >= 2
    lag = REGISTRY.get_sample_value("bridgehook_sync_lag_seconds_count", {"provider": "bridge"})
    harness.send(world.event_item_refreshed(good))
    harness.drain()
    assert (
        REGISTRY.get_sample_value("bridgehook_sync_lag_seconds_count", {"provider": "bridge"})
        == (lag or 0) + 1
    )


REDIS_FAMILIES = {"bridgehook_queue_jobs", "bridgehook_replays", "bridgehook_workers"}
DATABASE_FAMILIES = {
    "bridgehook_items", "bridgehook_items_stuck_1003", "bridgehook_items_stale", "bridgehook_items_by_action",
    "bridgehook_items_consent_expiring_7d",
}  # fmt: skip
BOTH_FAMILIES = {"bridgehook_failed_jobs", "bridgehook_dead_letter_oldest_age_seconds"}


def scrape(collector: StatusCollector) -> tuple[dict[str, Any], dict[str, float], list[dict[str, Any]]]:
    """The families of one scrape by name, ``bridgehook_status_up`` by source, and the warnings logged."""
    with structlog.testing.capture_logs() as logs:
        families = {m.name: m for m in collector.collect()}
    up = {s.labels["source"]: s.value for s in families["bridgehook_status_up"].samples}
    return families, up, [e for e in logs if e["log_level"] == "warning"]


def test_a_scrape_survives_a_failing_database(redis_url: str, r: redis.Redis, pg_schema_url: str) -> None:
    settings = make_settings(redis_url)
    Enqueuer(r, settings).resync_item(1, "user-1")
    db = Database.from_url(pg_schema_url)  # reachable, but without our tables: every query fails
    try:
        collector = StatusCollector(settings, r, Storage(db))
        families, up, warnings = scrape(collector)
        assert up == {"redis": 1, "database": 0}
        assert set(families) == {"bridgehook_status_up"} | REDIS_FAMILIES
        [queued] = [s for s in families["bridgehook_queue_jobs"].samples if s.labels["state"] == "queued"]
        assert queued.value == 1
        [warning] = warnings
        assert warning["event"] == "status.source_failed" and warning["source"] == "database"
        assert "items" in warning["error"]

        upgrade(db)  # the database is back
        families, up, warnings = scrape(collector)
        assert up == {"redis": 1, "database": 1} and warnings == []
        assert set(families) == {"bridgehook_status_up"} | REDIS_FAMILIES | DATABASE_FAMILIES | BOTH_FAMILIES
    finally:
        db.close()


def test_a_scrape_survives_an_unreachable_redis(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url)
    unreachable = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    with storage_at(f"sqlite:///{tmp_path / 'status.db'}") as storage:
        families, up, warnings = scrape(StatusCollector(settings, unreachable, storage))
    assert up == {"redis": 0, "database": 1}
    assert set(families) == {"bridgehook_status_up"} | DATABASE_FAMILIES
    assert families["bridgehook_items_stale"].samples[0].value == 0
    [warning] = warnings
    assert warning["source"] == "redis" and "ConnectionError" in warning["error"]


def test_registering_the_collector_reads_neither_redis_nor_the_database(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """describe() names every family collect() can yield, so the registry never scrapes to learn them."""
    settings = make_settings(redis_url)
    unreachable = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    db = Database.from_url(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables
    try:
        with structlog.testing.capture_logs() as logs:
            CollectorRegistry().register(StatusCollector(settings, unreachable, Storage(db)))
        assert logs == []
    finally:
        db.close()
    with storage_at(f"sqlite:///{tmp_path / 'status.db'}") as storage:
        collector = StatusCollector(settings, r, storage)
        described = {m.name for m in collector.describe()}
        assert described == {m.name for m in collector.collect()}
    assert described == {"bridgehook_status_up"} | REDIS_FAMILIES | DATABASE_FAMILIES | BOTH_FAMILIES


def test_commands_say_when_redis_is_unreachable(tmp_path: Path) -> None:
    env = {
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "BRIDGEHOOK_HOME": str(tmp_path),
        "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
    }
    for args in (
        ["dlq", "list"],
        ["status"],
        ["retries"],
        ["dlq", "replay", "--all"],
        ["resync", "--item", "1"],
    ):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 1, args
        assert "Redis at redis://127.0.0.1:1/0 is unreachable" in result.output


def test_a_ledger_replay_under_a_missing_key_says_so_in_one_line(
    harness: Harness, world: World, cli: Cli, tmp_path: Path
) -> None:
    """Issue #17: `events replay --from ledger` dumped UnknownKeyError's traceback when the ledger's
    bodies were written under a key ENCRYPTION_KEYS no longer lists."""
    (_, item), *_ = items(world, 1)
    harness.send(world.event_item_refreshed(item))
    harness.drain()
    assert cli("events", "replay", "--since", "1h", "--from", "ledger", "--dry-run").exit_code == 0
    s = harness.settings
    env = {
        "REDIS_URL": s.redis_url,
        "DATABASE_URL": s.database_url,
        "BRIDGEHOOK_HOME": str(tmp_path / "home"),
        "ENCRYPTION_KEYS": generate_key(),  # another key than the ledger's
    }
    result = CliRunner().invoke(main, ["events", "replay", "--since", "1h", "--from", "ledger"], env=env)
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert "ENCRYPTION_KEYS does not list" in result.stderr and "add the key" in result.stderr
