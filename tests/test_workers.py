"""Workers end to end: signed POST → receiver → RQ job → rows, on SQLite and PostgreSQL,
against the fake Bridge over HTTP. The fake's state is the ground truth."""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis
import structlog
import structlog.testing
from redis.exceptions import LockError
from rq import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from fakebridge.world import World
from tests.harness import Harness, ts
from workers import context, jobs
from workers.context import WorkerContext
from workers.replay import Enqueuer
from workers.runner import GC_YOUNGEST_THRESHOLD, PUBSUB_STOP_SECONDS, PlainWorker, Worker, run_worker
from workers.storage import Storage


def bank(world: World, *, accounts: int = 2, per_account: int = 60, status: int = 0) -> dict[str, Any]:
    """A user with one item and its accounts and transactions at the fake."""
    user = world.add_user(external_user_id="app-user-1")
    item = world.add_item(user, status=status)
    account_ids = [world.add_account(item, name=f"Compte {n}") for n in range(accounts)]
    for account in account_ids:
        world.add_transactions(account, per_account)
    return {"user": user, "item": item, "accounts": account_ids}


def test_item_created_writes_the_whole_item(harness: Harness, world: World) -> None:
    b = bank(world, accounts=3, per_account=1200)  # several pages of 500 per account
    disabled = world.add_account(b["item"], data_access="disabled", name="Livret")
    world.add_transactions(disabled, 5)
    future = world.add_transactions(b["accounts"][0], 3, future=True)

    assert harness.send(world.event_item_created(b["item"])) == "queued"
    harness.drain()

    tables, truth = harness.tables(), harness.truth()
    assert tables["accounts"] == truth["accounts"]
    assert len(tables["transactions"]) == 3 * 1200 + 3
    assert tables["transactions"] == truth["transactions"]
    assert all(tables["transactions"][t]["future"] for t in future)
    # The disabled account is kept and flagged; its transactions are not fetched.
    assert tables["accounts"][disabled]["data_access"] == "disabled"
    assert harness.rows("SELECT count(*) FROM transactions WHERE account_id = %s", (disabled,)) == [(0,)]
    # Each account's cursor is the newest updated_at it holds.
    for account in b["accounts"]:
        [(cursor,)] = harness.rows("SELECT transactions_cursor FROM accounts WHERE id = %s", (account,))
        newest = max(t["updated_at"] for t in truth["transactions"].values() if t["account_id"] == account)
        assert ts(cursor) == newest
    [(external,)] = harness.rows("SELECT external_user_id FROM users WHERE uuid = %s", (b["user"],))
    assert external == "app-user-1"
    [(status, attempts, processed)] = harness.rows(
        "SELECT status, attempts, processed_at FROM webhook_events"
    )
    assert (status, attempts) == ("done", 1)
    assert processed is not None


def test_amounts_are_exact(harness: Harness, world: World) -> None:
    b = bank(world, accounts=1, per_account=1)
    [txn] = world.add_transactions(b["accounts"][0], 1)
    world.update_transaction(txn, amount=Decimal("-1234567.89"))
    world.update_account(b["accounts"][0], balance=Decimal("0.10"))
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    [(amount,)] = harness.rows("SELECT amount FROM transactions WHERE id = %s", (txn,))
    assert Decimal(str(amount)) == Decimal("-1234567.89")
    [(balance,)] = harness.rows("SELECT balance FROM accounts WHERE id = %s", (b["accounts"][0],))
    assert str(balance) == "0.10"


def test_refresh_fetches_only_the_delta(harness: Harness, world: World) -> None:
    b = bank(world, accounts=2, per_account=700)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()

    first = b["accounts"][0]
    ids = sorted(t for t, v in harness.tables()["transactions"].items() if v["account_id"] == first)
    world.update_transaction(ids[10], amount=Decimal("-99.99"), clean_description="Corrected")
    world.delete_transaction(ids[20])
    [future] = world.add_transactions(first, 1, future=True)
    new = world.add_transactions(first, 4)
    world.reset_requests()
    world.set_item_status(b["item"], 0)

    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()

    tables, truth = harness.tables(), harness.truth()
    assert tables == truth
    assert tables["transactions"][ids[10]]["amount"] == Decimal("-99.99")
    assert ids[20] not in tables["transactions"]
    [(deleted_at,)] = harness.rows("SELECT deleted_at FROM transactions WHERE id = %s", (ids[20],))
    assert deleted_at is not None  # kept, marked
    assert {future, *new} <= set(tables["transactions"])
    # Every transactions request asked for a delta (`since`), and one page per account sufficed.
    txn_requests = [r for r in world.requests if r.path.endswith("/transactions")]
    assert txn_requests and all("since=" in r.query for r in txn_requests)
    assert len(txn_requests) == 2

    # A future transaction that changes is updated in place; one that disappears is marked deleted.
    world.update_transaction(future, amount=Decimal("-5.00"))
    harness.send(world.event_account(first, "updated"))
    harness.drain()
    assert harness.tables()["transactions"][future]["amount"] == Decimal("-5.00")
    world.delete_transaction(future)
    harness.send(world.event_account(first, "updated"))
    harness.drain()
    assert future not in harness.tables()["transactions"]
    assert harness.tables() == harness.truth()


