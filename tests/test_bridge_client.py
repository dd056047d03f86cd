"""BridgeClient, RateLimiter and the Syncer's overlap against the fake Bridge over real HTTP and a real Redis.

Nothing of ours is mocked: sleeps are recorded through the ``sleep=`` seam the client and the limiter
take, the limiter's clock through its ``clock=`` seam, and the few behaviours the fake cannot produce
(a foreign ``next_uri``, an ``errors`` list, a malformed ``Retry-After``) come from a tiny Starlette app
served by uvicorn on a loopback socket.
"""

from __future__ import annotations

import gc
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import redis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fakebridge.app import PREFIX, create_app
from fakebridge.server import FakeBridgeServer
from fakebridge.world import RequestRecord, World, iso_ms
from service.settings import Rate, Settings
from tests.harness import storage_at, worker_settings
from workers.bridge import DEFAULT_BUDGET_WAIT, BridgeClient
from workers.errors import (
    AuthError,
    BudgetExhausted,
    NotFound,
    PermanentError,
    ProviderError,
    TransientError,
    parse_retry_after,
)
from workers.ratelimit import OverBudget, RateLimiter
from workers.storage import Storage
from workers.sync import Syncer
from workers.writer import Writer

TOKEN_PATH = f"{PREFIX}/authorization/token"
TXN_PATH = f"{PREFIX}/transactions"


# -- helpers ---------------------------------------------------------------------------------------------
@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a loopback port in a daemon thread; yield its root URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, loop="asyncio", lifespan="off", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class HeaderLog:
    """ASGI wrapper that keeps (method, path, headers) of every request as the server received it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            self.seen.append((scope["method"], scope["path"], headers))
        await self.app(scope, receive, send)


def rogue_bridge(transactions: Callable[[Request], Response]) -> Starlette:
    """A minimal Bridge-shaped app: a token endpoint and a transactions endpoint we script."""

    async def token(request: Request) -> Response:
        body = await request.json()
        expires = iso_ms(int((time.time() + 7200) * 1000))
        user = {"uuid": body["user_uuid"]}
        return JSONResponse({"access_token": "rogue-token", "expires_at": expires, "user": user}, 201)

    async def txns(request: Request) -> Response:
        return transactions(request)

    return Starlette(routes=[Route(TOKEN_PATH, token, methods=["POST"]), Route(TXN_PATH, txns)])


class Clock:
    """A settable clock whose sleep records the duration and moves time forward by it."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def bank(world: World, transactions: int = 0) -> tuple[str, int, int]:
    """A user (with an external id) owning one item with one account at the fake."""
    user = world.add_user(external_user_id="app-user-1")
    item = world.add_item(user)
    account = world.add_account(item, balance="1678.10")
    if transactions:
        world.add_transactions(account, transactions)
    return user, item, account


def calls(world: World) -> list[tuple[str, str, int]]:
    with world.lock:
        return [(q.method, q.path, q.status) for q in world.requests]


def requests_to(world: World, path: str) -> list[RequestRecord]:
    with world.lock:
        return [q for q in world.requests if q.path == path]


def floats_in(value: Any) -> list[Any]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in floats_in(v)]
    if isinstance(value, list):
        return [f for v in value for f in floats_in(v)]
    return []


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bridgehook.db'}"


@pytest.fixture
def settings(redis_url: str, r: redis.Redis, world: World, fake: FakeBridgeServer, db_url: str) -> Settings:
    return worker_settings(redis_url, db_url, fake.api_url, world)


@pytest.fixture
def clients(redis_url: str, r: redis.Redis) -> Iterator[Callable[..., BridgeClient]]:
    """BridgeClients on the test's Redis; every one never really sleeps (``sleeps`` records instead)."""
    opened: list[BridgeClient] = []
    connections: list[redis.Redis] = []

    def make(
        settings: Settings, *, sleeps: list[float] | None = None, own_connection: bool = False, **kw: Any
    ) -> BridgeClient:
        connection = r
        if own_connection:  # another worker: its own connection to the same Redis
            connection = redis.Redis.from_url(redis_url)
            connections.append(connection)
        client = BridgeClient(settings, connection, sleep=(sleeps if sleeps is not None else []).append, **kw)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()
    for connection in connections:
        connection.close()


