"""Request budgets: a job that meets one (ours, or Bridge's 429) runs again when it frees, spends none of
its retries, and its listing goes on where it stopped. On SQLite and PostgreSQL, against the fake Bridge
over HTTP, with real RQ scheduling."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

from rq import Queue
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from fakebridge.world import World
from tests.harness import Harness, storage_at, worker_settings
from workers.erasure import erase_user
from workers.jobs import MAX_IDLE_DEFERRALS
from workers.sync import REUSE_READ


def queue_of(harness: Harness) -> Queue:
    return Queue(harness.settings.queue_name, connection=harness.r, serializer=JSONSerializer)


def scheduled(harness: Harness) -> list[tuple[Job, datetime]]:
    """The jobs RQ's scheduler holds, each with when it is due."""
    registry = ScheduledJobRegistry(queue=queue_of(harness))
    jobs = [Job.fetch(i, connection=harness.r, serializer=JSONSerializer) for i in registry.get_job_ids()]
    return [(job, registry.get_scheduled_time(job)) for job in jobs]


def release(harness: Harness, *, wait: bool) -> int:
    """Hand the scheduled jobs to the queue as RQ's scheduler does, once due (``wait``) or at once."""
    queue, registry = queue_of(harness), ScheduledJobRegistry(queue=queue_of(harness))
    held = scheduled(harness)
    if wait and held:
        time.sleep(max(0.0, max(due for _, due in held).timestamp() - time.time()) + 0.05)
    for job, _ in held:
        registry.remove(job)
        queue.enqueue_job(job)
    return len(held)


def run_to_the_end(harness: Harness, timeout: float = 60) -> int:
    """Drain, then wait for each deferred job and run it, until none is left; the number of deferrals."""
    deadline, deferrals = time.monotonic() + timeout, 0
    harness.drain()
    while scheduled(harness):
        assert time.monotonic() < deadline, "jobs still deferred"
        deferrals += release(harness, wait=True)
        harness.drain()
    return deferrals


def bank(world: World, transactions: int) -> dict[str, Any]:
    user = world.add_user(external_user_id="app-user-1")
    item = world.add_item(user)
    account = world.add_account(item)
    world.add_transactions(account, transactions)
    return {"user": user, "item": item, "account": account}


def test_a_429_longer_than_a_worker_waits_defers_the_job_and_spends_no_retry(
    harness: Harness, world: World
) -> None:
    """Five 429s with a Retry-After of 40 s, more than the job's three retries: each defers it by 40 s
    in RQ's scheduler (no worker waits), none is a dead letter, and the sixth run completes."""
    b = bank(world, 30)
    harness.send(world.event_item_created(b["item"]))
    for _ in range(5):
        world.faults.rate_limit_next(1, retry_after=40)
        release(harness, wait=False)
        before = time.time()
        harness.drain()
        [(job, due)] = scheduled(harness)
        assert job.retries_left == 3
        assert 39 <= due.timestamp() - before <= 42
        assert harness.failed_ids() == []
        assert harness.rows("SELECT status FROM webhook_events") == [("queued",)]
    release(harness, wait=False)
    harness.drain()
    assert scheduled(harness) == []
    assert harness.failed_ids() == []
    assert harness.rows("SELECT status FROM webhook_events") == [("done",)]
    assert harness.tables() == harness.truth()


def test_the_retry_schedule_comes_back_after_a_deferral(harness: Harness, world: World) -> None:
    """A deferral replaces the job's retry schedule for one retry only: a real failure afterwards
    follows the configured one (three immediate retries in the tests), then is a dead letter."""
    b = bank(world, 5)
    world.set_item_status(b["item"], 1003)  # the bank is down: a transient failure that is no budget
    harness.send(world.event_item_created(b["item"]))
    world.faults.rate_limit_next(1, retry_after=40)
    harness.drain()
    [(job, _)] = scheduled(harness)
    assert job.retries_left == 3
    release(harness, wait=False)
    harness.drain()  # four runs, all refused by the bank, without waiting
    [dead] = harness.failed_ids()
    assert harness.rows("SELECT status, attempts FROM webhook_events") == [("failed", 5)]
    meta = Job.fetch(dead, connection=harness.r, serializer=JSONSerializer).meta
    assert not {"listed", "items_done", "idle_deferrals"} & meta.keys()  # a replay starts afresh


