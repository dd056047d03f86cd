"""De-duplicate, enqueue and archive an event in one atomic round trip to Redis.

Bridge has no event id, so an event's id is the SHA-256 of its raw body. One Lua
script, run atomically by Redis, does everything a delivery needs:

1. ``SET dedupe:<id> NX EX <window>``: the first delivery of a body wins the key;
2. only then, write the RQ job hash (from RQ's own ``Job.to_dict()``, exactly as RQ's
   unique-enqueue script does), push the id on the queue and register the queue;
3. append the delivery to the archive stream, trimmed by length and by age.

So there is no check-then-act window between two calls, a duplicate never becomes a
second job, and when the script's reply arrives the event is in Redis: only then does the
receiver answer 2xx. Any Redis error becomes :class:`QueueUnavailable` (answered 503, so
that Bridge retries).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from rq.job import Job, JobStatus, Retry
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from service.settings import Settings

Outcome = Literal["queued", "duplicate", "ignored"]

KEY_PREFIX = "bridgehook"
ARCHIVE_KEY = f"{KEY_PREFIX}:archive"
JOB_TIMEOUT_SECONDS = 600
RESULT_TTL_SECONDS = 3600
FAILURE_TTL_SECONDS = 90 * 86400  # dead letters stay inspectable for a quarter

_SCRIPT = """
-- KEYS: 1 dedupe key, 2 job key, 3 queue key, 4 set of queues, 5 archive stream
-- ARGV: 1 job id, 2 dedupe seconds, 3 archive max length, 4 archive min id (ms),
--       5 "enqueue" or "ignored", 6 number of archive field/value items,
--       then the archive items, then the job hash items.
local decision = ARGV[5]
local n_archive = tonumber(ARGV[6])
if decision == "enqueue" then
  if redis.call("SET", KEYS[1], ARGV[1], "NX", "EX", ARGV[2]) then
    if #ARGV > 6 + n_archive then
      redis.call("HSET", KEYS[2], unpack(ARGV, 7 + n_archive))
    end
    redis.call("RPUSH", KEYS[3], ARGV[1])
    redis.call("SADD", KEYS[4], KEYS[3])
    decision = "queued"
  else
    decision = "duplicate"
  end
end
redis.call("XADD", KEYS[5], "MAXLEN", "~", ARGV[3], "*", "decision", decision, unpack(ARGV, 7, 6 + n_archive))
redis.call("XTRIM", KEYS[5], "MINID", "~", ARGV[4])
return decision
"""


def build_job(
    connection: redis.Redis,
    settings: Settings,
    job_id: str,
    function: str,
    event: Mapping[str, Any],
    *,
    received_at_ms: int | None = None,
    replayed: bool = False,
) -> Job:
    """An RQ job for one event, as the receiver and every replay command enqueue it.

    The retry schedule (``WORKER_RETRY_INTERVALS``) travels with the job: RQ's scheduler
    re-queues it, and RQ's abandoned-job cleanup honours it too when a worker dies mid-job.
    ``meta.received_at`` (ms) is when the webhook arrived, for the sync-lag metric.
    """
    intervals = list(settings.retry_intervals)
    return Job.create(
        function,
        args=[dict(event)],
        id=job_id,
        connection=connection,
        serializer=JSONSerializer,
        origin=settings.queue_name,
        timeout=JOB_TIMEOUT_SECONDS,
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=FAILURE_TTL_SECONDS,
        description=f"{event.get('type')} {job_id[:12]}",
        status=JobStatus.QUEUED,
        retry=Retry(max=len(intervals), interval=intervals) if intervals else None,
        meta={"received_at": received_at_ms or int(time.time() * 1000), "replayed": replayed},
    )


class QueueUnavailable(Exception):
    """Redis could not be reached or did not confirm the write."""


def dedupe_key(event_id: str) -> str:
    return f"{KEY_PREFIX}:dedupe:{event_id}"


class EventQueue:
    """The receiver's one door into Redis. Open it in the app's lifespan, close it after."""

    def __init__(self, settings: Settings) -> None:
        if settings.redis_url is None:
            raise ValueError("REDIS_URL is not set")
        self._settings = settings
        self._url = settings.redis_url
        self.queue_key = Queue.redis_queue_namespace_prefix + settings.queue_name
        self._redis: aioredis.Redis | None = None
        # RQ builds job hashes from a Job bound to a (never used) synchronous connection.
        self._rq_connection = redis.Redis.from_url(self._url)

    def __repr__(self) -> str:
        return f"EventQueue(queue={self._settings.queue_name!r}, redis={self._settings.redis_url_for_logs!r})"

    async def open(self) -> None:
        self._redis = aioredis.Redis.from_url(
            self._url,
            socket_connect_timeout=2,
            socket_timeout=2,
            health_check_interval=15,
            retry_on_timeout=False,
        )
        self._script = self._redis.register_script(_SCRIPT)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._rq_connection.close()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("EventQueue.open() was not awaited")
        return self._redis

    def job_fields(self, event_id: str, function: str, event: Mapping[str, Any]) -> list[Any]:
        """The RQ job hash, flattened for HSET, built by RQ itself."""
        job = build_job(self._rq_connection, self._settings, event_id, function, event)
        job.enqueued_at = rq_now()
        fields: list[Any] = []
        for key, value in job.to_dict().items():
            if value is not None:
                fields += (key, value if isinstance(value, bytes | str) else str(value))
        return fields

    async def submit(
        self,
        event_id: str,
        function: str | None,
        event: Mapping[str, Any] | None,
        archive: Mapping[str, str | bytes],
    ) -> Outcome:
        """Archive a delivery and, when ``function`` is given, enqueue it unless it is a duplicate."""
        now_ms = int(time.time() * 1000)
        archive_items: list[Any] = []
        for key, value in archive.items():
            archive_items += (key, value)
        job_items = self.job_fields(event_id, function, event) if function and event is not None else []
        args = [
            event_id,
            self._settings.dedupe_seconds,
            self._settings.archive_max_events,
            now_ms - self._settings.archive_max_age_seconds * 1000,
            "enqueue" if function else "ignored",
            len(archive_items),
            *archive_items,
            *job_items,
        ]
        keys = [
            dedupe_key(event_id),
            Job.redis_job_namespace_prefix + event_id,
            self.queue_key,
            Queue.redis_queues_keys,
            ARCHIVE_KEY,
        ]
        try:
            decision = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(type(exc).__name__) from exc
        outcome = decision.decode() if isinstance(decision, bytes) else str(decision)
        if outcome not in ("queued", "duplicate", "ignored"):
            raise QueueUnavailable(f"unexpected reply {outcome!r}")
        return outcome  # type: ignore[return-value]

    async def ping(self) -> None:
        """Raise QueueUnavailable unless Redis answers and accepts a write."""
        try:
            await self.redis.ping()
            await self.redis.set(f"{KEY_PREFIX}:readyz", "1", px=5000)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(type(exc).__name__) from exc

    async def depth(self) -> int:
        return int(await self.redis.llen(self.queue_key))

    async def dead_letters(self) -> int:
        return int(await self.redis.zcard(f"rq:failed:{self._settings.queue_name}"))