# -- headers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "expected"), [(None, "2025-01-15"), ("2026-03-01", "2026-03-01")])
def test_every_request_carries_client_credentials_version_and_user_calls_a_bearer(
    redis_url: str,
    world: World,
    clients: Callable[..., BridgeClient],
    db_url: str,
    version: str | None,
    expected: str,
) -> None:
    user, item, account = bank(world, transactions=3)
    recorder = HeaderLog(create_app(world))
    with serving(recorder) as root:
        env = {"BRIDGE_VERSION": version} if version else {}
        settings = worker_settings(redis_url, db_url, root + PREFIX, world, **env)
        assert settings.bridge_version == expected
        client = clients(settings)
        client.get_item(user, item)
        client.get_account(user, account)
        list(client.account_pages(user, item))
        list(client.transaction_pages(user, account))

    assert [(m, p) for m, p, _ in recorder.seen] == [
        ("POST", TOKEN_PATH),
        ("GET", f"{PREFIX}/items/{item}"),
        ("GET", f"{PREFIX}/accounts/{account}"),
        ("GET", f"{PREFIX}/accounts"),
        ("GET", TXN_PATH),
    ]
    for _, _, headers in recorder.seen:
        assert headers["client-id"] == world.client_id
        assert headers["client-secret"] == world.client_secret
        assert headers["bridge-version"] == expected
    token_request, *user_calls = recorder.seen
    assert "authorization" not in token_request[2]  # the token call is an application call
    for _, _, headers in user_calls:
        scheme, _, token = headers["authorization"].partition(" ")
        assert scheme == "Bearer"
        assert world.token_user(token) == user


