"""What an on-call engineer looks at: one snapshot of queues, workers, dead letters and items.

``bridgehook status`` prints it; the scheduler process exports it as Prometheus gauges (one
process, so each figure is exported once however many workers run).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from rq import Queue, Worker
from rq.registry import DeferredJobRegistry, FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from service.settings import Settings
from workers.deadletters import DeadLetters
from workers.reconcile import stale_items, stuck_items
from workers.storage import Storage

SCAN_LIMIT = 10_000  # dead letters read to count them by type; beyond it, the total is still exact


@dataclass
class Status:
    queues: dict[str, int]
    workers: list[dict[str, Any]]
    dead_letters: int
    dead_letters_by_type: dict[str, int]
    oldest_dead_letter: datetime | None
    items_by_status: dict[tuple[int | None, bool], int]
    stuck_1003: list[int]
    stale: list[int]
    replays: dict[str, int] = field(default_factory=dict)

    @property
    def needing_attention(self) -> int:
        return sum(n for (_, flagged), n in self.items_by_status.items() if flagged)


def snapshot(
    settings: Settings, connection: redis.Redis, storage: Storage, now: datetime | None = None
) -> Status:
    """Only what it reads, so that `bridgehook status` needs no worker context (no Bridge client)."""
    now = now or datetime.now(UTC)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    dlq = DeadLetters(connection, settings.queue_name, storage)
    ids = dlq.ids()
    letters = dlq.load(ids[:SCAN_LIMIT])
    with storage.transaction() as tx:
        rows = tx.execute(
            "SELECT status, needs_user_action, count(*) FROM items WHERE deleted_at IS NULL "
            "GROUP BY status, needs_user_action"
        ).fetchall()
    stale_after = timedelta(seconds=settings.reconcile_stale_seconds)
    times = [t for t in (d.received_at or d.failed_at for d in letters) if t is not None]
    replays: dict[bytes, bytes] = connection.hgetall("bridgehook:replays")  # type: ignore[assignment]
    return Status(
        queues={
            "queued": queue.count,
            "started": StartedJobRegistry(queue=queue).count,
            "scheduled": ScheduledJobRegistry(queue=queue).count,  # type: ignore[no-untyped-call]
            "deferred": DeferredJobRegistry(queue=queue).count,
            "failed": FailedJobRegistry(queue=queue).count,
        },
        workers=[
            {
                "name": w.name,
                "state": w.get_state(),
                "job": w.get_current_job_id(),
                "heartbeat": w.last_heartbeat,
            }
            for w in Worker.all(queue=queue)
        ],
        dead_letters=len(ids),
        dead_letters_by_type=dict(Counter(d.type for d in letters)),
        oldest_dead_letter=min(times, default=None),
        items_by_status={(row[0], bool(row[1])): int(row[2]) for row in rows},
        stuck_1003=[i for i, _ in stuck_items(storage, now)],
        stale=[i for i, _ in stale_items(storage, now, stale_after)],
        replays={k.decode(): int(v) for k, v in replays.items()},
    )


class StatusCollector(Collector):
    """Exports :func:`snapshot` at scrape time."""

    def __init__(self, settings: Settings, connection: redis.Redis, storage: Storage) -> None:
        self.settings, self.redis, self.storage = settings, connection, storage

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = snapshot(self.settings, self.redis, self.storage)
        queue = GaugeMetricFamily(
            "bridgehook_queue_jobs", "Jobs by state in RQ's queue and registries.", labels=["state"]
        )
        for state, n in s.queues.items():
            queue.add_metric([state], n)
        yield queue
        failed = GaugeMetricFamily("bridgehook_failed_jobs", "Dead letters by event type.", labels=["type"])
        for kind, n in s.dead_letters_by_type.items():
            failed.add_metric([kind], n)
        yield failed
        age = (datetime.now(UTC) - s.oldest_dead_letter).total_seconds() if s.oldest_dead_letter else 0.0
        yield gauge(
            "bridgehook_dead_letter_oldest_age_seconds", "Age of the oldest dead letter (0: none).", age
        )
        items = GaugeMetricFamily(
            "bridgehook_items",
            "Live items by status and needs_user_action.",
            labels=["status", "needs_user_action"],
        )
        for (status, flagged), n in s.items_by_status.items():
            items.add_metric([str(status), str(flagged).lower()], n)
        yield items
        yield gauge(
            "bridgehook_items_stuck_1003", "Items in status 1003 for more than 24 hours.", len(s.stuck_1003)
        )
        yield gauge("bridgehook_items_stale", "Usable items whose last sync is too old.", len(s.stale))
        replays = CounterMetricFamily(
            "bridgehook_replays", "Dead letters replayed, by outcome.", labels=["outcome"]
        )
        for outcome, n in s.replays.items():
            replays.add_metric([outcome], n)
        yield replays
        yield gauge("bridgehook_workers", "RQ workers alive on the queue.", len(s.workers))


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
