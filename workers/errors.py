"""What a provider's client raises (Bridge's, workers.bridge; Powens's, workers.powens), each with one home::

    ProviderError (BridgeError, the name Bridge's code has always caught: the same class)
    ├── TransientError   retry later: 5xx, timeouts, connection errors (``retry_after`` says
    │   │                when, if anyone knows)
    │   └── BudgetExhausted  a request budget is spent: ours (workers.ratelimit) or the provider's (a
    │                    ``429`` still refused after the client's own waits); ``retry_after`` says when
    │                    it frees. The job runs again then, and spends none of its retries.
    ├── AuthError        credentials refused: 401/403, or a bad client id/secret
    ├── NotFound         404: the item, account or user is gone at the provider
    └── PermanentError   any other 4xx: the request is wrong and retrying will not help

The jobs and the API catch these, whichever provider raised them; each client documents which of
its answers becomes which.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any


class ProviderError(Exception):
    provider = "Bridge"  # whose answer it was, where a caller of both clients says so (api/users.py)

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


BridgeError = ProviderError


class TransientError(ProviderError):
    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class BudgetExhausted(TransientError):
    pass


class AuthError(ProviderError):
    pass


class NotFound(ProviderError):
    pass


class PermanentError(ProviderError):
    pass


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds from now (delay-seconds or an HTTP date), None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() alone admits '²', which float() refuses
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
