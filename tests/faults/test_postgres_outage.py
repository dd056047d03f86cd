"""Scenario 3: PostgreSQL unreachable for 20 s in the middle of syncs.

The worker reaches PostgreSQL through a TCP proxy of the test's; cutting it closes every connection
the worker's pool holds and refuses new ones, which is how a database restart or a network partition
looks from the worker. The job being run fails on its broken connection; recording that failure waits
for the pool (up to its 30 s timeout) while psycopg's pool retries the connection with its own backoff.
RQ's retry schedule (``WORKER_RETRY_INTERVALS``, set by the receiver on each job) then brings the job
back, and once the database answers again every job succeeds, the tables equal the ground truth and no
job reaches the dead-letter registry.
"""

from __future__ import annotations

import time

import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from fakebridge.world import World
from tests.faults.support import (
    POSTGRESQL,
    Processes,
    Recorder,
    Sender,
    TcpProxy,
    pg_address,
    populate,
    rq_queue,
    via,
    wait_until,
)
from tests.harness import Harness

pytestmark = POSTGRESQL

OUTAGE_SECONDS = 20.0
RETRY_INTERVALS = (1, 2, 4, 8, 16)  # 31 s in all: more than the outage, however the attempts fall


def test_postgres_unreachable_for_20s(
    harness: Harness, world: World, processes: Processes, recorder: Recorder, r: redis.Redis
) -> None:
    h = harness
    proxy = TcpProxy(pg_address(h.settings.database_url))
    proxy.start()
    try:
        bank = populate(world, items=4, accounts=2, transactions=1200)  # 3 pages per account
        bodies = [h.body(event) for event in bank.traffic(world, 12)]
        url = processes.receiver(WORKER_RETRY_INTERVALS=",".join(map(str, RETRY_INTERVALS)))
        processes.worker(DATABASE_URL=via(h.settings.database_url, proxy.port))
        world.faults.delay(0.02)  # syncs long enough to be cut in the middle
        sender = Sender()
        for body in bodies:
            sender.deliver(url, body)
        assert len(sender.acknowledged) == len(bodies)

        wait_until(lambda: h.rows("SELECT count(*) FROM transactions")[0][0] > 0, 60, "the first rows")
        connections = proxy.connections
        proxy.cut()
        time.sleep(OUTAGE_SECONDS)

        def not_done() -> set[str]:
            return set(sender.acknowledged) - {e for e, (status, _) in h.ledger().items() if status == "done"}

        pending = not_done()
        proxy.restore()
        back_at = time.monotonic()
        wait_until(lambda: not not_done(), 90, "every job to succeed after the outage", 0.2)
        recovered_in = time.monotonic() - back_at

        assert pending, "the outage met no job in flight"
        assert proxy.connections > connections, "the worker never reconnected"
        queue = rq_queue(r)
        jobs = [j for j in Job.fetch_many(sender.acknowledged, connection=r, serializer=JSONSerializer) if j]
        retried = [job for job in jobs if (job.retries_left or 0) < len(RETRY_INTERVALS)]
        assert retried, "no job was retried"
        # Why they were: the database (a broken connection, or none from the pool in time). A job that
        # failed before it could record anything (Ledger.started) has no history, only RQ's retry.
        errors = [attempt["error"] for job in retried for attempt in job.meta.get("attempts", [])]
        assert all(e.startswith(("OperationalError", "PoolTimeout")) for e in errors), errors
        assert queue.failed_job_registry.count == 0
        recorder.note(
            f"{len(retried)} job(s) retried; all done {recovered_in:.1f}s after PostgreSQL came back"
        )
        recorder.settle(h, sent=len(bodies), acknowledged=sender.acknowledged)
    finally:
        proxy.close()