def test_account_events(harness: Harness, world: World) -> None:
    b = bank(world, accounts=1, per_account=20)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()

    added = world.add_account(b["item"], name="Nouveau compte")
    world.add_transactions(added, 30)
    harness.send(world.event_account(added, "created"))
    harness.drain()
    assert harness.tables() == harness.truth()

    world.add_transactions(added, 3)
    world.update_account(added, balance=Decimal("42.00"))
    harness.send(world.event_account(added, "updated"))
    harness.drain()
    assert harness.tables() == harness.truth()

    event = world.event_account(added, "deleted")
    world.delete_account(added)
    harness.send(event)
    harness.drain()
    [(deleted_at,)] = harness.rows("SELECT deleted_at FROM accounts WHERE id = %s", (added,))
    assert deleted_at is not None
    assert harness.rows("SELECT count(*) FROM transactions WHERE account_id = %s", (added,)) == [
        (33,)
    ]  # kept
    assert harness.tables() == harness.truth()


def test_item_and_user_deletion_keep_rows(harness: Harness, world: World) -> None:
    b = bank(world, accounts=2, per_account=5)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    event = world.event_item_deleted(b["item"])
    world.delete_item(b["item"])
    harness.send(event)
    harness.drain()
    assert harness.rows("SELECT count(*) FROM items WHERE deleted_at IS NOT NULL") == [(1,)]
    assert harness.rows("SELECT count(*) FROM accounts WHERE deleted_at IS NOT NULL") == [(2,)]
    assert harness.rows("SELECT count(*) FROM transactions") == [(10,)]

    event = world.event_user_deleted(b["user"])
    world.delete_user(b["user"])
    harness.send(event)
    harness.drain()
    assert harness.rows("SELECT count(*) FROM users WHERE deleted_at IS NOT NULL") == [(1,)]
    assert harness.failed_ids() == []


def test_a_sync_after_the_user_was_deleted_leaves_no_live_row(harness: Harness, world: World) -> None:
    """user.deleted handled before the item's events (redelivered late, or a Bridge that still answers
    for a moment): the syncs mark what they would have written as deleted and fetch no account."""
    b = bank(world, accounts=2, per_account=5)
    unseen = world.add_item(b["user"])  # an item we never synced
    world.add_transactions(world.add_account(unseen), 3)
    harness.send(world.event_user_deleted(b["user"]))
    harness.drain()
    world.reset_requests()
    harness.send(world.event_item_created(b["item"]))
    harness.send(world.event_item_refreshed(unseen))
    harness.send(world.event_account(b["accounts"][0], "updated"))
    harness.drain()
    assert harness.failed_ids() == []
    assert harness.rows("SELECT count(*) FROM items WHERE deleted_at IS NULL") == [(0,)]
    assert harness.rows("SELECT count(*) FROM items") == [(2,)]
    assert harness.rows("SELECT count(*) FROM accounts") == [(0,)]
    assert harness.rows("SELECT count(*) FROM transactions") == [(0,)]
    assert not [r for r in world.requests if "/accounts" in r.path or "/transactions" in r.path]


