"""A sync of a whole item serves the events received before it began (workers.watermark): a burst of
webhooks for one item costs one sync, and an event that arrives while a sync runs still gets its own.
Real receiver, real Redis, real RQ worker, the fake Bridge over HTTP."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from fakebridge.world import World
from service.queue import RECEIVED_SEQ_KEY
from tests.faults.support import wait_until
from tests.harness import Harness
from tests.test_workers import bank
from workers import jobs, watermark


def results(harness: Harness, event_ids: list[str]) -> list[str | None]:
    """What each event's job did: "served" when an earlier sync had done its work, else None."""
    jobs = [Job.fetch(i, connection=harness.r, serializer=JSONSerializer) for i in event_ids]
    return [(job.return_value() or {}).get("skipped") for job in jobs]


def item_requests(world: World, item_id: int) -> int:
    with world.lock:
        return sum(1 for q in world.requests if q.path.endswith(f"/items/{item_id}"))


def synced_bank(harness: Harness, world: World, **shape: int) -> dict[str, Any]:
    """A bank at the fake (see test_workers.bank) whose item.created has been processed, and the fake's
    request log cleared."""
    b = bank(world, **shape)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    world.reset_requests()
    return b


def test_a_burst_for_one_item_costs_one_sync(harness: Harness, world: World) -> None:
    b = synced_bank(harness, world, accounts=2, per_account=30)

    # One refresh at Bridge, as Bridge announces it: the item, then each account; then a deletion.
    world.add_transactions(b["accounts"][0], 5)
    world.update_account(b["accounts"][1], name="Renamed")
    burst = [world.event_item_refreshed(b["item"])]
    burst += [world.event_account(a, "updated") for a in b["accounts"]]
    burst.append(world.event_account(b["accounts"][1], "deleted"))
    world.delete_account(b["accounts"][1])
    for event in burst:
        assert harness.send(event) == "queued"
    harness.drain()

    ids = harness.acknowledged[1:]
    assert results(harness, ids) == [None, "served", "served", None]  # a deletion always runs
    assert item_requests(world, b["item"]) == 1
    assert {harness.ledger()[i] for i in ids} == {("done", 1)}
    stamps = harness.rows("SELECT processed_at FROM webhook_events WHERE status = 'done'")
    assert len(stamps) == 5 and all(stamp is not None for (stamp,) in stamps)
    assert harness.tables() == harness.truth()


def test_an_account_without_transactions_does_not_stop_a_sync_from_serving(
    harness: Harness, world: World
) -> None:
    """An account listed whole that shows nothing keeps no cursor: whichever sync lists it next lists
    it whole too, so that listing stands for any of them, and the burst still costs one sync."""
    b = bank(world, accounts=1, per_account=10)
    empty = world.add_account(b["item"], name="Livret vide")
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    world.reset_requests()

    world.add_transactions(b["accounts"][0], 2)
    burst = [world.event_item_refreshed(b["item"])]
    burst += [world.event_account(a, "updated") for a in (b["accounts"][0], empty)]
    for event in burst:
        assert harness.send(event) == "queued"
    harness.drain()

    assert results(harness, harness.acknowledged[1:]) == [None, "served", "served"]
    assert item_requests(world, b["item"]) == 1
    assert harness.rows("SELECT transactions_cursor FROM accounts WHERE id = %s", (empty,)) == [(None,)]
    assert harness.tables() == harness.truth()

    # An account's own sync serves that account's events the same way.
    for _ in range(2):
        harness.send(world.event_account(empty, "updated"))
    harness.drain()
    assert results(harness, harness.acknowledged[-2:]) == [None, "served"]

    # Its first transaction: the listing that finds it is whole, but of an account of which nothing
    # was stored (nothing to delete), so it serves the account's event all the same.
    world.add_transactions(empty, 1)
    harness.send(world.event_item_refreshed(b["item"]))
    harness.send(world.event_account(empty, "updated"))
    harness.drain()
    assert results(harness, harness.acknowledged[-2:]) == [None, "served"]
    assert harness.tables() == harness.truth()

    # Then it has a cursor, and is listed since it like any other.
    assert harness.rows("SELECT transactions_cursor IS NOT NULL FROM accounts WHERE id = %s", (empty,)) == [
        (True,)
    ]


def test_a_whole_listing_of_an_account_with_stored_rows_serves_nothing(
    harness: Harness, world: World
) -> None:
    """An account whose rows are stored but which has no cursor (cleared here by hand) is listed whole:
    deletions since its rows were written would not show, so that sync serves none of its events, and
    the account's event runs a sync of its own."""
    b = synced_bank(harness, world, accounts=1, per_account=10)
    with harness.db.transaction() as tx:
        tx.execute("UPDATE accounts SET transactions_cursor = NULL")
    world.add_transactions(b["accounts"][0], 1)
    world.set_item_status(b["item"], 0)
    harness.send(world.event_item_refreshed(b["item"]))
    harness.send(world.event_account(b["accounts"][0], "updated"))
    harness.drain()
    assert results(harness, harness.acknowledged[-2:]) == [None, None]
    assert harness.tables() == harness.truth()


