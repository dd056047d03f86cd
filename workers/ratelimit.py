"""Request budgets shared by every worker: sliding windows kept in Redis.

Bridge documents about 2000 requests per 5 minutes per application, 60 per minute per user
and 10 token requests per minute per user. Each budget is a sorted set of the times of the
requests it admitted over its last period: at most ``requests`` of them in any period, so no
burst at a window's edge (a fixed window admits twice its budget around its end). One Lua
script takes a request from every budget a call needs, or from none: a refused request
counts against no budget. A caller over budget waits when the wait is short, and otherwise
gets :class:`OverBudget`, whose ``wait`` says when a request would be admitted, so that the
job runs again then (see workers.jobs) instead of holding a worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import redis

from service.settings import Rate

# KEYS: one sorted set per budget. ARGV: now (seconds; negative: Redis's own clock, the one clock every
# worker shares), a member unique to this request, then each budget's requests and period. Returns {0}
# when every budget admitted the request (and counts it), else {n, wait}: the n-th budget (1-based) is
# the one that frees last, in ``wait`` seconds (text: Lua numbers become integers on their way back).
_TAKE = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local worst, wait = 0, 0
for i, key in ipairs(KEYS) do
  local limit, period = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
  local used = redis.call('ZCARD', key)
  if used >= limit then
    local oldest = redis.call('ZRANGE', key, used - limit, used - limit, 'WITHSCORES')
    local free = tonumber(oldest[2]) + period - now
    if free > wait or worst == 0 then worst, wait = i, free end
  end
end
if worst > 0 then return {worst, tostring(wait)} end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2 + 2 * i]) * 1000) + 1000)
end
return {0}
"""


class OverBudget(Exception):
    def __init__(self, key: str, wait: float) -> None:
        super().__init__(f"request budget {key} exhausted for {wait:.0f}s")
        self.key = key
        self.wait = wait


class RateLimiter:
    def __init__(
        self,
        connection: redis.Redis,
        *,
        max_wait: float = 10.0,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``clock``: the time the windows are counted in; by default Redis's own, so that workers
        whose clocks disagree still share one budget."""
        self._redis = connection
        self._take = connection.register_script(_TAKE)
        self._max_wait = max_wait
        self._clock = clock
        self._sleep = sleep

    def acquire(self, key: str, rate: Rate) -> None:
        """Take one request from ``key``'s budget, waiting up to ``max_wait`` for it to free."""
        self.acquire_all([(key, rate)])

    def acquire_all(self, budgets: list[tuple[str, Rate]]) -> None:
        """Take one request from every budget or from none, in one round trip to Redis; wait (up to
        ``max_wait``) for the budget that frees last, then try again."""
        keys = [f"bridgehook:rate:{key}" for key, _ in budgets]
        while True:
            args: list[float | str] = [self._clock() if self._clock else -1, os.urandom(8).hex()]
            for _, rate in budgets:
                args += [rate.requests, rate.seconds]
            reply = self._take(keys=keys, args=args)
            if int(reply[0]) == 0:
                return
            wait, key = float(reply[1]), budgets[int(reply[0]) - 1][0]
            if wait > self._max_wait:
                raise OverBudget(key, wait)
            self._sleep(wait + 0.01)
