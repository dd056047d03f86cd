"""De-duplicate, enqueue and archive deliveries atomically, many per round trip to Redis.

Bridge has no event id, so an event's id is the SHA-256 of its raw body. One Lua script,
run atomically by Redis, does everything a delivery needs:

1. ``SET dedupe:<id> NX EX <window>``: the first delivery of a body wins the key;
2. only then, write the RQ job hash and push the id on the queue (what RQ's own
   unique-enqueue script does), and register the queue;
3. append the delivery to the archive stream, trimmed by length and by age (once per call).

There is no check-then-act window between two calls, a duplicate never becomes a second
job, and when the script's reply arrives the events are in Redis: only then does the
receiver answer 2xx. Any Redis error becomes :class:`QueueUnavailable` (answered 503, so
that Bridge retries; a retried event that had in fact been stored is then a duplicate).

Deliveries share script calls (micro-batching, one call in flight at a time; see
:class:`EventQueue`): under load, one round trip and one command to pack serve dozens of
requests. A batch holds at most ``MAX_BATCH_BYTES``; a larger delivery (a Powens body of up to
8 MiB) goes in a call of its own, on a connection whose timeout allows for its size, and its large
values are handed to redis-py as they are, never joined to the rest: several such bodies in one
call once took longer than the 2-second timeout (503s), and each join held the body once more.

The job hash is RQ's own ``Job.to_dict()``, computed once as a template (service/job.py); per
event only the fields that vary (payload, times, description, meta) are built, the way RQ builds
them (a test holds the two equal for the installed RQ). In Redis, the script writes the
template once per call to a scratch key and ``COPY``s it to each new job (Redis 6.2, as
``XTRIM MINID`` already needs), then sets the varying fields: the constant fields are
neither handed to the script, nor parsed, nor written to the AOF again for every job. With
the lengths below and one push per call, this cut Redis's work per delivery by a quarter.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from rq.job import Job
from rq.queue import Queue
from rq.registry import FailedJobRegistry
from rq.utils import now as rq_now
from rq.utils import utcformat

from service.job import JobTemplate, Piece, Value
from service.logs import get_logger
from service.metrics import BATCH_SIZE, ENQUEUE_SECONDS
from service.settings import Settings

Outcome = Literal["queued", "duplicate", "ignored"]
log = get_logger("bridgehook.queue")

KEY_PREFIX = "bridgehook"
ARCHIVE_KEY = f"{KEY_PREFIX}:archive"
TEMPLATE_KEY = f"{KEY_PREFIX}:job-template"  # exists only while the script runs
DEDUPE_PREFIX = f"{KEY_PREFIX}:dedupe:"
# One counter for every event enqueued from a webhook, taken in the enqueueing script: an event
# whose number a worker has read before it starts syncing the item was received before that sync
# (see workers.watermark). Only Redis's own order is compared, never two machines' clocks.
RECEIVED_SEQ_KEY = f"{KEY_PREFIX}:received-seq"
# Changes whenever that counter starts again from 1 (first use, or the counter was lost): a number
# from before then means nothing against one from after.
RECEIVED_EPOCH_KEY = f"{KEY_PREFIX}:received-epoch"
MAX_BATCH = 200
MAX_BATCH_BYTES = 1 << 20  # a delivery larger than this is sent alone, on the bulk connection
_ALONE = 1 << 12  # in a call of its own, a piece larger than this is a segment of its own, never copied
# The bulk connection's timeout: the usual 2 s, plus this per MiB of the largest call the limits allow.
_BULK_SECONDS_PER_MIB = 0.25

# Per delivery, in this order: id, mode, data, description, meta, then the archive's type,
# received_at, client, signature, request_id and body. A whole batch travels as the values'
# lengths (little-endian 32-bit integers) and the values concatenated, so packing the command for
# Redis costs the same for one delivery or a hundred, and the script cuts the values without
# parsing a number. In a call of its own, the concatenation is cut into segments instead, so that
# the large pieces (the body, and the job's payload framed around views of it) are never copied:
# the script reads a value across as many segments as it spans.
_FIELDS = 11
_SCRIPT = """
-- KEYS: 1 the queue, 2 RQ's set of queues, 3 the archive stream, 4 a scratch key for the template,
--       5 the counter of received events, 6 its epoch
-- ARGV: 1 dedupe key prefix, 2 job key prefix, 3 dedupe seconds, 4 archive max length,
--       5 archive min id (ms), 6 now (RQ's time format), 7 the job hash template (JSON),
--       8 the values' lengths, 11 per delivery, 9… the values concatenated, in one or more
--       segments (cut anywhere).
-- The job template: RQ's constant fields, and this call's time as every job's creation time.
local template = {"created_at", ARGV[6], "enqueued_at", ARGV[6]}
for k, v in pairs(cjson.decode(ARGV[7])) do
  template[#template + 1] = k
  template[#template + 1] = v
end
redis.call("DEL", KEYS[4])  -- whatever an interrupted call may have left
redis.call("HSET", KEYS[4], unpack(template))
local lengths, values, seg, pos = ARGV[8], {}, 9, 1
for at = 1, #lengths, 4 do
  local n = struct.unpack("<I4", lengths, at)
  if pos + n - 1 <= #ARGV[seg] then  -- within the segment: every value of a batch
    values[#values + 1] = string.sub(ARGV[seg], pos, pos + n - 1)
    pos = pos + n
  else  -- over segments: a large delivery's pieces
    local parts = {}
    while n > 0 do
      if pos > #ARGV[seg] then seg, pos = seg + 1, 1 end
      local k = math.min(n, #ARGV[seg] - pos + 1)
      parts[#parts + 1] = string.sub(ARGV[seg], pos, pos + k - 1)
      pos, n = pos + k, n - k
    end
    values[#values + 1] = table.concat(parts)
  end
end
local out, queued = {}, {}
for o = 1, #values, 11 do
  local id, decision = values[o], values[o + 1]
  if decision == "enqueue" then
    if redis.call("SET", ARGV[1] .. id, "1", "NX", "EX", ARGV[3]) then
      -- The job hash: a fresh copy of the template (no stale field or TTL of an older job
      -- under the same id), then this event's own fields.
      -- meta.received_seq: this event's number in the order of receipt (the meta ends with "}").
      local job, seq = ARGV[2] .. id, redis.call("INCR", KEYS[5])
      if seq == 1 then  -- a count that starts (again): a new epoch
        local now = redis.call("TIME")
        redis.call("SET", KEYS[6], now[1] .. "." .. now[2])
      end
      local meta = string.sub(values[o + 4], 1, -2) .. ', "received_seq": ' .. seq .. "}"
      redis.call("COPY", KEYS[4], job, "REPLACE")
      redis.call("HSET", job, "data", values[o + 2], "description", values[o + 3], "meta", meta)
      queued[#queued + 1] = id
      decision = "queued"
    else
      decision = "duplicate"
    end
  end
  redis.call("XADD", KEYS[3], "*", "decision", decision, "id", id,
    "type", values[o + 5], "received_at", values[o + 6], "client", values[o + 7],
    "signature", values[o + 8], "request_id", values[o + 9], "body", values[o + 10])
  out[#out + 1] = decision
end
if #queued > 0 then  -- the batch's new jobs, in arrival order, in one push
  redis.call("RPUSH", KEYS[1], unpack(queued))
end
redis.call("DEL", KEYS[4])
redis.call("SADD", KEYS[2], KEYS[1])
redis.call("XTRIM", KEYS[3], "MAXLEN", "~", ARGV[4])
redis.call("XTRIM", KEYS[3], "MINID", "~", ARGV[5])
return out
"""


class QueueUnavailable(Exception):
    """Redis could not be reached or did not confirm the write."""


class _Pending(NamedTuple):
    values: list[Value]  # _FIELDS of them
    future: asyncio.Future[str]
    size: int  # the values' bytes
    framed: bool  # whether a value is in pieces (a large job payload)


def _size(value: Value) -> int:
    return sum(map(len, value)) if isinstance(value, tuple) else len(value)


def _pieces(values: list[Value]) -> Iterator[Piece]:
    for value in values:
        if isinstance(value, tuple):
            yield from value
        else:
            yield value


def _fail(batch: list[_Pending], error: QueueUnavailable) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


def _next_batch(pending: list[_Pending]) -> int:
    """How many of the first pending deliveries make the next call: up to MAX_BATCH of them within
    MAX_BATCH_BYTES, or one larger delivery alone."""
    count, size = 0, 0
    for item in pending[:MAX_BATCH]:
        if count and size + item.size > MAX_BATCH_BYTES:
            break
        count, size = count + 1, size + item.size
    return count


def _segments(pieces: Iterable[Piece]) -> list[bytes | memoryview]:
    """The pieces concatenated as the script reads them: runs of small ones joined, each large one a
    segment of its own as a memoryview, which redis-py sends as it is (its hiredis packer would copy
    every argument into one command)."""
    out: list[bytes | memoryview] = []
    run: list[Piece] = []
    for piece in pieces:
        if len(piece) > _ALONE:
            if run:
                out.append(b"".join(run))
                run = []
            out.append(piece if type(piece) is memoryview else memoryview(piece))
        elif piece:
            run.append(piece)
    if run:
        out.append(b"".join(run))
    return out


def dedupe_key(event_id: str) -> str:
    return DEDUPE_PREFIX + event_id


class ArchivedDelivery(NamedTuple):
    """A delivery as the archive stream keeps it, every field as the bytes Redis stores."""

    type: bytes
    received_at: bytes  # milliseconds since the epoch, in decimal
    client: bytes
    signature: bytes
    request_id: bytes
    body: bytes


class EventQueue:
    """The receiver's one door into Redis. Open it in the app's lifespan, close it after.

    One round trip at a time: while a batch's script call is in flight, the deliveries that
    arrive wait for the next one. Under load a batch then holds what arrived during a whole
    round trip, not a turn of the loop: fewer, larger script calls, each of which costs the
    receiver (redis-py's call) and Redis (the script's own set-up) about as much as a few
    deliveries. A lone delivery still leaves at the end of the turn it arrived in.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.redis_url is None:
            raise ValueError("REDIS_URL is not set")
        self._settings = settings
        self._url = settings.redis_url
        self.queue_key = Queue.redis_queue_namespace_prefix + settings.queue_name
        self.failed_key = FailedJobRegistry(name=settings.queue_name).key  # RQ's dead letters (no connection)
        self._keys = [self.queue_key, Queue.redis_queues_keys, ARCHIVE_KEY, TEMPLATE_KEY, RECEIVED_SEQ_KEY,
                      RECEIVED_EPOCH_KEY]  # fmt: skip
        self._redis: aioredis.Redis | None = None
        self._bulk: aioredis.Redis | None = None  # for a delivery over MAX_BATCH_BYTES
        self._script: AsyncScript | None = None
        # RQ builds the template from a Job bound to a (never used) synchronous connection.
        rq_connection = redis.Redis.from_url(self._url)
        self.template = JobTemplate(rq_connection, settings)
        rq_connection.close()
        self._pending: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"EventQueue(queue={self._settings.queue_name!r}, redis={self._settings.redis_url_for_logs!r})"

    @property
    def bulk_timeout(self) -> float:
        """Seconds the bulk connection gives a call: 2, plus a quarter per MiB of the largest delivery
        the body limits allow, counted twice (its job and its archive): 6 s for Powens's 8 MiB."""
        largest = 2 * max(self._settings.max_body_bytes, self._settings.powens_max_body_bytes)
        return 2 + _BULK_SECONDS_PER_MIB * largest / (1 << 20)

    async def open(self) -> None:
        options: dict[str, Any] = {"socket_connect_timeout": 2, "health_check_interval": 15,
                                   "retry_on_timeout": False}  # fmt: skip
        self._redis = aioredis.Redis.from_url(self._url, socket_timeout=2, max_connections=64, **options)
        self._bulk = aioredis.Redis.from_url(
            self._url, socket_timeout=self.bulk_timeout, max_connections=2, **options
        )
        # EVALSHA, and on NOSCRIPT (a restarted or failed-over Redis) SCRIPT LOAD and EVALSHA again.
        self._script = self._redis.register_script(_SCRIPT)

    async def close(self) -> None:
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = self._script = None
        if self._bulk is not None:
            await self._bulk.aclose()
            self._bulk = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("EventQueue.open() was not awaited")
        return self._redis

    @property
    def script(self) -> AsyncScript:
        if self._script is None:
            raise RuntimeError("EventQueue.open() was not awaited")
        return self._script

    def submit(
        self,
        event_id: str,
        function: str | None,
        event: Mapping[str, Any],
        archive: ArchivedDelivery,
        *,
        argument: Sequence[bytes] | None = None,
    ) -> asyncio.Future[str]:
        """Archive a delivery and, when ``function`` is given, enqueue it unless it is a duplicate.

        ``argument``: the job's one argument as JSON already, in pieces to be concatenated (Bridge's
        body when nothing was normalised, Powens's envelope around its body), spliced in as they
        are; otherwise ``event`` is encoded. Returns a future to await: its result is the outcome
        (queued, duplicate, ignored), or QueueUnavailable.
        """
        values: list[Value]
        if function:
            data, desc, meta = self.template.varying(event_id, function, event, archive.received_at, argument)
            values = [event_id.encode(), b"enqueue", data, desc, meta, *archive]
        else:
            values = [event_id.encode(), b"ignored", b"", b"", b"", *archive]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        framed = type(values[2]) is tuple
        self._pending.append(_Pending(values, future, sum(map(_size, values)), framed))
        if self._sender is None:  # starts at the end of this turn, with all that arrived in it
            self._sender = loop.create_task(self._send_pending())
        return future

    async def _send_pending(self) -> None:
        try:
            while self._pending:
                count = _next_batch(self._pending)
                batch, self._pending = self._pending[:count], self._pending[count:]
                try:
                    await self._send(batch)
                except BaseException as exc:  # cancelled at shutdown, or a bug: nobody waits forever
                    _fail(batch + self._pending, QueueUnavailable(type(exc).__name__))
                    self._pending = []
                    raise
        finally:
            self._sender = None

    async def _send(self, batch: list[_Pending]) -> None:
        s = self._settings
        values = [v for item in batch for v in item.values]
        bulk = sum(item.size for item in batch) > MAX_BATCH_BYTES
        framed = any(item.framed for item in batch)
        args: list[Any] = [
            DEDUPE_PREFIX,
            Job.redis_job_namespace_prefix,
            s.dedupe_seconds,
            s.archive_max_events,
            int(time.time() * 1000) - s.archive_max_age_seconds * 1000,
            utcformat(rq_now()),
            self.template.json,
            struct.pack(f"<{len(values)}I", *map(_size, values)),
            *self._concatenated(values, bulk, framed),
        ]
        del values
        BATCH_SIZE.observe(len(batch))
        started = time.perf_counter()
        try:
            client = self._bulk if bulk else None  # None: the script's own client
            replies = await self.script(keys=self._keys, args=args, client=client)
            decisions = [r.decode() if isinstance(r, bytes) else str(r) for r in replies]
            if len(decisions) != len(batch):
                raise QueueUnavailable(f"Redis confirmed {len(decisions)} of {len(batch)} deliveries")
        except (RedisError, OSError, QueueUnavailable) as exc:
            _fail(batch, exc if isinstance(exc, QueueUnavailable) else QueueUnavailable(type(exc).__name__))
            return
        ENQUEUE_SECONDS.observe(time.perf_counter() - started)
        for item, decision in zip(batch, decisions, strict=True):
            if not item.future.done():
                item.future.set_result(decision)

    @staticmethod
    def _concatenated(values: list[Value], bulk: bool, framed: bool) -> list[bytes | memoryview]:
        """The values concatenated: a batch, within MAX_BATCH_BYTES, in one segment (joined at once
        when no value is in pieces: the usual batch); a call of its own in segments."""
        if bulk:
            return _segments(_pieces(values))
        return [b"".join(_pieces(values) if framed else cast(list[Piece], values))]

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

    async def field(self, key: str, name: str) -> bytes | None:
        """One field of a hash (Powens's token digests: service/bearer.py); QueueUnavailable when Redis
        does not answer, so that the delivery gets its 503 as any other would."""
        try:
            value = await self.redis.hget(key, name)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(type(exc).__name__) from exc
        return cast(bytes | None, value)  # no decode_responses: bytes

    async def depth(self) -> int:
        return int(await self.redis.llen(self.queue_key))

    async def dead_letters(self) -> int:
        return int(await self.redis.zcard(self.failed_key))