def test_a_sync_that_stops_early_serves_nothing(harness: Harness, world: World) -> None:
    b = bank(world, accounts=1, per_account=3, status=1010)  # the user must act: nothing is fetched
    for _ in range(2):
        harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()
    assert results(harness, harness.acknowledged) == ["needs_user_action", "needs_user_action"]


def test_a_whole_listing_serves_no_deletion(harness: Harness, world: World) -> None:
    """A full sync (a redelivered item.created here) lists no deleted transaction: the account event
    that announced a deletion still gets its own delta, which marks it."""
    b = synced_bank(harness, world, accounts=1, per_account=10)
    gone = sorted(harness.tables()["transactions"])[3]
    world.delete_transaction(gone)
    harness.send(world.event_item_created(b["item"]))  # queued first: its full sync begins after both
    harness.send(world.event_account(b["accounts"][0], "updated"))
    harness.drain()
    assert results(harness, harness.acknowledged[1:]) == [None, None]
    assert gone not in harness.tables()["transactions"]
    assert harness.tables() == harness.truth()


def test_an_account_sync_serves_the_events_of_that_account(harness: Harness, world: World) -> None:
    b = synced_bank(harness, world, accounts=2, per_account=10)
    first, second = b["accounts"]
    world.add_transactions(first, 2)
    for account in (first, first, second):
        assert harness.send(world.event_account(account, "updated")) == "queued"
    harness.drain()
    assert results(harness, harness.acknowledged[1:]) == [None, "served", None]
    assert harness.tables() == harness.truth()


def test_an_event_received_while_a_sync_runs_gets_a_sync_of_its_own(harness: Harness, world: World) -> None:
    b = synced_bank(harness, world, accounts=1, per_account=10)
    harness.send(world.event_item_refreshed(b["item"]))
    world.faults.delay(0.3)  # every request to the fake: the sync takes a while
    late: list[int] = []

    def during_the_sync() -> None:  # (RQ's worker wants the main thread: the webhook comes from this one)
        deadline = time.monotonic() + 30
        while item_requests(world, b["item"]) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        late.extend(world.add_transactions(b["accounts"][0], 1))
        assert harness.send(world.event_account(b["accounts"][0], "updated")) == "queued"

    sender = threading.Thread(target=during_the_sync)
    sender.start()
    try:
        harness.drain()
    finally:
        sender.join(timeout=60)
        world.faults.clear()
    harness.drain()  # in case the burst ended before the late event was queued

    assert results(harness, harness.acknowledged[1:]) == [None, None]
    assert late and late[0] in harness.tables()["transactions"]
    assert harness.tables() == harness.truth()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_job_that_stepped_aside_for_the_lock_finds_the_record_of_the_sync_it_waited_for(
    harness: Harness, world: World
) -> None:
    """A sync records what it serves before it lets go of the item's lock: a job for an event it
    serves, finding that lock taken, steps aside (workers.jobs.ItemLocked) and runs again until it
    takes the lock, finds the record as it does and calls Bridge for nothing. Here the first job's
    final commit is held up by a lock on its ledger row (as a slow disk would hold it up): were the
    record written after the lock's release, the second job would take the lock then, and sync
    again. On PostgreSQL, where a row lock holds up that commit alone."""
    b = synced_bank(harness, world, accounts=1, per_account=10)
    world.add_transactions(b["accounts"][0], 2)
    for _ in range(2):
        assert harness.send(world.event_item_refreshed(b["item"])) == "queued"
    first, second = harness.acknowledged[-2:]
    outcomes: dict[str, Any] = {}
    stepped_aside: list[str] = []

    def perform(event_id: str) -> threading.Thread:
        """The event's RQ job, run as a worker runs it (two workers: two threads here)."""

        def run() -> None:
            job = Job.fetch(event_id, connection=harness.r, serializer=JSONSerializer)
            while True:  # as the job's retries would, sooner
                try:
                    outcomes[event_id] = job.perform()
                except jobs.ItemLocked:
                    stepped_aside.append(event_id)
                    time.sleep(0.02)
                    continue
                except Exception as exc:
                    outcomes[event_id] = exc
                return

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    world.faults.delay(0.2)  # the first sync takes a while: time to lock its ledger row
    threads: list[threading.Thread] = []
    try:
        with psycopg.connect(harness.settings.database_url) as blocker:
            threads.append(perform(first))
            rows = "SELECT status FROM webhook_events WHERE id = %s"
            wait_until(lambda: blocker.execute(rows, (first,)).fetchall(), 30, "the first job's ledger row")
            blocker.rollback()
            locked = blocker.execute(rows + " FOR UPDATE", (first,)).fetchall()
            assert locked == [("queued",)], "the first job ended before its row was locked"
            # The first job's final commit, waiting for this connection's lock (and no other test's).
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid)) "
                "AND query LIKE 'UPDATE webhook_events SET status = ''done''%%'"
            )
            pid = blocker.info.backend_pid
            with psycopg.connect(harness.settings.database_url, autocommit=True) as watcher:
                wait_until(
                    lambda: watcher.execute(waiting, (pid,)).fetchone() == (1,), 30, "the final commit"
                )
            world.faults.clear()
            threads.append(perform(second))
            threads[-1].join(timeout=3)  # long enough for a sync of its own, had it taken the lock at once
            blocker.rollback()  # the first job's final commit goes through
    finally:
        world.faults.clear()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)

    assert outcomes[first]["skipped"] is None
    assert outcomes[second] == {"skipped": "served"}
    assert stepped_aside and set(stepped_aside) == {second}  # it found the lock taken, and ran again
    assert item_requests(world, b["item"]) == 1  # the first sync's, and no other
    # Stepping aside is not an attempt: each ran once as far as the ledger knows.
    assert {harness.ledger()[i] for i in (first, second)} == {("done", 1)}
    assert harness.tables() == harness.truth()


