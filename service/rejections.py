"""Rejected deliveries by reason and minute, in Redis, for `bridgehook status` ("are we missing data?").

Prometheus has every rejection (``bridgehook_webhook_requests_total``), but it lives in the
receivers' scrapes; ``bridgehook status`` reads Redis. Counting each rejection in Redis as it
happens would turn a flood of forbidden or forged requests into a flood of Redis calls, on the
same connections the deliveries need. So each receiver counts in memory (a dictionary
increment, no I/O) and a background task flushes the counts every :data:`FLUSH_SECONDS`: one
pipelined round trip of an ``HINCRBY`` per (minute, reason) seen and an ``EXPIRE`` per minute,
however many requests were rejected. The hashes, ``bridgehook:rejections:<minute>`` (minutes
since the epoch) with one field per reason, outlive the hour `status` sums by a few minutes;
receivers add into the same hashes.

The counts are best-effort: a receiver that dies loses what it counted since its last flush (at
most a few seconds), and a flush whose reply is lost after Redis applied it counts twice. A flush
that fails (Redis down) never touches a request: it logs, and its counts wait for the next flush
(those older than the hour are dropped, so memory stays bounded however long Redis is away).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.logs import get_logger

log = get_logger("bridgehook.rejections")

PREFIX = "bridgehook:rejections:"
FLUSH_SECONDS = 5.0
WINDOW_MINUTES = 60  # what `bridgehook status` sums
TTL_SECONDS = (WINDOW_MINUTES + 5) * 60

Counts = dict[tuple[int, str], int]  # (minute, reason) -> rejections


def key(minute: int) -> str:
    return f"{PREFIX}{minute}"


class Rejections:
    """One receiver's counts since its last flush. :meth:`count` is all a rejected request pays."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counts: Counts = {}
        self._task: asyncio.Task[None] | None = None

    def count(self, reason: str) -> None:
        at = (int(self._clock()) // 60, reason)
        self._counts[at] = self._counts.get(at, 0) + 1

    async def flush(self, connection: aioredis.Redis) -> bool:
        """Add the counts to Redis in one round trip; False (counts kept for the next) when it fails."""
        counts, self._counts = self._counts, {}
        oldest = int(self._clock()) // 60 - WINDOW_MINUTES
        counts = {at: n for at, n in counts.items() if at[0] > oldest}
        if not counts:
            return True
        pipe = connection.pipeline(transaction=False)
        for (minute, reason), n in counts.items():
            pipe.hincrby(key(minute), reason, n)
        for minute in {minute for minute, _ in counts}:
            pipe.expire(key(minute), TTL_SECONDS)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            self._keep(counts)
            log.warning("rejections.flush_failed", error=type(exc).__name__, pending=sum(counts.values()))
            return False
        except asyncio.CancelledError:  # stopped mid-flush: stop() flushes them
            self._keep(counts)
            raise
        return True

    def _keep(self, counts: Counts) -> None:
        """Counts a flush could not write, added to those counted since."""
        for at, n in counts.items():
            self._counts[at] = self._counts.get(at, 0) + n

    def start(self, connection: aioredis.Redis, every: float = FLUSH_SECONDS) -> None:
        """Flush every ``every`` seconds, in a task of the running loop (the app's lifespan)."""

        async def run() -> None:
            while True:
                await asyncio.sleep(every)
                await self.flush(connection)

        self._task = asyncio.get_running_loop().create_task(run())

    async def stop(self, connection: aioredis.Redis) -> None:
        """Stop flushing, then flush what is left (a receiver shutting down loses nothing)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush(connection)


def last_hour(connection: redis.Redis, now: float | None = None) -> dict[str, int]:
    """Rejections by reason over the last :data:`WINDOW_MINUTES` minutes (this one included), as flushed."""
    minute = int(time.time() if now is None else now) // 60
    pipe = connection.pipeline(transaction=False)
    for m in range(minute - WINDOW_MINUTES + 1, minute + 1):
        pipe.hgetall(key(m))
    totals: dict[str, int] = {}
    for fields in pipe.execute():
        for reason, n in fields.items():
            name = reason.decode() if isinstance(reason, bytes) else str(reason)
            totals[name] = totals.get(name, 0) + int(n)
    return totals