# -- pagination ------------------------------------------------------------------------------------------
def test_transaction_pages_follow_next_uri_and_yield_every_transaction_once(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, account = bank(world)
    ids = world.add_transactions(account, 1201)
    other = world.add_account(item, name="Livret")
    world.add_transactions(other, 7)  # another account's transactions must not leak in
    client = clients(settings)

    pages = list(client.transaction_pages(user, account))

    assert [len(p) for p in pages] == [500, 500, 201]
    seen = [t["id"] for page in pages for t in page]
    assert len(seen) == len(set(seen)) == 1201
    assert sorted(seen) == ids
    gets = requests_to(world, TXN_PATH)
    assert len(gets) == 3
    assert all(q.status == 200 for q in gets)  # next_uri was resolved against the host root
    queries = [parse_qs(q.query) for q in gets]
    assert "after" not in queries[0]
    assert [q["after"] for q in queries[1:]] == [[str(ids[499])], [str(ids[999])]]
    assert all(q["account_id"] == [str(account)] and q["limit"] == ["500"] for q in queries)


def test_a_read_page_is_freed_at_once_not_left_to_the_cyclic_collector(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    """httpx's response and its stream refer to each other; the client breaks that cycle once it has
    the body, so that a sync's pages do not pile up between the worker's rare collections."""
    user, _, account = bank(world)
    world.add_transactions(account, 1201)
    client = clients(settings)
    list(client.transaction_pages(user, account))  # the token, the connection: what stays from call to call

    def responses() -> int:
        return sum(isinstance(o, httpx.Response) for o in gc.get_objects())

    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        before = responses()
        pages = list(client.transaction_pages(user, account))
        left = responses() - before
    finally:
        if enabled:
            gc.enable()
    assert [len(p) for p in pages] == [500, 500, 201]
    assert left == 0, f"{left} responses wait for the cyclic collector"


def test_next_uri_resolves_against_scheme_and_host_not_the_base_url(
    fake: FakeBridgeServer, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    client = clients(settings)
    path = f"{PREFIX}/transactions?account_id=1&limit=500&after=9"
    assert client._resolve(path) == f"{fake.url}{path}"
    assert client._resolve(f"{fake.url}{path}") == f"{fake.url}{path}"  # an absolute URL on the same host


def test_next_uri_on_another_origin_is_refused(
    fake: FakeBridgeServer, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    client = clients(settings)
    for next_uri in (
        "https://evil.example/v3/aggregation/transactions?after=1",
        "//evil.example/v3/aggregation/transactions?after=1",  # scheme-relative
        "http://127.0.0.1:1/v3/aggregation/transactions?after=1",  # same host, another port
        f"https://127.0.0.1:{fake.port}/v3/aggregation/transactions?after=1",  # another scheme
    ):
        with pytest.raises(PermanentError, match="another host"):
            client._resolve(next_uri)


def test_foreign_next_uri_from_the_server_raises_before_any_request_leaves(
    redis_url: str, r: redis.Redis, world: World, clients: Callable[..., BridgeClient], db_url: str
) -> None:
    foreign = HeaderLog(Starlette())  # would answer 404 to anything; we only want to know it is never hit
    with serving(foreign) as foreign_root:

        def page(request: Request) -> Response:
            next_uri = f"{foreign_root}{TXN_PATH}?account_id=7&after=1"
            return JSONResponse({"resources": [{"id": 1}], "pagination": {"next_uri": next_uri}})

        with serving(rogue_bridge(page)) as root:
            client = clients(worker_settings(redis_url, db_url, root + PREFIX, world))
            pages = client.transaction_pages("user-1", 7)
            assert [t["id"] for t in next(pages)] == [1]
            with pytest.raises(PermanentError, match="another host"):
                next(pages)
    assert foreign.seen == []


# -- amounts ---------------------------------------------------------------------------------------------
def test_amounts_parse_as_exact_decimals_never_floats(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, account = bank(world)
    ids = world.add_transactions(account, 20)
    world.update_transaction(ids[0], amount="-0.10")
    world.update_transaction(ids[1], amount="12345678901234567.89")  # beyond a float's 15-17 digits
    world.update_transaction(ids[2], amount="0.30")
    client = clients(settings)

    fetched = client.get_account(user, account)
    listed = [a for page in client.account_pages(user, item) for a in page]
    txns = {t["id"]: t for page in client.transaction_pages(user, account) for t in page}

    for acc in (fetched, *listed):
        assert type(acc["balance"]) is Decimal
        assert str(acc["balance"]) == "1678.10"  # the trailing zero survives: the literal, not a float
    truth = world.snapshot()["transactions"]
    assert len(txns) == 20
    for txn_id, txn in txns.items():
        assert type(txn["amount"]) is Decimal
        assert txn["amount"] == truth[txn_id]["amount"]
    assert str(txns[ids[0]]["amount"]) == "-0.10"
    assert str(txns[ids[1]]["amount"]) == "12345678901234567.89"
    assert txns[ids[0]]["amount"] + txns[ids[2]]["amount"] == Decimal("0.20")
    assert floats_in([fetched, listed, list(txns.values())]) == []


# -- 5xx and network errors ------------------------------------------------------------------------------
def test_5xx_is_retried_up_to_max_attempts_then_transient(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, _ = bank(world)
    sleeps: list[float] = []
    client = clients(settings, sleeps=sleeps, jitter=lambda: 1.0)  # defaults: 4 attempts, 0.5 s base, 8 s cap
    client.user(user)  # the token first, so that the faults hit the call under test
    world.reset_requests()
    world.faults.fail_next(10, 503)

    with pytest.raises(TransientError) as info:
        client.get_item(user, item)

    assert info.value.status == 503
    assert calls(world) == [("GET", f"{PREFIX}/items/{item}", 503)] * 4
    assert sleeps == [0.5, 1.0, 2.0]  # exponential: base * 2 ** (attempt - 1)


def test_backoff_grows_and_is_capped(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, _ = bank(world)
    sleeps: list[float] = []
    client = clients(
        settings, sleeps=sleeps, max_attempts=7, backoff_base=1.0, backoff_cap=5.0, jitter=lambda: 1.0
    )
    client.user(user)
    world.reset_requests()
    world.faults.fail_next(10, 500)

    with pytest.raises(TransientError):
        client.get_item(user, item)

    assert len(requests_to(world, f"{PREFIX}/items/{item}")) == 7
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_backoff_with_full_jitter_stays_under_the_growing_ceiling(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, _ = bank(world)
    sleeps: list[float] = []
    jitter = random.Random(3).random
    client = clients(
        settings, sleeps=sleeps, max_attempts=8, backoff_base=0.5, backoff_cap=4.0, jitter=jitter
    )
    client.user(user)
    world.faults.fail_next(10, 502)

    with pytest.raises(TransientError):
        client.get_item(user, item)

    ceilings = [min(4.0, 0.5 * 2**n) for n in range(7)]
    assert len(sleeps) == 7
    assert all(0.0 <= s <= c for s, c in zip(sleeps, ceilings, strict=True))
    assert max(sleeps) <= 4.0


def test_5xx_then_success_returns_the_answer(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, _ = bank(world)
    sleeps: list[float] = []
    client = clients(settings, sleeps=sleeps, jitter=lambda: 1.0)
    client.user(user)
    world.reset_requests()
    world.faults.fail_next(2, 500)

    assert client.get_item(user, item)["id"] == item
    assert [s for _, _, s in calls(world)] == [500, 500, 200]
    assert sleeps == [0.5, 1.0]


def test_connection_errors_are_retried_then_transient(
    redis_url: str, world: World, clients: Callable[..., BridgeClient], db_url: str
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    settings = worker_settings(redis_url, db_url, f"http://127.0.0.1:{port}{PREFIX}", world)
    client = clients(settings, sleeps=sleeps, jitter=lambda: 1.0)

    with pytest.raises(TransientError, match="ConnectError"):
        client.user("user-1")
    assert sleeps == [0.5, 1.0, 2.0]


# -- 429 and Retry-After ---------------------------------------------------------------------------------
def test_429_retry_after_is_honoured(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, _ = bank(world)
    sleeps: list[float] = []
    client = clients(settings, sleeps=sleeps)
    client.user(user)
    world.reset_requests()
    world.faults.rate_limit_next(1, retry_after=7)

    assert client.get_item(user, item)["id"] == item
    assert sleeps == [7.0]
    assert calls(world) == [("GET", f"{PREFIX}/items/{item}", 429), ("GET", f"{PREFIX}/items/{item}", 200)]


def test_429_with_retry_after_above_the_maximum_raises_at_once(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, _ = bank(world)
    sleeps: list[float] = []
    client = clients(settings, sleeps=sleeps, max_retry_after=30.0)
    client.user(user)
    world.reset_requests()
    world.faults.rate_limit_next(1, retry_after=120)

    with pytest.raises(TransientError) as info:
        client.get_item(user, item)

    assert info.value.retry_after == 120.0
    assert info.value.status == 429
    assert sleeps == []
    assert calls(world) == [("GET", f"{PREFIX}/items/{item}", 429)]


def test_429_until_max_attempts_raises_with_retry_after(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, _ = bank(world)
    sleeps: list[float] = []
    client = clients(settings, sleeps=sleeps, max_attempts=3)
    client.user(user)
    world.reset_requests()
    world.faults.rate_limit_next(5, retry_after=2)

    with pytest.raises(TransientError) as info:
        client.get_item(user, item)

    assert info.value.retry_after == 2.0
    assert sleeps == [2.0, 2.0]
    assert [s for _, _, s in calls(world)] == [429, 429, 429]


def test_malformed_retry_after_stays_inside_the_bridge_errors(
    redis_url: str, world: World, clients: Callable[..., BridgeClient], db_url: str
) -> None:
    """A Retry-After that is not a number nor a date is ignored (backoff instead); it must never turn
    into a ValueError escaping the client, whose callers catch BridgeError. Still refused after the
    attempts, the 429 is a spent budget whose wait is Bridge's per-user window."""

    def page(request: Request) -> Response:
        return Response(b'{"code":"too_many_requests"}', 429, headers={"Retry-After": "\u00b2"})

    sleeps: list[float] = []
    with serving(rogue_bridge(page)) as root:
        client = clients(
            worker_settings(redis_url, db_url, root + PREFIX, world), sleeps=sleeps, jitter=lambda: 1.0
        )
        with pytest.raises(BudgetExhausted) as info:
            list(client.transaction_pages("user-1", 7))
    assert info.value.status == 429
    assert info.value.retry_after == DEFAULT_BUDGET_WAIT
    assert sleeps == [0.5, 1.0, 2.0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-3", None),
        ("1.5", None),
        ("\u00b2", None),  # a digit to str.isdigit(), not to float(): malformed, so absent
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_dates() -> None:
    now = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("Wed, 15 Jan 2025 12:01:30 GMT", now=now) == 90.0
    assert parse_retry_after("Wed, 15 Jan 2025 13:00:00 +0100", now=now) == 0.0  # the same instant
    assert parse_retry_after("Wed, 15 Jan 2025 11:59:00 GMT", now=now) == 0.0  # in the past: no wait
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    waited = parse_retry_after(soon)  # against the wall clock
    assert waited is not None
    assert 55.0 <= waited <= 60.0


# -- 4xx -------------------------------------------------------------------------------------------------
def test_404_is_not_found(world: World, settings: Settings, clients: Callable[..., BridgeClient]) -> None:
    user, _, _ = bank(world)
    sleeps: list[float] = []
    client = clients(settings, sleeps=sleeps)
    client.user(user)
    world.reset_requests()

    with pytest.raises(NotFound) as info:
        client.get_item(user, 999)
    assert (info.value.status, info.value.code) == (404, "not_found")
    with pytest.raises(NotFound):
        client.get_account(user, 999)
    assert [s for _, _, s in calls(world)] == [404, 404]  # never retried
    assert sleeps == []


def test_400_is_permanent_with_status_and_code(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, account = bank(world)
    sleeps: list[float] = []
    client = clients(settings, sleeps=sleeps)
    client.user(user)
    world.reset_requests()

    world.faults.fail_next(1, 400)
    with pytest.raises(PermanentError) as info:
        client.get_item(user, item)
    assert type(info.value) is PermanentError
    assert (info.value.status, info.value.code) == (400, "bad_request")

    world.page_limit_max = 100  # the client asks for limit=500: a genuinely invalid request
    with pytest.raises(PermanentError) as info:
        list(client.transaction_pages(user, account))
    assert (info.value.status, info.value.code) == (400, "invalid_parameter")
    assert [s for _, _, s in calls(world)] == [400, 400]  # never retried
    assert sleeps == []


def test_error_code_is_read_from_an_errors_list(
    redis_url: str, world: World, clients: Callable[..., BridgeClient], db_url: str
) -> None:
    def page(request: Request) -> Response:
        errors = [{"code": "invalid_since", "message": "since is in the future", "property": "since"}]
        return JSONResponse({"errors": errors}, 422)

    with serving(rogue_bridge(page)) as root:
        client = clients(worker_settings(redis_url, db_url, root + PREFIX, world))
        with pytest.raises(PermanentError) as info:
            list(client.transaction_pages("user-1", 7))
    assert (info.value.status, info.value.code) == (422, "invalid_since")
    assert "since is in the future" in str(info.value)


def test_wrong_client_secret_and_403_are_auth_errors(
    redis_url: str, world: World, fake: FakeBridgeServer, clients: Callable[..., BridgeClient], db_url: str
) -> None:
    user, item, _ = bank(world)
    settings = worker_settings(redis_url, db_url, fake.api_url, world, BRIDGE_CLIENT_SECRET="not-the-secret")
    sleeps: list[float] = []
    client = clients(settings, sleeps=sleeps)

    with pytest.raises(AuthError) as info:
        client.get_item(user, item)

    assert (info.value.status, info.value.code) == (401, "invalid_client")
    assert calls(world) == [("POST", TOKEN_PATH, 401)]  # no retry, no user call without a token
    assert sleeps == []
    assert "not-the-secret" not in str(info.value)

    good = clients(worker_settings(redis_url, db_url, fake.api_url, world))
    good.user(user)
    world.faults.fail_next(1, 403)
    with pytest.raises(AuthError) as info:
        good.get_item(user, item)
    assert info.value.status == 403


# -- tokens ----------------------------------------------------------------------------------------------
def test_two_clients_on_one_redis_share_one_token(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, account = bank(world, transactions=3)
    a = clients(settings)
    b = clients(settings, own_connection=True)

    a.get_item(user, item)
    b.get_item(user, item)
    b.get_account(user, account)
    list(a.transaction_pages(user, account))

    assert len(requests_to(world, TOKEN_PATH)) == 1
    user_calls = [q for q in world.requests if q.path != TOKEN_PATH]
    assert len(user_calls) == 4
    assert all(q.status == 200 and q.user_uuid == user for q in user_calls)


def test_concurrent_clients_request_one_token(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, _ = bank(world)
    workers = [clients(settings, own_connection=True) for _ in range(4)]
    world.faults.delay(0.1)  # a slow token endpoint: every worker wants a token at the same time
    barrier = threading.Barrier(len(workers))
    results: list[Any] = []

    def run(client: BridgeClient) -> None:
        barrier.wait()
        try:
            results.append(client.get_item(user, item)["id"])
        except ProviderError as exc:  # pragma: no cover - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert results == [item] * 4
    assert len(requests_to(world, TOKEN_PATH)) == 1


def test_expired_token_is_renewed_exactly_once_and_shared(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, item, _ = bank(world)
    sleeps: list[float] = []
    a = clients(settings, sleeps=sleeps)
    b = clients(settings, own_connection=True)
    a.get_item(user, item)
    world.expire_tokens()
    world.reset_requests()

    assert a.get_item(user, item)["id"] == item

    item_path = f"{PREFIX}/items/{item}"
    assert calls(world) == [("GET", item_path, 401), ("POST", TOKEN_PATH, 201), ("GET", item_path, 200)]
    assert sleeps == []
    world.reset_requests()
    assert b.get_item(user, item)["id"] == item  # the other worker uses the renewed token
    assert calls(world) == [("GET", item_path, 200)]


def test_user_returns_the_external_user_id(
    world: World, settings: Settings, clients: Callable[..., BridgeClient]
) -> None:
    user, _, _ = bank(world)
    anonymous = world.add_user()
    a = clients(settings)
    b = clients(settings, own_connection=True)

    assert a.user(user) == {"uuid": user, "external_user_id": "app-user-1"}
    assert b.user(user)["external_user_id"] == "app-user-1"  # from the shared cache
    assert a.user(anonymous) == {"uuid": anonymous}  # nulls are omitted
    assert len(requests_to(world, TOKEN_PATH)) == 2  # one per user


def test_spent_user_budget_is_transient_and_sends_nothing(
    redis_url: str, world: World, fake: FakeBridgeServer, clients: Callable[..., BridgeClient], db_url: str
) -> None:
    user, item, _ = bank(world)
    # A day-long window: the next one is (almost always) further than the limiter's 10 s max wait.
    settings = worker_settings(redis_url, db_url, fake.api_url, world, BRIDGE_RATE_LIMIT_USER="2/86400")
    client = clients(settings)
    client.get_item(user, item)
    client.get_item(user, item)
    world.reset_requests()

    with pytest.raises(TransientError) as info:
        client.get_item(user, item)

    assert info.value.retry_after is not None
    assert info.value.retry_after > 10
    assert calls(world) == []


# -- RateLimiter -----------------------------------------------------------------------------------------
T0 = 1_740_000_000.0


def test_limiter_waits_for_the_oldest_request_to_leave_its_window(r: redis.Redis) -> None:
    clock = Clock(T0)
    limiter = RateLimiter(r, max_wait=60.0, clock=clock, sleep=clock.sleep)
    rate = Rate(3, 60)
    for _ in range(3):
        limiter.acquire("user:u1", rate)
        clock.now += 10  # at T0, T0 + 10, T0 + 20
    assert clock.sleeps == []

    limiter.acquire("user:u1", rate)  # at T0 + 30: the first leaves the window at T0 + 60
    assert clock.sleeps == [pytest.approx(30.01)]
    limiter.acquire("user:u1", rate)  # the second leaves it at T0 + 70
    assert clock.sleeps[1:] == [pytest.approx(10.0)]  # 9.99 s, and the limiter's 10 ms


def test_limiter_allows_no_burst_at_a_window_edge(r: redis.Redis) -> None:
    """Three requests at the end of a minute leave no room at the start of the next one: Bridge counts
    any 60 s, and a fixed window would let six through in two seconds."""
    clock = Clock(60 * 29_000_000.0 + 59.0)  # one second before a fixed minute would end
    limiter = RateLimiter(r, max_wait=0.0, clock=clock, sleep=clock.sleep)
    rate = Rate(3, 60)
    for _ in range(3):
        limiter.acquire("user:u1", rate)
    clock.now += 2
    with pytest.raises(OverBudget) as info:
        limiter.acquire("user:u1", rate)
    assert info.value.wait == pytest.approx(58.0)


def test_limiter_raises_over_budget_when_the_wait_is_too_long(r: redis.Redis) -> None:
    clock = Clock(T0)
    limiter = RateLimiter(r, max_wait=10.0, clock=clock, sleep=clock.sleep)
    rate = Rate(2, 60)
    limiter.acquire("app", rate)
    limiter.acquire("app", rate)
    clock.now += 10

    with pytest.raises(OverBudget) as info:
        limiter.acquire("app", rate)

    assert info.value.wait == pytest.approx(50.0)
    assert info.value.key == "app"
    assert clock.sleeps == []


def test_limiter_takes_every_budget_or_none(r: redis.Redis) -> None:
    """A request refused by one budget counts against no other: the user's spent budget must not eat
    the application's, which every other user shares."""
    clock = Clock(T0)
    limiter = RateLimiter(r, max_wait=0.0, clock=clock, sleep=clock.sleep)
    app, user = Rate(3, 60), Rate(1, 60)
    limiter.acquire_all([("app", app), ("user:u1", user)])
    for _ in range(5):
        with pytest.raises(OverBudget) as info:
            limiter.acquire_all([("app", app), ("user:u1", user)])
        assert info.value.key == "user:u1"
    assert r.zcard("bridgehook:rate:app") == 1
    limiter.acquire_all([("app", app), ("user:u2", user)])  # the application's budget is intact
    limiter.acquire_all([("app", app), ("user:u3", user)])
    with pytest.raises(OverBudget) as info:
        limiter.acquire_all([("app", app), ("user:u4", user)])
    assert info.value.key == "app"
    assert r.zcard("bridgehook:rate:user:u4") == 0


def test_limiter_budgets_are_shared_through_redis(redis_url: str, r: redis.Redis) -> None:
    clock = Clock(T0)
    other = redis.Redis.from_url(redis_url)
    try:
        a = RateLimiter(r, max_wait=0.0, clock=clock, sleep=clock.sleep)
        b = RateLimiter(other, max_wait=0.0, clock=clock, sleep=clock.sleep)
        rate = Rate(4, 60)
        for limiter in (a, b, a, b):
            limiter.acquire("user:u1", rate)
        for limiter in (a, b):
            with pytest.raises(OverBudget):
                limiter.acquire("user:u1", rate)
        b.acquire("user:u2", rate)  # another key has its own budget
        clock.now = T0 + 60.0
        a.acquire("user:u1", rate)  # a minute later the first ones have left the window
    finally:
        other.close()
    assert clock.sleeps == []


# -- Syncer overlap --------------------------------------------------------------------------------------
@pytest.fixture
def storage(db_url: str) -> Iterator[Storage]:
    with storage_at(db_url) as opened:
        yield opened


def test_sync_asks_for_transactions_since_the_cursor_minus_the_overlap(
    world: World, settings: Settings, clients: Callable[..., BridgeClient], storage: Storage
) -> None:
    user, item, account = bank(world)
    ids = world.add_transactions(account, 5)
    cursor = datetime.now(UTC).replace(microsecond=123_000) - timedelta(hours=1)
    with storage.transaction() as tx:
        storage.upsert_accounts(tx, [{"id": account, "item_id": item}])
        Writer.advance_cursor(tx, account, cursor)
    assert Writer(storage.db).cursor(account) == cursor
    syncer = Syncer(clients(settings), storage, overlap=timedelta(seconds=300))

    assert syncer.sync_transactions(user, account, full=False) == 5

    [request] = requests_to(world, TXN_PATH)
    [since] = parse_qs(request.query)["since"]
    assert datetime.fromisoformat(since.replace("Z", "+00:00")) == cursor - timedelta(seconds=300)
    newest = max(world.snapshot()["transactions"][i]["updated_at"] for i in ids)
    assert Writer(storage.db).cursor(account) == datetime.fromisoformat(newest.replace("Z", "+00:00"))


def test_full_sync_and_first_sync_ask_without_since(
    world: World, settings: Settings, clients: Callable[..., BridgeClient], storage: Storage
) -> None:
    user, item, account = bank(world, transactions=3)
    with storage.transaction() as tx:
        storage.upsert_accounts(tx, [{"id": account, "item_id": item}])
    syncer = Syncer(clients(settings), storage, overlap=timedelta(seconds=300))

    assert syncer.sync_transactions(user, account, full=False) == 3  # no cursor yet
    assert Writer(storage.db).cursor(account) is not None
    assert syncer.sync_transactions(user, account, full=True) == 3  # a cursor, but a full listing

    queries = [parse_qs(q.query) for q in requests_to(world, TXN_PATH)]
    assert len(queries) == 2
    assert all("since" not in q for q in queries)


# -- secrets ---------------------------------------------------------------------------------------------
def test_repr_of_client_and_settings_never_shows_the_client_secret(
    redis_url: str, world: World, fake: FakeBridgeServer, clients: Callable[..., BridgeClient], db_url: str
) -> None:
    secret = "Sup3r-distinct-client-secret-value"
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "BRIDGE_API_URL": fake.api_url,
            "BRIDGE_CLIENT_ID": world.client_id,
            "BRIDGE_CLIENT_SECRET": secret,
        }
    )
    client = clients(settings)
    assert settings.bridge_client_secret is not None
    assert settings.bridge_client_secret.reveal() == secret
    for text in (
        repr(client),
        str(client),
        repr(settings),
        str(settings),
        repr(settings.bridge_client_secret),
    ):
        assert secret not in text
    assert fake.api_url in repr(client)


def test_limiter_counts_in_redis_time_by_default(r: redis.Redis) -> None:
    """Without a clock of its own, the windows are counted in Redis's time: workers whose clocks
    disagree share one budget, and a wait is measured on the same clock."""
    limiter = RateLimiter(r, max_wait=0.0)
    rate = Rate(2, 60)
    limiter.acquire("user:u1", rate)
    limiter.acquire("user:u1", rate)
    with pytest.raises(OverBudget) as info:
        limiter.acquire("user:u1", rate)
    assert 59 < info.value.wait <= 60
    seconds, micros = r.time()
    [(_, score)] = r.zrange("bridgehook:rate:user:u1", 0, 0, withscores=True)
    assert abs(score - (seconds + micros / 1e6)) < 5