def test_events_numbered_in_the_order_of_receipt(harness: Harness, world: World) -> None:
    b = bank(world, accounts=1, per_account=1)
    for _ in range(3):
        harness.send(world.event_item_refreshed(b["item"]))
    seqs = [
        Job.fetch(i, connection=harness.r, serializer=JSONSerializer).meta["received_seq"]
        for i in harness.acknowledged
    ]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert watermark.received_so_far(harness.r).through == seqs[-1]


def mark(r: redis.Redis, through: int) -> watermark.Mark:
    """A mark of the counter's current epoch at ``through``, its sentinel standing."""
    return watermark.received_so_far(r)._replace(through=through)


def test_a_record_never_moves_back(r: redis.Redis) -> None:
    assert not watermark.served(r, 1, 7)  # nothing recorded: nothing served
    watermark.record(r, mark(r, 5), 7)
    watermark.record(r, mark(r, 3), 7)  # a sync that began earlier and finished later
    assert watermark.served(r, 5, 7) and not watermark.served(r, 6, 7)
    assert watermark.served(r, 5, 7, 70)  # an account's event, served by its item's sync
    assert not watermark.served(r, 1, 8)  # another item
    assert 0 < r.ttl(f"{watermark.RECORD_PREFIX}item:7") <= watermark.RECORD_TTL_SECONDS


def test_no_record_when_redis_lost_writes_since_the_mark(r: redis.Redis) -> None:
    """A failover to a lagging replica, a crash between fsyncs: what came after the read is gone, and
    perhaps increments it counted; the sentinel written with the read is gone too, so nothing is
    recorded."""
    lost = mark(r, 5)
    r.delete(lost.sentinel)
    assert watermark.record(r, lost, 7) is False
    assert not watermark.served(r, 1, 7)
    kept = mark(r, 5)
    assert watermark.record(r, kept, 7) is True and watermark.served(r, 5, 7)
    assert not r.exists(kept.sentinel)  # used once


def test_an_account_sync_serves_that_account_only(r: redis.Redis) -> None:
    watermark.record(r, mark(r, 9), 7, 70)
    assert watermark.served(r, 9, 7, 70)
    assert not watermark.served(r, 9, 7, 71)  # another account of the item
    assert not watermark.served(r, 9, 7)  # the item's own events


def test_a_lost_counter_starts_an_epoch_in_which_older_records_serve_nothing(
    harness: Harness, world: World
) -> None:
    b = bank(world, accounts=1, per_account=3)
    for _ in range(3):
        harness.send(world.event_item_refreshed(b["item"]))
    before = watermark.received_so_far(harness.r)
    assert before.through == 3
    watermark.record(harness.r, before, b["item"])
    assert watermark.served(harness.r, 3, b["item"])
    harness.r.delete(RECEIVED_SEQ_KEY)  # evicted, or deleted by hand: the count starts again
    harness.send(world.event_item_refreshed(b["item"]))
    after = watermark.received_so_far(harness.r)
    assert after.through == 1 and after.epoch != before.epoch
    assert not watermark.served(harness.r, 1, b["item"])  # received after the recorded sync began
