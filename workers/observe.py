"""What an on-call engineer looks at: one snapshot of queues, workers, dead letters and items.

``bridgehook status`` prints it; the scheduler process exports it as Prometheus gauges (one
process, so each figure is exported once however many workers run). A scrape exports what the
sources that answered hold: RQ's queue, workers and replays come from Redis, the items from the
database, the dead letters from both (their times from the ledger); ``bridgehook_status_up``
says which source answered.

``bridgehook status`` also says whether data may be missing (:class:`DeliveryFigures`, read from
Redis alone, and not exported: the receivers export their own rejections): the last delivery
accepted, the rejections of the last hour by reason, the last reconciliation sweep, and the
soonest scheduled retry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from rq import Queue, Worker
from rq.registry import DeferredJobRegistry, FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from service import rejections
from service.logs import get_logger
from service.queue import ARCHIVE_KEY
from service.settings import Settings
from workers.actions import attention, counts
from workers.deadletters import DeadLetters
from workers.reconcile import last_sweep, stale_items, stuck_items
from workers.retries import ScheduledRetries
from workers.storage import Storage

SCAN_LIMIT = 10_000  # dead letters read to count them by type; beyond it, the total is still exact

log = get_logger("bridgehook.observe")
T = TypeVar("T")


@dataclass
class DeliveryFigures:
    """Are we missing data? What Redis says of deliveries, sweeps and retries."""

    last_accepted: dict[str, Any] | None  # the archive's last entry: at, type, decision
    rejected_last_hour: dict[str, int]  # by reason, as the receivers last flushed them
    last_reconciliation: dict[str, Any] | None  # as the sweep recorded it
    next_retry: datetime | None  # the soonest scheduled retry


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
    deliveries: DeliveryFigures
    replays: dict[str, int] = field(default_factory=dict)

    @property
    def needing_attention(self) -> int:
        return sum(n for (_, flagged), n in self.items_by_status.items() if flagged)


@dataclass
class QueueFigures:
    """What Redis alone holds: RQ's queue and registries, its workers, and the replay counters."""

    queues: dict[str, int]
    workers: list[dict[str, Any]]
    replays: dict[str, int]


@dataclass
class DeadLetterFigures:
    """RQ's failed jobs (Redis) with their ledger rows (the database)."""

    count: int
    by_type: dict[str, int]
    oldest: datetime | None


@dataclass
class ItemFigures:
    """What the database alone holds: live items by status, and those the sweep flags."""

    by_status: dict[tuple[int | None, bool], int]
    stuck_1003: list[int]
    stale: list[int]
    by_action: dict[str, int]  # what the items need (workers.actions), every action named
    consent_expiring_7d: int  # live items whose consent ends within 7 days (the alert's)


def queue_figures(settings: Settings, connection: redis.Redis) -> QueueFigures:
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    replays: dict[bytes, bytes] = connection.hgetall("bridgehook:replays")  # type: ignore[assignment]
    return QueueFigures(
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
        replays={k.decode(): int(v) for k, v in replays.items()},
    )


def delivery_figures(settings: Settings, connection: redis.Redis, now: datetime) -> DeliveryFigures:
    last: list[tuple[bytes, dict[bytes, bytes]]] = connection.xrevrange(ARCHIVE_KEY, count=1)  # type: ignore[assignment]
    accepted = None
    if last:
        entry_id, fields = last[0]
        accepted = {
            "at": datetime.fromtimestamp(int(entry_id.split(b"-")[0]) / 1000, tz=UTC),
            "type": fields.get(b"type", b"").decode(),
            "decision": fields.get(b"decision", b"").decode(),
        }
    return DeliveryFigures(
        last_accepted=accepted,
        rejected_last_hour=rejections.last_hour(connection, now.timestamp()),
        last_reconciliation=last_sweep(connection),
        next_retry=ScheduledRetries(connection, settings.queue_name, None).soonest(),
    )


def dead_letter_figures(settings: Settings, connection: redis.Redis, storage: Storage) -> DeadLetterFigures:
    dlq = DeadLetters(connection, settings.queue_name, storage)
    ids = dlq.ids()
    letters = dlq.load(ids[:SCAN_LIMIT])
    times = [t for t in (d.received_at or d.failed_at for d in letters) if t is not None]
    return DeadLetterFigures(
        count=len(ids), by_type=dict(Counter(d.type for d in letters)), oldest=min(times, default=None)
    )


def item_figures(settings: Settings, storage: Storage, now: datetime) -> ItemFigures:
    with storage.transaction() as tx:
        rows = tx.execute(
            "SELECT status, needs_user_action, count(*) FROM items WHERE deleted_at IS NULL "
            "GROUP BY status, needs_user_action"
        ).fetchall()
        [(expiring,)] = tx.execute(
            "SELECT count(*) FROM items WHERE deleted_at IS NULL AND authentication_expires_at <= %s",
            (now + timedelta(days=7),),
        ).fetchall()
    stale_after = timedelta(seconds=settings.reconcile_stale_seconds)
    return ItemFigures(
        by_action=counts(attention(storage, now, timedelta(days=settings.consent_warning_days))),
        consent_expiring_7d=int(expiring),
        by_status={(row[0], bool(row[1])): int(row[2]) for row in rows},
        stuck_1003=[i for i, _ in stuck_items(storage, now)],
        stale=[i for i, _ in stale_items(storage, now, stale_after)],
    )


