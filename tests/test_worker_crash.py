"""A worker killed with SIGKILL in the middle of a sync, then restarted, ends at the ground truth;
at the moment of the kill the cursor is never ahead of the rows written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import redis
from rq import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from fakebridge.world import World
from tests.harness import Harness, ts
from tests.support import TEST_ENCRYPTION_KEY


def worker_env(h: Harness) -> dict[str, str]:
    s = h.settings
    return {
        **os.environ,
        "REDIS_URL": s.redis_url or "",
        "DATABASE_URL": s.database_url,
        "BRIDGE_API_URL": s.bridge_api_url,
        "BRIDGE_CLIENT_ID": s.bridge_client_id or "",
        "BRIDGE_CLIENT_SECRET": h.world.client_secret,
        "WORKER_RETRY_INTERVALS": "0,0,0",
        "SYNC_OVERLAP_SECONDS": "0",
        "ITEM_LOCK_SECONDS": "3",
        "BRIDGE_RATE_LIMIT_USER": "100000/60",
        "BRIDGE_RATE_LIMIT_APP": "100000/60",
        "METRICS_PORT": "0",
        "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
    }


def test_sigkill_mid_sync_then_restart(harness: Harness, world: World, r: redis.Redis) -> None:
    h = harness
    user = world.add_user()
    item = world.add_item(user)
    accounts = [world.add_account(item) for _ in range(3)]
    for account in accounts:
        world.add_transactions(account, 1600)  # 4 pages each
    world.faults.delay(0.15)  # slow enough to kill the worker between pages
    assert h.send(world.event_item_created(item)) == "queued"

    env = worker_env(h)
    # Its own process group: the worker and the RQ scheduler it forks die together, as in a pod.
    worker = subprocess.Popen(
        [sys.executable, "-m", "bridgehook", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while h.rows("SELECT count(*) FROM transactions")[0][0] < 700:
        assert time.monotonic() < deadline, "the worker wrote nothing"
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)

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

    # The job is abandoned: RQ's own cleanup would find it once its heartbeat (≥ 60 s) lapses;
    # we ask for that cleanup as of a time past the heartbeat instead of sleeping.
    queue = Queue(h.settings.queue_name, connection=r, serializer=JSONSerializer)
    StartedJobRegistry(queue=queue).cleanup(timestamp=time.time() + 3600)
    assert queue.count == 1  # requeued by RQ with one retry fewer

    world.faults.clear()
    restarted = subprocess.run([sys.executable, "-m", "bridgehook", "worker", "--burst"], env=env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert h.tables() == h.truth()
    assert h.failed_ids() == []
    [(status, attempts)] = h.rows("SELECT status, attempts FROM webhook_events")
    assert (status, attempts) == ("done", 2)