def test_user_deletion_marks_what_a_running_sync_writes_after_it_began(
    harness: Harness, world: World
) -> None:
    """A sync holds the item's lock when user.deleted is handled: the user is marked at once (later
    syncs stop), the item waits for the sync to end, then the account that sync added is marked."""
    b = bank(world, accounts=1, per_account=5)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    sync = harness.r.lock(f"bridgehook:lock:item:{b['item']}", timeout=60, thread_local=False)
    assert sync.acquire(blocking=False)  # the running sync
    storage = Storage(harness.db)

    def running_sync() -> None:
        try:
            deadline = time.monotonic() + 30
            while harness.rows("SELECT deleted_at FROM users") == [(None,)] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert harness.rows("SELECT count(*) FROM items WHERE deleted_at IS NOT NULL") == [(1,)]
            with storage.transaction() as tx:  # what the sync still writes: an account it just listed
                storage.upsert_accounts(tx, [{"id": 999_001, "item_id": b["item"], "name": "Livret"}])
        finally:
            sync.release()

    writer = threading.Thread(target=running_sync)
    writer.start()
    harness.send(world.event_user_deleted(b["user"]))
    harness.drain()
    writer.join()
    assert harness.failed_ids() == []
    assert harness.rows("SELECT count(*) FROM accounts WHERE deleted_at IS NULL") == [(0,)]
    assert harness.rows("SELECT count(*) FROM accounts") == [(2,)]


def test_user_deletion_marks_the_other_items_when_one_stays_locked(harness: Harness, world: World) -> None:
    """One of the user's items stays locked past the wait (a long sync): the job marks the others,
    then fails, and its retry marks that one. An item id in the event is no lock of its own."""
    b = bank(world, accounts=1, per_account=2)
    other = world.add_item(b["user"])
    world.add_account(other)
    harness.send(world.event_item_created(b["item"]))
    harness.send(world.event_item_created(other))
    harness.drain()
    first, second = sorted([b["item"], other])
    context.configure(WorkerContext.build(dataclasses.replace(harness.settings, item_lock_seconds=1)))
    long_sync = harness.r.lock(f"bridgehook:lock:item:{first}", timeout=60, thread_local=False)
    assert long_sync.acquire(blocking=False)
    storage = Storage(harness.db)

    def while_the_job_waits() -> None:  # an account the other item's sync writes after the user's mark
        deadline = time.monotonic() + 30
        while harness.rows("SELECT deleted_at FROM users") == [(None,)] and time.monotonic() < deadline:
            time.sleep(0.02)
        with storage.transaction() as tx:
            storage.upsert_accounts(tx, [{"id": 999_002, "item_id": second, "name": "Livret"}])

    writer = threading.Thread(target=while_the_job_waits)
    writer.start()
    event = {"type": "user.deleted", "content": {"user_uuid": b["user"], "item_id": first},
             "timestamp": 1_700_000_000_000}  # fmt: skip
    try:
        with pytest.raises(jobs.ItemBusy, match=str(first)):
            jobs.user_deleted(event)
    finally:
        writer.join()
        long_sync.release()
    assert harness.rows("SELECT deleted_at IS NOT NULL FROM accounts WHERE id = 999002") == [(True,)]
    assert jobs.user_deleted(event) == {"deleted_at": "2023-11-14T22:13:20+00:00"}  # the retry
    assert harness.rows("SELECT count(*) FROM accounts WHERE deleted_at IS NULL") == [(0,)]


def test_user_action_status_is_flagged_and_not_fetched(harness: Harness, world: World) -> None:
    b = bank(world, status=402)
    world.reset_requests()
    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()
    [(status, flagged)] = harness.rows("SELECT status, needs_user_action FROM items")
    assert (status, bool(flagged)) == (402, True)
    assert harness.rows("SELECT count(*) FROM accounts") == [(0,)]
    assert not [r for r in world.requests if "/accounts" in r.path or "/transactions" in r.path]

    world.set_item_status(b["item"], 0)
    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()
    [(flagged,)] = harness.rows("SELECT needs_user_action FROM items")
    assert not flagged
    assert harness.tables() == harness.truth()


def test_1100_never_overwrites_good_values(harness: Harness, world: World) -> None:
    b = bank(world, accounts=1, per_account=3)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    before = harness.rows("SELECT name, iban FROM accounts")
    # What a sync would write under 1100: obfuscated values, with a newer updated_at.
    storage = Storage(harness.db)
    with storage.transaction() as tx:
        storage.upsert_accounts(
            tx, [{"id": b["accounts"][0], "item_id": b["item"], "name": "XXXX", "iban": "FR76XXXXXXXXXXXX",
                  "updated_at": "2099-01-01T00:00:00.000Z"}],
        )  # fmt: skip
    assert harness.rows("SELECT name, iban FROM accounts") == before
    world.set_item_status(b["item"], 1100)
    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()
    [(status, flagged)] = harness.rows("SELECT status, needs_user_action FROM items")
    assert (status, bool(flagged)) == (1100, True)
    assert harness.rows("SELECT name, iban FROM accounts") == before


