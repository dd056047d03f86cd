"""Bridge's v3 aggregation API: one client class around one ``httpx.Client``.

The exceptions a caller may catch are :mod:`workers.errors`'s: ``TransientError`` for 5xx, timeouts
and connection errors; ``BudgetExhausted`` for a spent budget, ours (workers.ratelimit) or Bridge's (a
``429`` still refused after the waits below); ``AuthError`` for 401/403 after one token renewal, or a
bad client id/secret; ``NotFound`` for a 404 (the item, account or user is gone at Bridge);
``PermanentError`` for any other 4xx.

Inside one call the client already retries what is worth retrying (:mod:`workers.attempts`): 5xx
and network errors with exponential backoff and full jitter, ``429`` after its ``Retry-After`` (when
short: a longer wait is the scheduler's, not a worker's), and a ``401`` once with a renewed token;
``max_attempts`` bounds it all. User tokens are cached
in Redis for every worker until shortly before ``expires_at``, refreshed by one worker at a
time per user. Request budgets per application, per user and for tokens are shared through
Redis (:mod:`workers.ratelimit`). JSON numbers are never floats: fractions parse as ``Decimal``,
whole numbers as ``int``.

Pages of transactions, most of what a sync reads, can also be decoded strictly into
:class:`Transaction` structs (``typed=True``): msgspec checks each field's type in C while it
parses, several times faster than ``json`` and a dict per transaction. A page that does not fit
the schema exactly (any value of another type, or JSON that only Python's ``json`` accepts) is
decoded the generic way instead, so a typed page holds exactly what the generic decode would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Unpack

import httpx
import msgspec
import redis
from redis.exceptions import LockError

from service.logs import get_logger
from service.settings import Settings
from workers.attempts import Attempts, Tuning, on_origin, read_json, spend
from workers.errors import AuthError, BridgeError, NotFound, PermanentError, TransientError

log = get_logger("bridgehook.bridge")


# A 429 without a usable Retry-After: Bridge's per-user budget is counted per minute.
DEFAULT_BUDGET_WAIT = 60.0


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class Transaction(msgspec.Struct, gc=False):
    """A transaction as Bridge renders it, when every field has the type it should: amounts exact
    (the JSON literal, ``-12.30`` stays ``-12.30``), dates and times as Bridge wrote them (parsed by
    whoever stores them, exactly as from a generic page). Missing fields take the defaults a generic
    page's ``.get()`` would give; unknown fields are ignored."""

    id: int
    account_id: int | None = None
    amount: Decimal | None = None
    currency_code: str | None = None
    date: str | None = None
    booking_date: str | None = None
    transaction_date: str | None = None
    value_date: str | None = None
    clean_description: str | None = None
    provider_description: str | None = None
    category_id: int | None = None
    operation_type: str | None = None
    future: bool = False
    deleted: bool = False
    updated_at: str | None = None


class _Pagination(msgspec.Struct, gc=False):
    next_uri: str | None = None


class _TransactionPage(msgspec.Struct):
    resources: list[Transaction] | None = None
    pagination: _Pagination | None = None


_TRANSACTION_PAGE = msgspec.json.Decoder(_TransactionPage)


def _page(content: bytes) -> tuple[list[Any], str | None]:
    """The resources (dicts) and the next_uri of a page, decoded generically."""
    data = read_json(content)
    return list(data.get("resources") or []), (data.get("pagination") or {}).get("next_uri")