def test_a_long_history_completes_under_a_small_user_budget(
    harness: Harness, world: World, redis_url: str
) -> None:
    """Five requests per 11 s for the user, a history of six pages: the first run lists three pages and
    meets the budget; the next goes on from the fourth page. Every page is fetched once, nothing is a
    dead letter, and the tables equal Bridge's.

    A worker waits up to 5 s for a budget, half the window: the first run's sixth request, unless its
    first five took 6 s, waits longer and defers the job; the second run's requests wait for the
    first's to leave the window, no longer than those took. (With the default 10 s, a first run slower
    than 1 s, as on a loaded machine, waited for its budget inside the job and was never deferred.)"""
    b = bank(world, 2800)  # six pages of 500
    harness.settings = worker_settings(
        redis_url, harness.settings.database_url, harness.fake.api_url, world,
        BRIDGE_RATE_LIMIT_USER="5/11", BRIDGE_BUDGET_MAX_WAIT_SECONDS="5",
    )  # fmt: skip
    harness.send(world.event_item_created(b["item"]))
    world.reset_requests()

    deferrals = run_to_the_end(harness)

    assert 1 <= deferrals <= 2  # (two on a machine slow enough that the second run waits too long)
    assert harness.failed_ids() == []
    assert harness.tables() == harness.truth()
    listings = [r for r in world.requests if r.path.endswith("/transactions")]
    assert [r.status for r in listings] == [200] * 6  # each page once: the second run resumed
    assert reads(world) == (1, 1)  # the second run took the item and its accounts as the first read them
    assert world.budgets.refused == {"app": 0, "user": 0, "token": 0}
    [(cursor, listing)] = harness.rows("SELECT transactions_cursor, listing FROM accounts")
    assert cursor is not None and listing is None
    assert harness.rows("SELECT status FROM webhook_events") == [("done",)]


def reads(world: World) -> tuple[int, int]:
    """Requests for an item, and for an item's accounts, since the last reset."""
    paths = [r.path for r in world.requests]
    return sum("/items/" in p for p in paths), sum(p.endswith("/accounts") for p in paths)


def test_a_read_older_than_reuse_read_is_read_again(harness: Harness, world: World, redis_url: str) -> None:
    """A job deferred after it read the item and its accounts reuses that read for REUSE_READ: past it,
    its next attempt reads them again (what changed meanwhile is written), and goes on with its listing."""
    b = bank(world, 2800)
    fast_budget(harness, world, redis_url, "5/3")
    harness.send(world.event_item_created(b["item"]))
    world.reset_requests()
    harness.drain()
    [(job, _)] = scheduled(harness)
    assert reads(world) == (1, 1)
    job.meta["reads"][str(b["item"])]["at"] -= REUSE_READ
    job.save_meta()
    world.set_item_status(b["item"], 1010)  # changed since, and read again: the sync stops for the user

    run_to_the_end(harness)

    assert reads(world) == (2, 1)
    assert harness.rows("SELECT status FROM items") == [(1010,)]
    assert harness.failed_ids() == []
    world.set_item_status(b["item"], 0)
    harness.send(world.event_item_refreshed(b["item"]))
    run_to_the_end(harness)
    assert harness.tables() == harness.truth()


def test_bridges_own_budget_is_never_exceeded(harness: Harness, world: World, redis_url: str) -> None:
    """The fake Bridge enforces 5 requests per 10 s per user as Bridge would; ours is a second stricter,
    5 per 11 s: the sync completes without a single 429. (Ours counts a request when it leaves, Bridge
    when it arrives: with the same window, a request that took longer to arrive than the one five
    requests later, as on a loaded machine, made Bridge count six in its window.)"""
    b = bank(world, 2800)
    world.budgets.set(user=(5, 10))
    harness.settings = worker_settings(
        redis_url, harness.settings.database_url, harness.fake.api_url, world, BRIDGE_RATE_LIMIT_USER="5/11"
    )
    harness.send(world.event_item_created(b["item"]))
    run_to_the_end(harness)
    assert world.budgets.refused == {"app": 0, "user": 0, "token": 0}
    assert harness.tables() == harness.truth()
    assert harness.failed_ids() == []