def test_bank_unavailable_retries_then_dead_letters(harness: Harness, world: World) -> None:
    b = bank(world, status=1003)
    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()  # WORKER_RETRY_INTERVALS=0,0,0: three immediate retries, then the DLQ
    assert len(harness.failed_ids()) == 1
    [(status, attempts, error)] = harness.rows("SELECT status, attempts, last_error FROM webhook_events")
    assert (status, attempts) == ("failed", 4)
    assert "ItemUnavailable" in error


def test_permanent_error_skips_retries(harness: Harness, world: World) -> None:
    b = bank(world)
    world.faults.fail_item(b["item"], status=400)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    assert len(harness.failed_ids()) == 1
    [(status, attempts, error)] = harness.rows("SELECT status, attempts, last_error FROM webhook_events")
    assert (status, attempts) == ("failed", 1)
    assert "PermanentError" in error


def test_token_expiry_mid_sync_renews_once(harness: Harness, world: World) -> None:
    b = bank(world, accounts=3, per_account=1200)  # 1 item + 1 accounts + 9 transaction pages
    world.faults.delay(0.03)
    world.reset_requests()

    def expire_after_five_requests() -> None:
        deadline = time.monotonic() + 30
        while len(world.requests) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        world.expire_tokens()  # the token cached in Redis is refused from here on

    expirer = threading.Thread(target=expire_after_five_requests)
    expirer.start()
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    expirer.join()
    world.faults.clear()
    assert harness.tables() == harness.truth()
    statuses = [r.status for r in world.requests]
    assert statuses.count(401) == 1  # one refused call mid-sync…
    token_requests = [r for r in world.requests if r.path.endswith("/authorization/token")]
    assert len(token_requests) == 2  # …one renewal, then the sync went on
    assert statuses.index(401) >= 4


def test_storms_of_429_and_5xx(harness: Harness, world: World) -> None:
    b = bank(world, accounts=3, per_account=1100)
    world.faults.set_ratios(p500=0.3, p429=0.2, retry_after=0, seed=3)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    world.faults.clear()
    assert harness.tables() == harness.truth()
    assert harness.failed_ids() == []


def test_replays_in_any_order_leave_the_same_rows(harness: Harness, world: World) -> None:
    """Every event run twice, in shuffled order, by the job functions themselves."""
    b = bank(world, accounts=3, per_account=80)
    extra = world.add_account(b["item"])
    world.add_transactions(extra, 10)
    history: list[tuple[str, dict[str, Any]]] = [world.event_item_created(b["item"])]
    for account in b["accounts"]:
        history.append(world.event_account(account, "created"))
    for n, account in enumerate(b["accounts"]):
        world.add_transactions(account, 7)
        world.delete_transaction(world.add_transactions(account, 1)[0])
        history.append(world.event_account(account, "updated"))
        if n == 0:
            world.set_item_status(b["item"], 0)
            history.append(world.event_item_refreshed(b["item"]))
    history.append(world.event_account(extra, "deleted"))
    world.delete_account(extra)

    functions = {"item.created": jobs.item_created, "item.refreshed": jobs.item_refreshed,
                 "item.account.created": jobs.account_created, "item.account.updated": jobs.account_updated,
                 "item.account.deleted": jobs.account_deleted}  # fmt: skip

    # Each event keeps its own timestamp, as a real body would.
    events = [{"type": kind, "content": content, "timestamp": 1_700_000_000_000 + n}
              for n, (kind, content) in enumerate(history)]  # fmt: skip

    def run(batch: list[dict[str, Any]]) -> list[list[tuple[Any, ...]]]:
        for event in batch:
            functions[event["type"]](event)
        return harness.every_row()

    def wipe() -> None:
        with harness.db.transaction() as tx:
            for table in ("users", "items", "accounts", "transactions", "webhook_events"):
                tx.execute(f"DELETE FROM {table}")  # noqa: S608

    harness.drain()  # builds the worker context
    in_order = run(events)
    assert run(events) == in_order  # everything again, on top
    for seed in (5, 6):
        shuffled = events * 2
        random.Random(seed).shuffle(shuffled)
        wipe()
        assert run(shuffled) == in_order  # from nothing, twice each, in another order
    assert harness.tables() == harness.truth()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_item_lock_serialises_jobs_of_one_item(harness: Harness, world: World) -> None:
    b = bank(world, accounts=1, per_account=3)
    harness.drain()
    ctx = context.current()
    with jobs.item_lock(ctx, b["item"]):
        held = ctx.redis.lock(f"bridgehook:lock:item:{b['item']}", blocking_timeout=0.2)
        assert not held.acquire()  # a second job for the same item waits…
        other = ctx.redis.lock("bridgehook:lock:item:999999", blocking_timeout=0.2)
        assert other.acquire()  # …while another item proceeds
        other.release()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_item_lock_redis_fails_to_release_ends_the_block_quietly(harness: Harness, r: redis.Redis) -> None:
    """Redis failing the release (here the key holds another type, so the release script errors) does
    not turn a job that has done its work into a failure: the lease lapses by itself."""
    ctx = WorkerContext.build(harness.settings)
    key = "bridgehook:lock:item:43"
    try:
        with jobs.item_lock(ctx, 43):
            r.delete(key)
            r.hset(key, "not", "a lock")
        assert r.type(key) == b"hash"  # the release found what it could not release
    finally:
        ctx.close()


