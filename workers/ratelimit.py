"""Request budgets shared by every worker: fixed windows counted in Redis.

Bridge documents about 2000 requests per 5 minutes per application, 60 per minute per user
and 10 token requests per minute per user. Each budget is a counter per window
(``INCR`` + ``EXPIRE NX`` in one pipeline); a caller over budget waits for the next window
when that is short, and otherwise gets :class:`OverBudget` to retry the job later.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from service.settings import Rate


class OverBudget(Exception):
    def __init__(self, key: str, wait: float) -> None:
        super().__init__(f"request budget {key} exhausted for {wait:.0f}s")
        self.wait = wait


class RateLimiter:
    def __init__(
        self,
        connection: redis.Redis,
        *,
        max_wait: float = 10.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._redis = connection
        self._max_wait = max_wait
        self._clock = clock
        self._sleep = sleep

    def acquire(self, key: str, rate: Rate) -> None:
        """Take one request from ``key``'s budget, waiting up to ``max_wait`` for a new window."""
        self.acquire_all([(key, rate)])

    def acquire_all(self, budgets: list[tuple[str, Rate]]) -> None:
        """Take one request from each budget, in one round trip to Redis."""
        while True:
            now = self._clock()
            pipe = self._redis.pipeline(transaction=False)
            windows = []
            for key, rate in budgets:
                window = int(now // rate.seconds)
                counter = f"bridgehook:rate:{key}:{window}"
                pipe.incr(counter)
                pipe.expire(counter, rate.seconds + 1, nx=True)
                windows.append(window)
            replies = pipe.execute()
            waits = [
                ((window + 1) * rate.seconds - now, key)
                for (key, rate), window, used in zip(budgets, windows, replies[::2], strict=True)
                if int(used) > rate.requests
            ]
            if not waits:
                return
            wait, key = max(waits)
            if wait > self._max_wait:
                raise OverBudget(key, wait)
            self._sleep(wait + 0.01)