def test_a_listing_bridge_will_not_resume_starts_again(harness: Harness, world: World) -> None:
    """An unfinished listing whose next_uri Bridge refuses (400) is listed again from its first page,
    rather than failing the job for good."""
    b = bank(world, 1200)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    account = b["account"]
    [(cursor,)] = harness.rows("SELECT transactions_cursor FROM accounts")
    state = {
        "next": f"/v3/aggregation/transactions?account_id={account}&limit=500&after=expired",
        "since": str(cursor), "newest": None, "future": [], "reset": False,
        "started": datetime.now().astimezone().isoformat(),
    }  # fmt: skip
    with harness.db.transaction() as tx:
        tx.execute("UPDATE accounts SET listing = %s WHERE id = %s", (json.dumps(state), account))
    world.add_transactions(account, 3)
    world.set_item_status(b["item"], 0)
    world.reset_requests()

    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()

    assert [r.status for r in world.requests if r.path.endswith("/transactions")] == [400, 200]
    assert harness.failed_ids() == []
    assert harness.tables() == harness.truth()
    assert harness.rows("SELECT listing FROM accounts") == [(None,)]


def fast_budget(harness: Harness, world: World, redis_url: str, rate: str) -> None:
    """A user budget of ``rate`` (a window of a few seconds) that a worker waits for a second at most:
    a spent budget defers the job, the requests of a run pass at once."""
    harness.settings = worker_settings(
        redis_url, harness.settings.database_url, harness.fake.api_url, world,
        BRIDGE_RATE_LIMIT_USER=rate, BRIDGE_BUDGET_MAX_WAIT_SECONDS="1",
    )  # fmt: skip


def test_a_resumed_listing_sees_what_changed_during_its_pause(
    harness: Harness, world: World, redis_url: str
) -> None:
    """The first run lists three of six pages; then Bridge deletes a transaction of the first page and
    adds newer ones; the second run lists the last three pages. Its cursor is no later than when the
    listing began, so the next delta sees the deletion."""
    b = bank(world, 2800)
    fast_budget(harness, world, redis_url, "5/3")
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    assert len(scheduled(harness)) == 1
    [(first_page,)] = harness.rows("SELECT min(id) FROM transactions")
    world.delete_transaction(first_page)
    world.add_transactions(b["account"], 3)

    run_to_the_end(harness)
    world.set_item_status(b["item"], 0)
    harness.send(world.event_item_refreshed(b["item"]))
    run_to_the_end(harness)

    assert harness.failed_ids() == []
    assert harness.tables() == harness.truth()
    [(deleted_at,)] = harness.rows("SELECT deleted_at FROM transactions WHERE id = %s", (first_page,))
    assert deleted_at is not None


def test_a_full_sync_goes_on_with_the_accounts_it_has_not_listed(
    harness: Harness, world: World, redis_url: str
) -> None:
    """Two accounts of five and three pages under a budget of five requests: each run goes on where the
    last stopped, and an account listed whole by an earlier run is not listed again. The second run
    takes the item and its accounts as the first read them: ten requests, two runs."""
    b = bank(world, 2300)
    second = world.add_account(b["item"], name="Livret")
    world.add_transactions(second, 1300)
    fast_budget(harness, world, redis_url, "5/3")
    harness.send(world.event_item_created(b["item"]))
    world.reset_requests()

    deferrals = run_to_the_end(harness)

    assert 1 <= deferrals <= 2  # (two on a machine slow enough that the second run waits too long)
    assert harness.failed_ids() == []
    assert harness.tables() == harness.truth()
    listings = [r for r in world.requests if r.path.endswith("/transactions")]
    assert [r.status for r in listings] == [200] * 8  # 5 + 3 pages, each once
    assert reads(world) == (1, 1)


