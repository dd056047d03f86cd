"""De-duplicate, enqueue and archive deliveries atomically, many per round trip to Redis.

Bridge has no event id, so an event's id is the SHA-256 of its raw body. One Lua script,
run atomically by Redis, does everything a delivery needs:

1. ``SET dedupe:<id> NX EX <window>``: the first delivery of a body wins the key;
2. only then, write the RQ job hash and push the id on the queue (what RQ's own
   unique-enqueue script does), and register the queue;
3. append the delivery to the archive stream, trimmed by length and by age.

There is no check-then-act window between two calls, a duplicate never becomes a second
job, and when the script's reply arrives the events are in Redis: only then does the
receiver answer 2xx. Any Redis error becomes :class:`QueueUnavailable` (answered 503, so
that Bridge retries; a retried event that had in fact been stored is then a duplicate).

Deliveries that arrive in the same turn of the event loop share one script call (micro-
batching): under load, one round trip and one command to pack serve dozens of requests.
The job hash is RQ's own ``Job.to_dict()``, computed once as a template; per event only
the fields that vary (payload, times, description, meta) are built, the way RQ builds them
(a test holds the two equal for the installed RQ).
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Mapping
from typing import Any, Literal

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from rq.job import Job, JobStatus, Retry
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now
from rq.utils import utcformat

from service.logs import get_logger
from service.metrics import BATCH_SIZE
from service.settings import Settings

Outcome = Literal["queued", "duplicate", "ignored"]
log = get_logger("bridgehook.queue")

KEY_PREFIX = "bridgehook"
ARCHIVE_KEY = f"{KEY_PREFIX}:archive"
DEDUPE_PREFIX = f"{KEY_PREFIX}:dedupe:"
JOB_TIMEOUT_SECONDS = 600
RESULT_TTL_SECONDS = 3600
FAILURE_TTL_SECONDS = 90 * 86400  # dead letters stay inspectable for a quarter
MAX_BATCH = 200

# Per delivery, in this order: id, mode, data, description, meta, then the archive's type,
# received_at, client, signature, request_id and body. A whole batch travels as two script
# arguments, the concatenated values and their lengths, so packing the command for Redis
# costs the same for one delivery or a hundred.
_FIELDS = 11
_SCRIPT = """
-- KEYS: 1 the queue, 2 RQ's set of queues, 3 the archive stream
-- ARGV: 1 dedupe key prefix, 2 job key prefix, 3 dedupe seconds, 4 archive max length,
--       5 archive min id (ms), 6 now (RQ's time format), 7 the job hash template (JSON),
--       8 the batch's values concatenated, 9 their lengths (comma-separated), 11 per delivery.
local base = {}
for k, v in pairs(cjson.decode(ARGV[7])) do
  base[#base + 1] = k
  base[#base + 1] = v
end
local values, pos = {}, 1
for len in string.gmatch(ARGV[9], "%d+") do
  local n = tonumber(len)
  values[#values + 1] = string.sub(ARGV[8], pos, pos + n - 1)
  pos = pos + n
end
local out = {}
for o = 1, #values, 11 do
  local id, decision = values[o], values[o + 1]
  if decision == "enqueue" then
    if redis.call("SET", ARGV[1] .. id, "1", "NX", "EX", ARGV[3]) then
      local h = {unpack(base)}
      h[#h + 1] = "data";        h[#h + 1] = values[o + 2]
      h[#h + 1] = "description"; h[#h + 1] = values[o + 3]
      h[#h + 1] = "meta";        h[#h + 1] = values[o + 4]
      h[#h + 1] = "created_at";  h[#h + 1] = ARGV[6]
      h[#h + 1] = "enqueued_at"; h[#h + 1] = ARGV[6]
      redis.call("HSET", ARGV[2] .. id, unpack(h))
      redis.call("RPUSH", KEYS[1], id)
      decision = "queued"
    else
      decision = "duplicate"
    end
  end
  redis.call("XADD", KEYS[3], "MAXLEN", "~", ARGV[4], "*", "decision", decision, "id", id,
    "type", values[o + 5], "received_at", values[o + 6], "client", values[o + 7],
    "signature", values[o + 8], "request_id", values[o + 9], "body", values[o + 10])
  out[#out + 1] = decision
end
redis.call("SADD", KEYS[2], KEYS[1])
redis.call("XTRIM", KEYS[3], "MINID", "~", ARGV[5])
return out
"""

# The job hash fields that differ from one event to the next; everything else is the template.
VARYING = ("data", "description", "meta", "created_at", "enqueued_at")


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
        description=description(event, job_id),
        status=JobStatus.QUEUED,
        retry=Retry(max=len(intervals), interval=intervals) if intervals else None,
        meta={"received_at": received_at_ms or int(time.time() * 1000), "replayed": replayed},
    )


def description(event: Mapping[str, Any], job_id: str) -> str:
    return f"{event.get('type')} {job_id[:12]}"


def _redis_text(value: Any) -> str:
    """What redis-py would write for the value (a str enum such as JobStatus writes its value)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value.encode().decode()
    return str(value)


class JobTemplate:
    """RQ's job hash for our events: the constant part computed once by RQ, the rest per event."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        probe = build_job(connection, settings, "template", "workers.jobs.item_created", {}, received_at_ms=1)
        probe.enqueued_at = rq_now()
        constant = {k: v for k, v in probe.to_dict().items() if k not in VARYING and v is not None}
        self.constant = {k: _redis_text(v) for k, v in constant.items()}
        self.json = json.dumps(self.constant)

    @staticmethod
    def varying(
        job_id: str, function: str, event: Mapping[str, Any], received_at_ms: int, body: bytes | None = None
    ) -> tuple[bytes, bytes, bytes]:
        """``data``, ``description`` and ``meta`` as ``Job.to_dict()`` writes them.

        RQ's JSONSerializer writes ``json.dumps((function, None, [event], {}))``; when the raw
        body *is* that event (its type needed no normalising), it is spliced in as it came,
        which decodes to the same arguments without encoding the event again.
        """
        if body is not None:
            payload = b'["' + function.encode() + b'", null, [' + body + b"], {}]"
        else:
            payload = json.dumps((function, None, [dict(event)], {})).encode()
        # RQ stores the payload as a zlib stream. For a few hundred bytes, a stored (level 0)
        # stream with a small state costs under a microsecond, zlib.compress's defaults some
        # fifty; zlib.decompress reads both alike.
        packer = zlib.compressobj(0, zlib.DEFLATED, 9, 1)
        data = packer.compress(payload) + packer.flush()
        meta = b'{"received_at": %d, "replayed": false}' % received_at_ms
        return data, description(event, job_id).encode(), meta


class QueueUnavailable(Exception):
    """Redis could not be reached or did not confirm the write."""


def dedupe_key(event_id: str) -> str:
    return DEDUPE_PREFIX + event_id


class EventQueue:
    """The receiver's one door into Redis. Open it in the app's lifespan, close it after."""

    def __init__(self, settings: Settings) -> None:
        if settings.redis_url is None:
            raise ValueError("REDIS_URL is not set")
        self._settings = settings
        self._url = settings.redis_url
        self.queue_key = Queue.redis_queue_namespace_prefix + settings.queue_name
        self._keys = [self.queue_key, Queue.redis_queues_keys, ARCHIVE_KEY]
        self._redis: aioredis.Redis | None = None
        # RQ builds the template from a Job bound to a (never used) synchronous connection.
        rq_connection = redis.Redis.from_url(self._url)
        self.template = JobTemplate(rq_connection, settings)
        rq_connection.close()
        self._pending: list[tuple[list[bytes], asyncio.Future[str]]] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"EventQueue(queue={self._settings.queue_name!r}, redis={self._settings.redis_url_for_logs!r})"

    async def open(self) -> None:
        self._redis = aioredis.Redis.from_url(
            self._url,
            socket_connect_timeout=2,
            socket_timeout=2,
            health_check_interval=15,
            retry_on_timeout=False,
            max_connections=64,
        )
        self._script = self._redis.register_script(_SCRIPT)

    async def close(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("EventQueue.open() was not awaited")
        return self._redis

    def submit(
        self,
        event_id: str,
        function: str | None,
        event: Mapping[str, Any],
        archive: Mapping[str, str | bytes],
        *,
        verbatim: bool = False,
    ) -> asyncio.Future[str]:
        """Archive a delivery and, when ``function`` is given, enqueue it unless it is a duplicate.

        ``archive`` holds the delivery's ``type``, ``received_at`` (ms), ``client``,
        ``signature``, ``request_id`` and raw ``body``; ``verbatim`` says the body is the
        event as the job receives it (nothing was normalised). Returns a future to await: its
        result is the outcome (queued, duplicate, ignored), or QueueUnavailable.
        """
        if function:
            body = archive["body"] if verbatim else None
            data, desc, meta = self.template.varying(
                event_id,
                function,
                event,
                int(archive["received_at"]),
                body,  # type: ignore[arg-type]
            )
            values: list[bytes] = [event_id.encode(), b"enqueue", data, desc, meta]
        else:
            values = [event_id.encode(), b"ignored", b"", b"", b""]
        for key in ("type", "received_at", "client", "signature", "request_id", "body"):
            value = archive[key]
            values.append(value if isinstance(value, bytes) else value.encode())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._pending.append((values, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        elif len(self._pending) >= MAX_BATCH:
            self._flush()
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[tuple[list[bytes], asyncio.Future[str]]]) -> None:
        s = self._settings
        args: list[Any] = [
            DEDUPE_PREFIX,
            Job.redis_job_namespace_prefix,
            s.dedupe_seconds,
            s.archive_max_events,
            int(time.time() * 1000) - s.archive_max_age_seconds * 1000,
            utcformat(rq_now()),
            self.template.json,
        ]
        BATCH_SIZE.observe(len(batch))
        values = [v for item, _ in batch for v in item]
        args += [b"".join(values), ",".join([str(len(v)) for v in values])]
        try:
            replies = await self._script(keys=self._keys, args=args)
            decisions = [r.decode() if isinstance(r, bytes) else str(r) for r in replies]
            if len(decisions) != len(batch):
                raise QueueUnavailable(f"Redis confirmed {len(decisions)} of {len(batch)} deliveries")
        except (RedisError, OSError, QueueUnavailable) as exc:
            error = exc if isinstance(exc, QueueUnavailable) else QueueUnavailable(type(exc).__name__)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), decision in zip(batch, decisions, strict=True):
            if not future.done():
                future.set_result(decision)

    async def check_durability(self) -> None:
        """Warn when Redis could lose what we acknowledge: AOF off, or keys evicted under memory pressure."""
        try:
            config = await self.redis.config_get("appendonly")
            config.update(await self.redis.config_get("maxmemory-policy"))
        except (RedisError, OSError) as exc:  # unreachable now, or CONFIG disabled (managed Redis)
            log.info("redis.durability_unknown", error=type(exc).__name__)
            return
        appendonly, policy = config.get("appendonly"), config.get("maxmemory-policy")
        if appendonly not in ("yes", b"yes") or policy not in ("noeviction", b"noeviction"):
            log.warning(
                "redis.not_durable",
                appendonly=str(appendonly),
                maxmemory_policy=str(policy),
                hint="acknowledged events need appendonly yes and maxmemory-policy noeviction",
            )

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