def test_the_worker_keeps_a_short_lease_on_a_running_job(r: redis.Redis) -> None:
    """A job's entry in RQ's started registry expires a minute after the last heartbeat, not after
    the job's whole timeout: a killed worker's job is found abandoned and requeued that much sooner."""
    queue = Queue("lease-test", connection=r, serializer=JSONSerializer)
    job = queue.enqueue("time.sleep", 4, job_timeout=600)
    worker = Worker([queue], connection=r, serializer=JSONSerializer, job_monitoring_interval=1)
    leases: list[float] = []

    def watch() -> None:
        registry = StartedJobRegistry(queue=queue)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and job.get_status(refresh=True) != "finished":
            expiries = [score for _, score in r.zrange(registry.key, 0, -1, withscores=True)]
            leases.extend(e - time.time() for e in expiries)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert worker.work(burst=True, with_scheduler=False)
    watcher.join()
    assert worker.maintenance_interval == 60
    assert leases and max(leases) <= 61 + 1, "the lease runs for the heartbeat interval + 60 s only"
    # Renewed while the job ran: the remaining lease does not just count down from the first one.
    assert min(leases[len(leases) // 2 :]) >= 59


def test_the_worker_collects_its_youngest_objects_less_often(harness: Harness) -> None:
    """`bridgehook worker` raises CPython's threshold for collecting its youngest generation (the
    cost measured is in workers.runner); the older generations keep theirs (ten collections of the
    one below)."""
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])  # CPython's default, whatever a worker run earlier in-process set
    try:
        assert not run_worker(dataclasses.replace(harness.settings, metrics_port=0), burst=True)  # no job
        assert gc.get_threshold() == (GC_YOUNGEST_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)


@pytest.mark.parametrize("worker_class", [PlainWorker, Worker])
def test_a_stopping_worker_does_not_wait_a_minute_for_its_pubsub_thread(
    r: redis.Redis, worker_class: type[PlainWorker]
) -> None:
    """A worker's pub/sub thread reads its channel a minute at a time. The worker stops it at once,
    even when its own thread is held up right after unsubscribing (as under load), so that the thread
    reads the reply while it would still run: RQ's order (unsubscribe, then stop the thread) made
    that thread wait a minute to be subscribed again, and the worker (redis-py's stop() joins it)
    with it: every drain of the tests, now and then."""
    queue = Queue("pubsub-test", connection=r, serializer=JSONSerializer)
    worker = worker_class([queue], connection=r, serializer=JSONSerializer)
    worker.subscribe()
    pubsub = worker.pubsub
    unsubscribe = pubsub.unsubscribe

    def held_up(*args: Any) -> Any:
        sent = unsubscribe(*args)
        time.sleep(0.3)  # the reply is read meanwhile
        return sent

    pubsub.unsubscribe = held_up
    started = time.monotonic()
    stopping = threading.Thread(target=worker.unsubscribe, daemon=True)
    stopping.start()
    stopping.join(timeout=10)
    assert not stopping.is_alive(), "the worker waited for its pub/sub thread"
    assert time.monotonic() - started < 0.3 + PUBSUB_STOP_SECONDS
    assert not worker.pubsub_thread.is_alive()  # ended by the reply, not left behind
    assert r.pubsub_numsub(worker.pubsub_channel_name) == [(worker.pubsub_channel_name.encode(), 0)]


