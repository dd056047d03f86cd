"""Scenario 2: Redis crashes (SIGKILL) and restarts while a `bridgehook serve` takes traffic.

Bridge keeps sending, one event after the other, retrying what is not acknowledged. While Redis is
down the receiver answers 503 (so that Bridge retries), never a 2xx for an event it did not store.
Redis runs as the README requires (AOF on; here `appendfsync always`, so that even SIGKILL loses no
acknowledged write): after the restart every event answered 2xx is in Redis, and gets processed.

The worker runs through the outage, supervised the way Kubernetes runs it: `bridgehook worker` exits
when Redis goes away in the middle of its work (RQ's work loop gives up on an unexpected ConnectionError),
and is started again. A job the dead worker had just taken from the queue, or was running, is left
in RQ's intermediate list or started registry, from where RQ's maintenance recovers it only minutes
later; the scenario moves those clocks (see ``let_time_pass``) and a worker's maintenance requeues it.
Locks the dead worker held (an item's, a user's token refresh) delay the next jobs until they lapse.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import redis

from fakebridge.world import World
from tests.faults.support import (
    POSTGRESQL,
    Processes,
    Recorder,
    RedisServer,
    Sender,
    abandoned,
    let_time_pass,
    populate,
    rq_queue,
    taken,
    wait_until,
)
from tests.harness import Harness

pytestmark = POSTGRESQL

OUTAGE_SECONDS = 2.0


def test_redis_restart_under_traffic(
    harness: Harness, world: World, processes: Processes, recorder: Recorder, tmp_path: Path
) -> None:
    h = harness
    server = RedisServer(tmp_path)
    server.start()
    r = redis.Redis.from_url(server.url)
    try:
        bank = populate(world, items=4, accounts=2, transactions=60)
        bodies = [h.body(event) for event in bank.traffic(world, 48)]
        url = processes.receiver(REDIS_URL=server.url)
        worker = processes.supervised(REDIS_URL=server.url)
        sender = Sender(patience=60)

        def send_all() -> None:
            for body in bodies:
                sender.deliver(url, body)
                time.sleep(0.02)  # the deliveries span the outage

        thread = threading.Thread(target=send_all, name="bridge", daemon=True)
        thread.start()
        wait_until(
            lambda: len(sender.acknowledged) >= 16,
            30,
            "acknowledged deliveries before the crash",
            explain=lambda: (
                f"answers {Counter(sender.statuses())}\n{processes.output(processes.receivers[url])}"
            ),
        )
        server.kill()
        down_at = len(sender.statuses())
        wait_until(lambda: 503 in sender.statuses()[down_at:], 10, "a 503 while Redis is down")
        ready = httpx.get(processes.admins[url] + "/readyz", timeout=5)
        assert ready.status_code == 503, ready.text
        time.sleep(OUTAGE_SECONDS)
        server.start()  # same port, same directory: the AOF is replayed
        thread.join(timeout=90)
        assert not thread.is_alive(), "the sender is stuck"
        sender.close()

        statuses = sender.statuses()
        assert set(statuses) <= {200, 503}, f"answers other than 200 and 503: {set(statuses)}"
        assert any(503 in d.statuses for d in sender.deliveries), "no delivery met the outage"
        assert all(d.acknowledged for d in sender.deliveries), "a delivery was never acknowledged"
        # A 200 means "in Redis": every acknowledged event's job survived the crash (the job hash
        # outlives the job by RESULT_TTL_SECONDS, so this holds for those already processed too).
        lost = [e for e in sender.acknowledged if not r.exists(f"rq:job:{e}")]
        assert lost == [], f"acknowledged, then lost with Redis: {lost}"

        queue = rq_queue(r)

        def settled() -> bool:
            """Nothing queued or scheduled, and the live worker idle."""
            return (
                queue.count == 0
                and queue.scheduled_job_registry.count == 0
                and r.hget(f"rq:worker:{worker.name}", "state") == b"idle"
            )

        wait_until(settled, 90, "the worker to drain the queue", 0.2, lambda: processes.output(worker.proc))
        done = {e for e, (status, _) in h.ledger().items() if status == "done"}
        stranded = set(abandoned(r)) | set(taken(r))
        # What is not done yet is what a dead worker was taking or running when Redis went away.
        assert set(sender.acknowledged) - done <= stranded, "an event neither processed nor stranded"
        if stranded:
            let_time_pass(r)
            recovered = processes.run("worker", "--burst", timeout=60, REDIS_URL=server.url)
            assert recovered.returncode == 0, recovered.output
        assert queue.failed_job_registry.count == 0
        refused = sum(s == 503 for s in statuses)
        recorder.note(
            f"{refused} answers 503; worker restarted {worker.restarts}x, {len(stranded)} job(s) stranded"
        )
        worker.stop()
        recorder.settle(h, sent=len(bodies), acknowledged=sender.acknowledged)
    finally:
        r.close()
        server.close()
