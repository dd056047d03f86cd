"""Bridge's v3 aggregation API: one client class around one ``httpx.Client``.

The exceptions a caller may catch, each with one home::

    BridgeError
    ├── TransientError   retry later: 5xx, 429, timeouts, connection errors, our own budget
    │                    (``retry_after`` says when, if anyone knows)
    ├── AuthError        credentials refused: 401/403 after one token renewal, or a bad client id/secret
    ├── NotFound         404: the item, account or user is gone at Bridge
    └── PermanentError   any other 4xx: the request is wrong and retrying will not help

Inside one call the client already retries what is worth retrying: 5xx and network errors
with exponential backoff and full jitter, ``429`` after its ``Retry-After`` (when short),
a ``401`` once with a renewed token; ``max_attempts`` bounds it all. User tokens are cached
in Redis for every worker until shortly before ``expires_at``, refreshed by one worker at a
time per user. Request budgets per application, per user and for tokens are shared through
Redis (:mod:`workers.ratelimit`). JSON numbers are never floats: fractions parse as ``Decimal``,
whole numbers as ``int``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import redis
from redis.exceptions import LockError

from service.logs import get_logger
from service.settings import Settings
from workers.ratelimit import OverBudget, RateLimiter

log = get_logger("bridgehook.bridge")


class BridgeError(Exception):
    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class TransientError(BridgeError):
    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class AuthError(BridgeError):
    pass


class NotFound(BridgeError):
    pass


class PermanentError(BridgeError):
    pass


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
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


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class BridgeClient:
    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        *,
        transport: httpx.BaseTransport | None = None,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        max_retry_after: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not settings.bridge_client_id or settings.bridge_client_secret is None:
            raise ValueError("BRIDGE_CLIENT_ID and BRIDGE_CLIENT_SECRET are required")
        self._settings = settings
        self._redis = connection
        self._limiter = RateLimiter(connection, sleep=sleep)
        self._base = settings.bridge_api_url.rstrip("/")
        self._origin = httpx.URL(self._base)
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_retry_after = max_retry_after
        self._sleep = sleep
        self._jitter = jitter
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(settings.bridge_timeout_seconds, connect=5.0),
            limits=httpx.Limits(max_connections=10, max_keepalive_connections=10),
            headers={
                "Client-Id": settings.bridge_client_id,
                "Client-Secret": settings.bridge_client_secret.reveal(),
                "Bridge-Version": settings.bridge_version,
                "Accept-Language": settings.bridge_accept_language,
                "Accept": "application/json",
                "User-Agent": "bridgehook",
            },
        )

    def __repr__(self) -> str:
        return f"BridgeClient({self._base!r})"

    def close(self) -> None:
        self._http.close()

    # -- the API -------------------------------------------------------------------------------

    def get_item(self, user_uuid: str, item_id: int) -> dict[str, Any]:
        return dict(self._request("GET", f"/items/{int(item_id)}", user_uuid=user_uuid))

    def get_account(self, user_uuid: str, account_id: int) -> dict[str, Any]:
        return dict(self._request("GET", f"/accounts/{int(account_id)}", user_uuid=user_uuid))

    def item_pages(self, user_uuid: str) -> Iterator[list[dict[str, Any]]]:
        return self._pages("/items", {"limit": 500}, user_uuid)

    def account_pages(self, user_uuid: str, item_id: int) -> Iterator[list[dict[str, Any]]]:
        return self._pages("/accounts", {"item_id": int(item_id), "limit": 500}, user_uuid)

    def transaction_pages(
        self, user_uuid: str, account_id: int, since: datetime | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        params: dict[str, Any] = {"account_id": int(account_id), "limit": 500}
        if since is not None:
            params["since"] = _iso(since)
        return self._pages("/transactions", params, user_uuid)

    def user(self, user_uuid: str) -> dict[str, Any]:
        """The user as the last token response described it (uuid, external_user_id)."""
        self._token(user_uuid)
        raw = _text(self._redis.get(f"bridgehook:token-user:{user_uuid}"))
        return dict(json.loads(raw)) if raw else {"uuid": user_uuid}

    # -- plumbing ------------------------------------------------------------------------------

    def _pages(self, path: str, params: dict[str, Any], user_uuid: str) -> Iterator[list[dict[str, Any]]]:
        url: str | None = path
        query: dict[str, Any] | None = params
        while url is not None:
            data = self._request("GET", url, user_uuid=user_uuid, params=query)
            yield list(data.get("resources") or [])
            next_uri = (data.get("pagination") or {}).get("next_uri")
            url, query = (self._resolve(next_uri), None) if next_uri else (None, None)

    def _resolve(self, next_uri: str) -> str:
        """``next_uri`` is a path from the host root (or a URL); it must stay on Bridge's host."""
        target = self._origin.join(next_uri)
        if (target.scheme, target.host, target.port) != (
            self._origin.scheme,
            self._origin.host,
            self._origin.port,
        ):
            raise PermanentError(f"next_uri points to another host: {target.host}")
        return str(target)

    def _url(self, path_or_url: str) -> str:
        return path_or_url if "://" in path_or_url else self._base + path_or_url

    def _budget(self, user_uuid: str | None) -> None:
        s = self._settings
        budgets = [("app", s.rate_app)]
        if user_uuid is not None:
            budgets.append((f"user:{user_uuid}", s.rate_user))
        try:
            self._limiter.acquire_all(budgets)
        except OverBudget as exc:
            raise TransientError(str(exc), retry_after=exc.wait) from exc

    def _backoff(self, attempt: int) -> None:
        ceiling = min(self._backoff_cap, self._backoff_base * 2 ** (attempt - 1))
        self._sleep(ceiling * self._jitter())

    def _request(
        self, method: str, path: str, *, user_uuid: str | None = None, params: Any = None, body: Any = None
    ) -> Any:
        renewed = False
        attempt = 0
        while True:
            attempt += 1
            self._budget(user_uuid)
            headers = {}
            token = None
            if user_uuid is not None:
                token = self._token(user_uuid)
                headers["Authorization"] = f"Bearer {token}"
            try:
                response = self._http.request(
                    method, self._url(path), params=params, json=body, headers=headers
                )
            except httpx.TransportError as exc:
                if attempt >= self._max_attempts:
                    raise TransientError(f"{type(exc).__name__} on {method} {path.split('?')[0]}") from exc
                self._backoff(attempt)
                continue
            status = response.status_code
            if status < 400:
                return json.loads(response.content or b"{}", parse_float=Decimal)
            if status == 401 and token is not None and not renewed:
                renewed = True
                self._token(user_uuid or "", stale=token)
                continue
            if status == 429:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if attempt < self._max_attempts and (retry_after or 0) <= self._max_retry_after:
                    if retry_after:
                        self._sleep(retry_after)
                    else:
                        self._backoff(attempt)
                    continue
                raise TransientError("429 from Bridge", retry_after=retry_after, status=429)
            if status >= 500:
                if attempt < self._max_attempts:
                    self._backoff(attempt)
                    continue
                raise TransientError(f"{status} from Bridge on {method} {path.split('?')[0]}", status=status)
            raise self._error(response, method, path)

    def _error(self, response: httpx.Response, method: str, path: str) -> BridgeError:
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if isinstance(payload, dict) and isinstance(payload.get("errors"), list) and payload["errors"]:
            payload = payload["errors"][0]
        payload = payload if isinstance(payload, dict) else {}
        code, message = payload.get("code"), payload.get("message")
        where = f"{method} {path.split('?')[0]}"
        log.warning("bridge.error", status=response.status_code, code=code, message=message, request=where)
        text = f"{response.status_code} {code or ''} on {where}: {message or response.reason_phrase}"
        cls = {401: AuthError, 403: AuthError, 404: NotFound}.get(response.status_code, PermanentError)
        return cls(text, status=response.status_code, code=code)

    def _token(self, user_uuid: str, *, stale: str | None = None) -> str:
        """A valid access token for the user: the shared cached one, or a fresh one."""
        key = f"bridgehook:token:{user_uuid}"
        cached = _text(self._redis.get(key))
        if cached is not None and cached != stale:
            return cached
        try:
            with self._redis.lock(f"{key}:lock", timeout=30, blocking_timeout=30):
                cached = _text(self._redis.get(key))  # another worker may have refreshed it meanwhile
                if cached is not None and cached != stale:
                    return cached
                return self._new_token(user_uuid, key)
        except LockError as exc:
            raise TransientError(f"token refresh for a user is stuck: {exc}") from exc

    def _new_token(self, user_uuid: str, key: str) -> str:
        try:
            self._limiter.acquire(f"token:{user_uuid}", self._settings.rate_token)
        except OverBudget as exc:
            raise TransientError(str(exc), retry_after=exc.wait) from exc
        data = self._request("POST", "/authorization/token", body={"user_uuid": user_uuid})
        token = str(data["access_token"])
        expires_at = datetime.fromisoformat(str(data["expires_at"]))
        lifetime = expires_at.timestamp() - time.time()
        # Renew shortly before expiry: five minutes early, or half the lifetime if that is shorter.
        ttl = int(lifetime - min(300.0, lifetime / 2))
        pipe = self._redis.pipeline()
        if ttl > 0:
            pipe.set(key, token, ex=ttl)
        else:
            pipe.delete(key)
        pipe.set(f"bridgehook:token-user:{user_uuid}", json.dumps(data.get("user") or {"uuid": user_uuid}))
        pipe.execute()
        log.info("bridge.token_issued", user_uuid=user_uuid, ttl=ttl)
        return token