def test_the_worker_key_keeps_its_long_lease_between_jobs(r: redis.Redis) -> None:
    """The worker renews its own key for worker_ttl + 60 s between jobs, in one round trip, at most once a
    second; the shorter lease RQ sets for each job never outlives the job (else an idle worker, blocked
    in its dequeue for minutes, would vanish from `rq info` and from the scheduler's count)."""
    queue = Queue("ttl-test", connection=r, serializer=JSONSerializer)
    worker = Worker([queue], connection=r, serializer=JSONSerializer)
    worker.register_birth()
    worker.heartbeat()  # before a dequeue
    assert r.ttl(worker.key) > 400
    with r.pipeline() as pipeline:  # RQ, as a job starts
        worker.heartbeat(worker.job_monitoring_interval + 60, pipeline=pipeline)
        pipeline.execute()
    assert r.ttl(worker.key) <= 70
    worker.heartbeat()  # after the job, within the second
    assert r.ttl(worker.key) > 400
    r.expire(worker.key, 100)
    worker.heartbeat()  # before the next dequeue, within the second: skipped
    assert r.ttl(worker.key) <= 100


def test_the_item_lock_outlives_a_slow_call_and_a_lost_lock_stops_the_job(
    harness: Harness, r: redis.Redis
) -> None:
    """The lease is renewed while the job runs, however long one Bridge call takes; if the lock is
    lost anyway (here: deleted), the next heartbeat raises before the job writes another page."""
    ctx = WorkerContext.build(dataclasses.replace(harness.settings, item_lock_seconds=2))
    key = "bridgehook:lock:item:42"
    try:
        with jobs.item_lock(ctx, 42) as heartbeat:
            time.sleep(3)  # one call slower than the lease
            heartbeat()
            assert r.pttl(key) > 0, "the lease lapsed while its job was running"
            assert not r.lock(key, timeout=5, blocking=False).acquire()
            r.delete(key)
            time.sleep(1.2)  # past the next renewal
            with pytest.raises(LockError):
                heartbeat()
        assert r.exists(key) == 0
    finally:
        ctx.close()


