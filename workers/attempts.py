"""One request's attempts: what a provider's client (Bridge's, Powens's) tries again, and how long it waits.

5xx answers and network errors are tried again after an exponential backoff with full jitter (a draw
in ``[0, min(cap, base * 2^(attempt-1))]``: clients that failed together do not come back together); a
``429`` after its ``Retry-After`` when that is short (``max_retry_after``: a longer wait is the
scheduler's, not a worker's, see workers.jobs), else after a backoff. ``max_attempts`` bounds it all;
past it the failure is :mod:`workers.errors`'s ``TransientError``, or ``BudgetExhausted`` for a 429,
whose ``retry_after`` says when to come back. What else an answer means is each client's to say.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypedDict, Unpack

import httpx
import redis

from service.settings import Rate
from workers.errors import BudgetExhausted, PermanentError, TransientError, parse_retry_after
from workers.ratelimit import OverBudget, RateLimiter


def read_json(content: bytes) -> Any:
    """A body's JSON with numbers never floats: fractions as ``Decimal``, whole numbers as ``int``."""
    return json.loads(content or b"{}", parse_float=Decimal)


def spend(limiter: RateLimiter, budgets: list[tuple[str, Rate]]) -> None:
    """Take a request from every budget or from none; BudgetExhausted when one will not free soon."""
    try:
        limiter.acquire_all(budgets)
    except OverBudget as exc:
        raise BudgetExhausted(str(exc), retry_after=exc.wait) from exc


def on_origin(origin: httpx.URL, link: str, what: str) -> str:
    """``link`` (a path from the host root, or a URL), resolved against ``origin``, whose host it must
    keep: a page's link never sends a user's token elsewhere."""
    target = origin.join(link)
    if (target.scheme, target.host, target.port) != (origin.scheme, origin.host, origin.port):
        raise PermanentError(f"{what} points to another host: {target.host}")
    return str(target)


class Tuning(TypedDict, total=False):
    """How a client tries (the keyword arguments of BridgeClient's and PowensClient's constructors):
    ``max_attempts`` (4), ``backoff_base`` (0.5 s), ``backoff_cap`` (8 s), ``max_retry_after`` (10 s:
    the longest wait in a call, for a 429 or a request budget), and the seams ``sleep`` and ``jitter``."""

    max_attempts: int
    backoff_base: float
    backoff_cap: float
    max_retry_after: float
    sleep: Callable[[float], None]
    jitter: Callable[[], float]


class Attempts:
    def __init__(self, provider: str, budget_wait: float, **tuning: Unpack[Tuning]) -> None:
        """``budget_wait``: when a 429 that says nothing frees, as far as we know (the provider's
        budgets' period)."""
        self.provider = provider
        self.budget_wait = budget_wait
        self.max_attempts = tuning.get("max_attempts", 4)
        self.backoff_base = tuning.get("backoff_base", 0.5)
        self.backoff_cap = tuning.get("backoff_cap", 8.0)
        self.max_retry_after = tuning.get("max_retry_after", 10.0)
        self.sleep = tuning.get("sleep", time.sleep)
        self.jitter = tuning.get("jitter", random.random)

    def limiter(self, connection: redis.Redis) -> RateLimiter:
        """The request budgets' limiter, waiting as long as a 429 may be waited for, with our sleep."""
        return RateLimiter(connection, max_wait=self.max_retry_after, sleep=self.sleep)

    def backoff(self, attempt: int) -> None:
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
        self.sleep(ceiling * self.jitter())

    def unsent(self, attempt: int, exc: httpx.TransportError, where: str) -> None:
        """The request met a network error: back off for the next attempt, or raise if it was the last."""
        if attempt >= self.max_attempts:
            raise TransientError(f"{type(exc).__name__} on {where}") from exc
        self.backoff(attempt)

    def again(self, attempt: int, response: httpx.Response, where: str) -> bool:
        """Whether to send the request again (after the wait, taken here) for this answer: a 429 or a
        5xx; raise if that was the last attempt. False for any other answer: the caller's to read."""
        status = response.status_code
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if attempt < self.max_attempts and (retry_after or 0) <= self.max_retry_after:
                if retry_after:
                    self.sleep(retry_after)
                else:
                    self.backoff(attempt)
                return True
            wait = self.budget_wait if retry_after is None else retry_after
            raise BudgetExhausted(f"429 from {self.provider} on {where}", retry_after=wait, status=429)
        if status >= 500:
            if attempt < self.max_attempts:
                self.backoff(attempt)
                return True
            raise TransientError(f"{status} from {self.provider} on {where}", status=status)
        return False