def _typed_transaction_page(content: bytes) -> tuple[list[Any], str | None]:
    """A page of transactions as :class:`Transaction` structs, or as dicts when it does not fit."""
    try:
        page = _TRANSACTION_PAGE.decode(content)
    except msgspec.MsgspecError:  # malformed for msgspec, or a value of another type: the generic way
        return _page(content)
    return page.resources or [], page.pagination.next_uri if page.pagination is not None else None


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class BridgeClient:
    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        *,
        transport: httpx.BaseTransport | None = None,
        **tuning: Unpack[Tuning],
    ) -> None:
        if not settings.bridge_client_id or settings.bridge_client_secret is None:
            raise ValueError("BRIDGE_CLIENT_ID and BRIDGE_CLIENT_SECRET are required")
        self._settings = settings
        self._redis = connection
        self._attempts = Attempts("Bridge", DEFAULT_BUDGET_WAIT, **tuning)
        self._limiter = self._attempts.limiter(connection)
        self._base = settings.bridge_api_url.rstrip("/")
        self._origin = httpx.URL(self._base)
        self._root = f"{self._origin.scheme}://{self._origin.netloc.decode('ascii')}"
        self._tokens: dict[str, tuple[str, float]] = {}  # user -> token, until when Redis keeps it
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
        self, user_uuid: str, account_id: int, since: datetime | None = None, *, typed: bool = False
    ) -> Iterator[list[Any]]:
        """Pages of dicts; with ``typed``, of :class:`Transaction` structs where a page fits them."""
        decode = _typed_transaction_page if typed else _page
        return (page for page, _ in self._listing(*self._transactions(account_id, since), user_uuid, decode))

    def transaction_listing(
        self,
        user_uuid: str,
        account_id: int | None,
        since: datetime | None = None,
        *,
        start: str | None = None,
    ) -> Iterator[tuple[list[Any], str | None]]:
        """Typed pages (see ``transaction_pages``), each with the ``next_uri`` that follows it (None
        after the last): where a listing stopped, to resume it from ``start`` (a ``next_uri`` it gave).
        ``account_id`` None: the user's transactions, every account's."""
        path, params = (self._resolve(start), None) if start else self._transactions(account_id, since)
        return self._listing(path, params, user_uuid, _typed_transaction_page)

    @staticmethod
    def _transactions(account_id: int | None, since: datetime | None) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {"limit": 500}
        if account_id is not None:
            params = {"account_id": int(account_id)} | params
        if since is not None:
            params["since"] = _iso(since)
        return "/transactions", params

    # -- users and Connect (the application API, api/) --------------------------------------------

    def create_user(self, external_user_id: str) -> dict[str, Any]:
        """``POST /users``: the new user (``uuid``, ``external_user_id``)."""
        return dict(self._request("POST", "/users", body={"external_user_id": external_user_id}))

    def find_user(self, external_user_id: str) -> dict[str, Any] | None:
        """The user Bridge knows by ``external_user_id`` (authenticated by it, the token kept for the
        user's next calls), None if none."""
        try:
            who = {"external_user_id": external_user_id}
            return self._issue_token(who, f"external:{external_user_id}")[1]
        except NotFound:
            return None

    def delete_user(self, user_uuid: str) -> bool:
        """``DELETE /users/{uuid}``, and the user's cached token forgotten; False if Bridge had no such
        user (deleted already)."""
        try:
            self._request("DELETE", f"/users/{user_uuid}")
        except NotFound:
            return False
        finally:
            self.forget_token(user_uuid)
        return True

    def forget_token(self, user_uuid: str) -> None:
        self._redis.delete(f"bridgehook:token:{user_uuid}", f"bridgehook:token-user:{user_uuid}")
        self._hold(user_uuid, None, 0)

    def connect_session(self, user_uuid: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /connect-sessions`` for the user: ``{"id", "url"}``."""
        return dict(self._request("POST", "/connect-sessions", user_uuid=user_uuid, body=body))

    def get_item_in(self, user_uuid: str, item_id: int, language: str) -> dict[str, Any]:
        """The item with its ``status_code_description`` in ``language`` (``Accept-Language``)."""
        path = f"/items/{int(item_id)}"
        return dict(self._request("GET", path, user_uuid=user_uuid, headers={"Accept-Language": language}))

    def user(self, user_uuid: str) -> dict[str, Any]:
        """The user as the last token response described it (uuid, external_user_id)."""
        self._token(user_uuid)
        raw = _text(self._redis.get(f"bridgehook:token-user:{user_uuid}"))
        return dict(json.loads(raw)) if raw else {"uuid": user_uuid}

    # -- plumbing ------------------------------------------------------------------------------

    def _pages(
        self,
        path: str,
        params: dict[str, Any],
        user_uuid: str,
        decode: Callable[[bytes], tuple[list[Any], str | None]] = _page,
    ) -> Iterator[list[Any]]:
        return (page for page, _ in self._listing(path, params, user_uuid, decode))

    def _listing(
        self,
        path: str,
        params: dict[str, Any] | None,
        user_uuid: str,
        decode: Callable[[bytes], tuple[list[Any], str | None]],
    ) -> Iterator[tuple[list[Any], str | None]]:
        """Every page from ``path`` (under the base URL, or a URL), each with its next_uri."""
        url: str | None = path
        query = params
        while url is not None:
            resources, next_uri = self._request("GET", url, user_uuid=user_uuid, params=query, decode=decode)
            yield resources, next_uri or None
            url, query = (self._resolve(next_uri), None) if next_uri else (None, None)

    def _resolve(self, next_uri: str) -> str:
        """``next_uri`` is a path from the host root (or a URL); it must stay on Bridge's host."""
        if next_uri.startswith("/") and not next_uri.startswith("//"):
            # A path from the host root, what Bridge sends: the host cannot change, and the request
            # parses (and normalises) the URL anyway, as the join below would, once instead of twice.
            return self._root + next_uri
        return on_origin(self._origin, next_uri, "next_uri")

    def _url(self, path_or_url: str) -> str:
        return path_or_url if "://" in path_or_url else self._base + path_or_url

    def _budget(self, user_uuid: str | None) -> None:
        s = self._settings
        budgets = [("app", s.rate_app)]
        if user_uuid is not None:
            budgets.append((f"user:{user_uuid}", s.rate_user))
        spend(self._limiter, budgets)

    def _request(
        self,
        method: str,
        path: str,
        *,
        user_uuid: str | None = None,
        params: Any = None,
        body: Any = None,
        decode: Callable[[bytes], Any] = read_json,
        headers: dict[str, str] | None = None,
    ) -> Any:
        renewed = False
        attempt = 0
        where = f"{method} {path.split('?')[0]}"
        while True:
            attempt += 1
            self._budget(user_uuid)
            sent = dict(headers or {})
            token = None
            if user_uuid is not None:
                token = self._token(user_uuid)
                sent["Authorization"] = f"Bearer {token}"
            try:
                response = self._http.request(method, self._url(path), params=params, json=body, headers=sent)
            except httpx.TransportError as exc:
                self._attempts.unsent(attempt, exc, where)
                continue
            # httpx's response and its stream refer to each other (encode/httpx#3733): left so, each
            # response, a page's 190 KB of JSON with it, would wait for the cyclic collector, which a
            # worker runs seldom (workers.runner.GC_YOUNGEST_THRESHOLD). The body is read already
            # (not a streaming request): without its stream, the response goes with its last use.
            response.stream = httpx.ByteStream(b"")
            status = response.status_code
            if status < 400:
                return decode(response.content)
            if status == 401 and token is not None and not renewed:
                renewed = True
                self._token(user_uuid or "", stale=token)
                continue
            if self._attempts.again(attempt, response, where):
                continue
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
        """A valid access token for the user: the shared cached one, or a fresh one.

        The shared one is also kept in this process until Redis would drop it (its TTL already ends
        before the token does), so that a request costs no read of Redis; one that Bridge refuses
        (``stale``) sends us back to Redis, where another worker may have renewed it already."""
        held = self._tokens.get(user_uuid)
        if held is not None and held[0] != stale and time.monotonic() < held[1]:
            return held[0]
        key = f"bridgehook:token:{user_uuid}"
        cached = self._shared_token(user_uuid, key)
        if cached is not None and cached != stale:
            return cached
        try:
            with self._redis.lock(f"{key}:lock", timeout=30, blocking_timeout=30):
                cached = self._shared_token(user_uuid, key)  # another worker may have refreshed it meanwhile
                if cached is not None and cached != stale:
                    return cached
                return self._new_token(user_uuid)
        except LockError as exc:
            raise TransientError(f"token refresh for a user is stuck: {exc}") from exc

    def _shared_token(self, user_uuid: str, key: str) -> str | None:
        """The token Redis holds for the user (None if none), kept here until Redis expires it."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        raw, ttl_ms = pipe.execute()
        token = _text(raw)
        self._hold(user_uuid, token, ttl_ms / 1000 if isinstance(ttl_ms, int) else 0)
        return token

    def _hold(self, user_uuid: str, token: str | None, seconds: float) -> None:
        """Keep the user's token in this process for ``seconds`` (as long as Redis does), or forget it."""
        if token is not None and seconds > 0:
            self._tokens[user_uuid] = (token, time.monotonic() + seconds)
        else:
            self._tokens.pop(user_uuid, None)

    def _new_token(self, user_uuid: str) -> str:
        return self._issue_token({"user_uuid": user_uuid}, user_uuid)[0]

    def _issue_token(self, who: dict[str, str], budget: str) -> tuple[str, dict[str, Any]]:
        """A token for the user ``who`` names (user_uuid or external_user_id), shared in Redis as
        :meth:`_token` reads it, and the user it was issued for. ``budget``: whose token budget."""
        spend(self._limiter, [(f"token:{budget}", self._settings.rate_token)])
        data = self._request("POST", "/authorization/token", body=who)
        user: dict[str, Any] = dict(data.get("user") or {"uuid": who.get("user_uuid")})
        user_uuid = str(user.get("uuid") or who.get("user_uuid"))
        key = f"bridgehook:token:{user_uuid}"
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
        pipe.set(f"bridgehook:token-user:{user_uuid}", json.dumps(user))
        pipe.execute()
        self._hold(user_uuid, token, ttl)
        log.info("bridge.token_issued", user_uuid=user_uuid, ttl=ttl)
        return token, user