def test_a_bank_down_logs_one_warning_per_retry_and_no_traceback(
    harness: Harness, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #17: each retry of an item in 1003 logged an error and RQ's traceback. Now a retry is one
    warning with the next attempt's time; only the last failure (a dead letter) is an error, and RQ
    still keeps its traceback in the failed job's result."""
    b = bank(world, status=1003)
    harness.send(world.event_item_refreshed(b["item"]))
    caplog.set_level(logging.INFO, logger="rq")  # the worker's default level
    with structlog.testing.capture_logs() as lines:
        harness.drain()  # WORKER_RETRY_INTERVALS=0,0,0: three retries, then the dead letters
    failed = [line for line in lines if line["event"] == "job.failed"]
    assert [(line["log_level"], line["final"]) for line in failed] == [("warning", False)] * 3 + [
        ("error", True)
    ]
    for line in failed[:3]:
        assert "ItemUnavailable" in line["error"]
        # the retries' interval is 0: the next attempt is now
        assert abs(datetime.fromisoformat(line["next_attempt"]) - datetime.now(UTC)) < timedelta(seconds=30)
    raised = [r for r in caplog.records if "exception raised while executing" in r.getMessage()]
    assert len(raised) == 1, "RQ logs the last failure only"
    assert "Traceback" not in "\n".join(r.getMessage() for r in caplog.records if r not in raised)
    [job_id] = harness.failed_ids()
    queue = Queue(harness.settings.queue_name, connection=harness.r, serializer=JSONSerializer)
    job = queue.fetch_job(job_id)
    assert job is not None and "Traceback" in (job.latest_result().exc_string or "")  # type: ignore[union-attr]


def test_a_dead_letter_keeps_rqs_traceback(
    harness: Harness, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure that is not retried (Bridge calls the request wrong: 400) is still logged by RQ
    with its traceback."""
    b = bank(world)
    world.faults.fail_item(b["item"], status=400)
    harness.send(world.event_item_created(b["item"]))
    caplog.set_level(logging.INFO, logger="rq")  # the worker's default level
    harness.drain()
    raised = [r for r in caplog.records if "exception raised while executing" in r.getMessage()]
    assert len(raised) == 1 and "PermanentError" in raised[0].getMessage()
    assert "Traceback" in raised[0].getMessage()


def scheduled_for(harness: Harness, job_id: str) -> datetime | None:
    """When RQ's scheduler is to run ``job_id`` again, if it holds it."""
    queue = Queue(harness.settings.queue_name, connection=harness.r, serializer=JSONSerializer)
    registry = ScheduledJobRegistry(queue=queue)
    return registry.get_scheduled_time(job_id) if job_id in registry.get_job_ids() else None


def malformed_date(world: World, b: dict[str, Any]) -> None:
    [txn] = world.add_transactions(b["accounts"][0], 1)
    world.update_transaction(txn, date="31/12/2026")  # not the ISO date Bridge sends: a ValueError here


@pytest.mark.parametrize(
    ("cause", "expected"),
    [(lambda world, b: world.set_item_status(b["item"], 1003), True), (malformed_date, False)],
    ids=["bank_down", "malformed_response"],
)
def test_a_failure_with_retries_left_is_scheduled_at_the_time_its_warning_says(
    harness: Harness,
    world: World,
    caplog: pytest.LogCaptureFixture,
    cause: Callable[[World, dict[str, Any]], None],
    expected: bool,
) -> None:
    """Both kinds of failure are retried on WORKER_RETRY_INTERVALS (here 60 s, then 600 s), and the job's
    warning gives the time RQ's scheduler holds the retry for. An expected one (the bank down: 1003) is
    that one line; an unexpected one (Bridge sent a date we cannot read) also gets RQ's error with its
    traceback, at once and not only once it is a dead letter: it is a bug to look at."""
    b = bank(world, accounts=1, per_account=3)
    cause(world, b)
    settings = dataclasses.replace(harness.settings, retry_intervals=(60, 600))
    job_id = f"resync-item-{b['item']}"
    assert Enqueuer(harness.r, settings).resync_item(b["item"], b["user"]) == "queued"
    caplog.set_level(logging.INFO, logger="rq")  # the worker's default level
    with structlog.testing.capture_logs() as lines:
        harness.drain()  # one attempt: the retry waits in RQ's scheduler, which drain does not run
    [failed] = [line for line in lines if line["event"] == "job.failed"]
    assert (failed["log_level"], failed["final"]) == ("warning", False)
    assert ("ItemUnavailable" if expected else "ValueError") in failed["error"]
    due = scheduled_for(harness, job_id)
    assert due is not None, "the retry is not scheduled"
    assert 58 <= (due - datetime.now(UTC)).total_seconds() <= 61
    assert abs(datetime.fromisoformat(failed["next_attempt"]) - due) <= timedelta(seconds=1)
    raised = [r for r in caplog.records if "exception raised while executing" in r.getMessage()]
    if expected:
        assert raised == []
        assert "Traceback" not in "\n".join(r.getMessage() for r in caplog.records)
    else:
        [error] = raised
        assert error.levelno == logging.ERROR
        assert "Traceback" in error.getMessage() and "ValueError" in error.getMessage()
    assert harness.rows("SELECT status, attempts FROM webhook_events") == [("queued", 1)]


def test_a_spent_budget_defers_the_job_with_one_line_that_says_until_when(
    harness: Harness, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 whose Retry-After is longer than a worker waits defers the job: one `job.deferred` line
    (no warning: nothing failed; no traceback) whose next_attempt is when RQ's scheduler runs it."""
    b = bank(world, accounts=1, per_account=3)
    world.faults.rate_limit_next(1, retry_after=40)
    harness.send(world.event_item_created(b["item"]))
    caplog.set_level(logging.INFO, logger="rq")
    with structlog.testing.capture_logs() as lines:
        harness.drain()
    [job_id] = harness.acknowledged
    [deferred] = [line for line in lines if line["event"] in ("job.deferred", "job.failed")]
    assert (deferred["event"], deferred["log_level"], deferred["retry_after"]) == ("job.deferred", "info", 40)
    due = scheduled_for(harness, job_id)
    assert due is not None and 38 <= (due - datetime.now(UTC)).total_seconds() <= 41
    assert abs(datetime.fromisoformat(deferred["next_attempt"]) - due) <= timedelta(seconds=1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in "\n".join(r.getMessage() for r in caplog.records)