def test_a_job_that_never_moves_forward_spends_its_retries(harness: Harness, world: World) -> None:
    """The loop guard: a budget that has stopped the job before it wrote anything, attempt after attempt
    (MAX_IDLE_DEFERRALS of them), spends a retry like any transient error; an attempt that writes a page
    starts the count again."""
    b = bank(world, 30)
    harness.send(world.event_item_created(b["item"]))
    [job_id] = queue_of(harness).get_job_ids()
    job = Job.fetch(job_id, connection=harness.r, serializer=JSONSerializer)
    job.meta["idle_deferrals"] = MAX_IDLE_DEFERRALS
    job.save_meta()
    world.faults.rate_limit_next(1, retry_after=40)
    harness.drain()
    [(job, _)] = scheduled(harness)
    assert job.retries_left == 2  # spent, this time
    assert job.meta["idle_deferrals"] == MAX_IDLE_DEFERRALS + 1
    release(harness, wait=False)
    harness.drain()
    assert harness.tables() == harness.truth()


def test_a_refreshs_events_coalesce_into_one_sync(harness: Harness, world: World, redis_url: str) -> None:
    """SYNC_COALESCE_SECONDS: an item.refreshed and its item.account.updated, sent milliseconds apart,
    step aside (no call, no retry spent) until the refresh's events are all in; then the item's sync
    runs first and serves the account's event. Without it the account's event, received after that
    sync began, would cost a sync of its own."""
    harness.settings = worker_settings(
        redis_url, harness.settings.database_url, harness.fake.api_url, world, SYNC_COALESCE_SECONDS="1"
    )
    b = bank(world, 3)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()  # a full sync is never held back
    assert scheduled(harness) == []
    world.add_transactions(b["account"], 2)
    world.set_item_status(b["item"], 0)
    refreshed = harness.send(world.event_item_refreshed(b["item"]))
    updated = harness.send(world.event_account(b["account"], "updated"))
    assert (refreshed, updated) == ("queued", "queued")
    world.reset_requests()

    harness.drain()
    held = sorted(scheduled(harness), key=lambda pair: pair[1])
    assert [job.args[0]["type"] for job, _ in held] == ["item.refreshed", "item.account.updated"]
    assert all(
        job.retries_left == 3 for job, _ in held
    )  # (WORKER_RETRY_INTERVALS' five, less the one RQ takes)
    assert world.requests == []

    run_to_the_end(harness)
    jobs = [Job.fetch(i, connection=harness.r, serializer=JSONSerializer) for i in harness.acknowledged[-2:]]
    assert [(job.return_value() or {}).get("skipped") for job in jobs] == [None, "served"]
    with world.lock:
        assert sum(1 for r in world.requests if r.path.endswith(f"/items/{b['item']}")) == 1
    assert harness.tables() == harness.truth()


def test_a_reused_read_writes_nothing_for_a_user_erased_meanwhile(
    harness: Harness, world: World, redis_url: str
) -> None:
    """A job deferred after it read the item and its accounts; the user is erased meanwhile (its rows
    gone, a tombstone left). The next attempt, reusing that read, writes no item, so it must find the
    tombstone itself: it writes no transaction and ends, rather than leaving rows of no one."""
    b = bank(world, 2800)
    fast_budget(harness, world, redis_url, "5/3")
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    assert len(scheduled(harness)) == 1
    with storage_at(harness.settings.database_url) as storage:
        erase_user(storage, b["user"], "app-user-1", datetime.now(UTC), lambda item_id: nullcontext())
    assert harness.rows("SELECT count(*) FROM transactions") == [(0,)]

    run_to_the_end(harness)

    assert harness.rows("SELECT count(*) FROM transactions") == [(0,)]
    assert harness.rows("SELECT count(*) FROM items") == [(0,)]
    assert harness.failed_ids() == []