def snapshot(
    settings: Settings, connection: redis.Redis, storage: Storage, now: datetime | None = None
) -> Status:
    """Every figure at once; raises when Redis or the database fails."""
    now = now or datetime.now(UTC)
    queues = queue_figures(settings, connection)
    letters = dead_letter_figures(settings, connection, storage)
    items = item_figures(settings, storage, now)
    deliveries = delivery_figures(settings, connection, now)
    return Status(
        queues=queues.queues,
        workers=queues.workers,
        dead_letters=letters.count,
        dead_letters_by_type=letters.by_type,
        oldest_dead_letter=letters.oldest,
        items_by_status=items.by_status,
        stuck_1003=items.stuck_1003,
        stale=items.stale,
        replays=queues.replays,
        deliveries=deliveries,
    )


def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    """Every family the collector exports, empty: ``describe()`` yields them so, ``collect()`` fills them."""
    families: list[GaugeMetricFamily | CounterMetricFamily] = [
        GaugeMetricFamily(
            "bridgehook_status_up",
            "1 if the source (redis, database) answered this scrape, 0 if it failed; "
            "the families read from a failed source are left out.",
            labels=["source"],
        ),
        GaugeMetricFamily(
            "bridgehook_queue_jobs", "Jobs by state in RQ's queue and registries.", labels=["state"]
        ),
        GaugeMetricFamily("bridgehook_failed_jobs", "Dead letters by event type.", labels=["type"]),
        GaugeMetricFamily(
            "bridgehook_dead_letter_oldest_age_seconds", "Age of the oldest dead letter (0: none)."
        ),
        GaugeMetricFamily(
            "bridgehook_items",
            "Live items by status and needs_user_action.",
            labels=["status", "needs_user_action"],
        ),
        GaugeMetricFamily("bridgehook_items_stuck_1003", "Items in status 1003 for more than 24 hours."),
        GaugeMetricFamily("bridgehook_items_stale", "Usable items whose last sync is too old."),
        GaugeMetricFamily(
            "bridgehook_items_by_action",
            "Live items by what they need (the API's action; none: not counted).",
            labels=["action"],
        ),
        GaugeMetricFamily(
            "bridgehook_items_consent_expiring_7d", "Usable items whose consent ends within 7 days."
        ),
        CounterMetricFamily("bridgehook_replays", "Dead letters replayed, by outcome.", labels=["outcome"]),
        GaugeMetricFamily("bridgehook_workers", "RQ workers alive on the queue."),
    ]
    return {f.name: f for f in families}


class StatusCollector(Collector):
    """Exports the status at scrape time, each family when the sources it reads answered."""

    def __init__(self, settings: Settings, connection: redis.Redis, storage: Storage) -> None:
        self.settings, self.redis, self.storage = settings, connection, storage

    def describe(self) -> Iterator[Metric]:
        """The families, without reading Redis or the database: registering must not scrape."""
        yield from _families().values()

    def collect(self) -> Iterator[Metric]:
        f = _families()
        queues = _read("redis", lambda: queue_figures(self.settings, self.redis))
        items = _read("database", lambda: item_figures(self.settings, self.storage, datetime.now(UTC)))
        f["bridgehook_status_up"].add_metric(["redis"], 0 if queues is None else 1)
        f["bridgehook_status_up"].add_metric(["database"], 0 if items is None else 1)
        yield f["bridgehook_status_up"]
        if queues is not None:
            for state, n in queues.queues.items():
                f["bridgehook_queue_jobs"].add_metric([state], n)
            for outcome, n in queues.replays.items():
                f["bridgehook_replays"].add_metric([outcome], n)
            f["bridgehook_workers"].add_metric([], len(queues.workers))
            yield from (f[n] for n in ("bridgehook_queue_jobs", "bridgehook_replays", "bridgehook_workers"))
        if items is not None:
            for (status, flagged), n in items.by_status.items():
                f["bridgehook_items"].add_metric([str(status), str(flagged).lower()], n)
            f["bridgehook_items_stuck_1003"].add_metric([], len(items.stuck_1003))
            f["bridgehook_items_stale"].add_metric([], len(items.stale))
            for action, n in items.by_action.items():
                f["bridgehook_items_by_action"].add_metric([action], n)
            f["bridgehook_items_consent_expiring_7d"].add_metric([], items.consent_expiring_7d)
            yield from (
                f[n]
                for n in ("bridgehook_items", "bridgehook_items_stuck_1003", "bridgehook_items_stale",
                          "bridgehook_items_by_action", "bridgehook_items_consent_expiring_7d")
            )  # fmt: skip
        if queues is None or items is None:
            return
        letters = _read("dead letters", lambda: dead_letter_figures(self.settings, self.redis, self.storage))
        if letters is not None:
            for kind, n in letters.by_type.items():
                f["bridgehook_failed_jobs"].add_metric([kind], n)
            age = (datetime.now(UTC) - letters.oldest).total_seconds() if letters.oldest else 0.0
            f["bridgehook_dead_letter_oldest_age_seconds"].add_metric([], age)
            yield from (f[n] for n in ("bridgehook_failed_jobs", "bridgehook_dead_letter_oldest_age_seconds"))


def _read(source: str, read: Callable[[], T]) -> T | None:
    """``read()``, or None and one warning when it fails: a scrape exports what the other sources hold."""
    try:
        return read()
    except Exception as exc:
        log.warning("status.source_failed", source=source, error=f"{type(exc).__name__}: {exc}")
        return None
