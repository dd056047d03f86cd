"""Scenario 1: a `bridgehook worker` SIGKILLed in the middle of a sync, then restarted.

At the moment of the kill, each account's cursor is never ahead of its rows (the cursor commits with
the last page). The job being run is abandoned in RQ's started-job registry; once its heartbeat is due,
RQ's abandoned-job handling, run by the restarted worker's own maintenance, requeues it with one retry
fewer, and it ends at the ground truth. The job queued behind it is untouched by the crash.

Runs on SQLite and PostgreSQL: the crash-safety of the cursor is the storage layer's, on both engines.
Powens's twin kills the worker in the middle of a Powens listing, on PostgreSQL.
"""

from __future__ import annotations

import time

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from fakebridge.world import World
from service.job import JOB_TIMEOUT_SECONDS
from tests.faults.support import POSTGRESQL, Processes, Recorder, abandoned, let_time_pass, wait_until
from tests.harness import Harness, ts
from tests.powens_harness import PowensHarness
from tests.test_powens_sync import connected
from workers.providers import stored_id


def test_sigkill_mid_sync_then_restart(
    harness: Harness, world: World, r: redis.Redis, processes: Processes, recorder: Recorder
) -> None:
    h = harness
    user = world.add_user()
    item = world.add_item(user)
    for account in [world.add_account(item) for _ in range(3)]:
        world.add_transactions(account, 1600)  # 4 pages each
    behind = world.add_item(world.add_user())
    world.add_transactions(world.add_account(behind), 30)
    world.faults.delay(0.15)  # slow enough to kill the worker between pages
    assert h.send(world.event_item_created(item)) == "queued"
    assert h.send(world.event_item_created(behind)) == "queued"

    # A short item lease, so that the restarted worker need not wait long for the dead one's lock.
    worker = processes.worker(ITEM_LOCK_SECONDS="3")
    started = time.time()
    wait_until(lambda: h.rows("SELECT count(*) FROM transactions")[0][0] >= 700, 60, "the worker to write")
    processes.kill(worker)  # the group: the worker and the RQ scheduler it forked, as in a pod

    truth = h.truth()["transactions"]
    written = h.rows("SELECT count(*) FROM transactions")[0][0]
    assert 0 < written < len(truth), "the kill must land mid-sync"
    stored = {row[0] for row in h.rows("SELECT id FROM transactions")}
    for account, cursor in h.rows("SELECT id, transactions_cursor FROM accounts"):
        if cursor is None:
            continue
        covered = {
            t for t, v in truth.items() if v["account_id"] == account and v["updated_at"] <= ts(cursor)
        }
        assert covered <= stored, f"account {account}'s cursor is ahead of its rows"

    world.faults.clear()
    requeued_and_done(h, r, processes, recorder, started)


@POSTGRESQL
def test_sigkill_mid_powens_listing_then_restart(
    powens: PowensHarness, r: redis.Redis, processes: Processes, recorder: Recorder
) -> None:
    """Powens's twin: the kill lands in the listing of a connection new to us (the body carries its
    accounts, none of its transactions), between two of its pages. The accounts' cursors move only once
    the listing has ended, so none has moved. (PostgreSQL only: the storage layer is Bridge's, whose
    crash-safety the test above checks on both engines.)"""
    h, world = powens, powens.pworld
    connection = connected(h, h.user(), accounts=3, transactions=1400)  # 5 pages of the user's listing
    behind = connected(h, h.user(), accounts=1, transactions=20)
    world.faults.delay(0.3)  # each page a third of a second: time to kill the worker between two
    assert h.deliver("CONNECTION_SYNCED", world.connection_synced(connection, new=[])) == "queued"
    assert h.deliver("CONNECTION_SYNCED", world.connection_synced(behind, new=[])) == "queued"

    worker = processes.worker(ITEM_LOCK_SECONDS="3")
    started = time.time()
    wait_until(lambda: len(h.powens_tables()["transactions"]) >= 1000, 60, "a page of the listing written")
    processes.kill(worker)

    truth = h.powens_truth()["transactions"]
    tables = h.powens_tables()["transactions"]
    assert 0 < len(tables) < len(truth), "the kill must land mid-listing"
    assert all(tables[t] == truth[t] for t in tables)
    cursors = h.rows("SELECT transactions_cursor FROM accounts WHERE item_id = %s", (stored_id(connection),))
    assert len(cursors) == 3 and all(cursor is None for (cursor,) in cursors), cursors
    listing = f"/2.0/users/{world.connections[connection].id_user}/transactions"
    assert sum(request.path == listing for request in world.requests) < 5, "the kill must land mid-listing"

    world.faults.clear()
    requeued_and_done(h, r, processes, recorder, started)


def requeued_and_done(
    h: Harness, r: redis.Redis, processes: Processes, recorder: Recorder, started: float
) -> None:
    """After the kill of the worker running the first of ``h``'s two events: that job is abandoned in
    the started registry, due when its heartbeat lapses (RQ's SimpleWorker sets it once, to the job
    timeout plus 60 s), while the second still waits in the queue. Rather than sleep eleven minutes,
    the heartbeat's deadline moves to the past (as if the time had passed): a restarted worker's
    start-up maintenance must then requeue the job, with one retry fewer, and both end done."""
    killed_job, queued_job = h.acknowledged
    queue = Queue(h.settings.queue_name, connection=r, serializer=JSONSerializer)
    [(job, due)] = abandoned(r, h.settings.queue_name).items()
    assert job == killed_job
    assert time.time() < due <= started + JOB_TIMEOUT_SECONDS + 60 + 5
    assert queue.get_job_ids() == [queued_job]

    let_time_pass(r, h.settings.queue_name)
    # A short item lease, so that the restarted worker need not wait long for the dead one's lock.
    restarted = processes.run("worker", "--burst", timeout=120, ITEM_LOCK_SECONDS="3")
    assert restarted.returncode == 0, restarted.output

    assert (
        Job.fetch(killed_job, connection=r, serializer=JSONSerializer).retries_left
        == len(h.settings.retry_intervals) - 1
    ), "requeued by RQ's abandoned-job handling, with one retry fewer"
    assert h.ledger() == {killed_job: ("done", 2), queued_job: ("done", 1)}
    assert h.failed_ids() == []
    recorder.settle(h, sent=2, acknowledged=h.acknowledged)
