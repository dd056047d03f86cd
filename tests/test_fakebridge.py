"""The fake Bridge over real HTTP: auth, shapes, exact amounts, pagination, since, 1100, faults, rate
limits, latency, webhooks, CLI."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import urljoin

import httpx
import pytest

from fakebridge import FakeBridgeServer, WebhookSender, World, seed_demo, sign, webhook_body
from fakebridge.__main__ import make_world, parse_args
from fakebridge.world import Refusal, parse_iso_ms

HEADERS = {
    "Client-Id": "fake-client-id",
    "Client-Secret": "fake-client-secret",
    "Bridge-Version": "2025-01-15",
}
ITEM_KEYS = {"id", "status", "provider_id", "last_successful_refresh", "last_try_refresh"}
ACCOUNT_KEYS = {
    "id", "name", "balance", "accounting_balance", "instant_balance", "updated_at", "last_refresh_status",
    "type", "currency_code", "item_id", "provider_id", "data_access", "pro", "iban",
}  # fmt: skip
TXN_KEYS = {
    "id", "clean_description", "provider_description", "amount", "date", "booking_date", "transaction_date",
    "value_date", "updated_at", "currency_code", "category_id", "account_id", "deleted", "future",
    "operation_type",
}  # fmt: skip


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=7)


@pytest.fixture(scope="module")
def server(world: World) -> Iterator[FakeBridgeServer]:
    with FakeBridgeServer(world) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean_faults(world: World) -> Iterator[None]:
    world.faults.clear()
    world.budgets.clear()
    world.reset_requests()
    yield
    world.faults.clear()
    world.budgets.clear()


@pytest.fixture
def http(server: FakeBridgeServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=5) as client:
        yield client


def token_for(http: httpx.Client, user_uuid: str) -> dict[str, str]:
    response = http.post("/v3/aggregation/authorization/token", json={"user_uuid": user_uuid})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def new_user(world: World, transactions: int = 3) -> tuple[str, int, int]:
    """A fresh user with one item and one account (tests share the module's world)."""
    user = world.add_user()
    item = world.add_item(user)
    account = world.add_account(item)
    world.add_transactions(account, transactions)
    return user, item, account


def decimal_json(response: httpx.Response) -> Any:
    return json.loads(response.text, parse_float=Decimal)


def all_pages(http: httpx.Client, server: FakeBridgeServer, path: str, auth: dict[str, str]) -> list[Any]:
    rows: list[Any] = []
    url: str | None = path
    while url is not None:
        response = http.get(urljoin(server.url, url), headers=auth)
        assert response.status_code == 200, response.text
        body = decimal_json(response)
        rows += body["resources"]
        url = body["pagination"]["next_uri"]
        assert url is None or url.startswith("/v3/aggregation/")
    return rows


# -- authentication -------------------------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["Client-Id", "Client-Secret", "Bridge-Version"])
def test_client_headers_are_required(server: FakeBridgeServer, missing: str) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != missing}
    response = httpx.get(server.api_url + "/items", headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_client"
    wrong = httpx.get(server.api_url + "/items", headers={**HEADERS, "Client-Secret": "nope"})
    assert wrong.status_code == 401


def test_token_issue_bearer_and_expiry(world: World, http: httpx.Client) -> None:
    user = world.add_user("ext-token")
    by_external = http.post("/v3/aggregation/authorization/token", json={"external_user_id": "ext-token"})
    assert by_external.status_code == 201
    body = by_external.json()
    assert body["user"] == {"uuid": user, "external_user_id": "ext-token"}
    assert parse_iso_ms(body["expires_at"]) / 1000 == pytest.approx(time.time() + 7200, abs=5)
    auth = token_for(http, user)
    assert http.get("/v3/aggregation/items", headers=auth).status_code == 200
    for bad in ({}, {"Authorization": "Bearer forged"}, {"Authorization": "Basic abc"}):
        response = http.get("/v3/aggregation/items", headers=bad)
        assert (response.status_code, response.json()["code"]) == (401, "invalid_token")
    unknown = http.post("/v3/aggregation/authorization/token", json={"user_uuid": "no-such-user"})
    assert unknown.status_code == 404
    world.expire_tokens()
    expired = http.get("/v3/aggregation/items", headers=auth)
    assert (expired.status_code, expired.json()["code"]) == (401, "invalid_token")
    assert http.get("/v3/aggregation/items", headers=token_for(http, user)).status_code == 200
    short_lived = World(token_ttl_seconds=0)
    issued = short_lived.issue_token(short_lived.add_user())
    assert issued is not None and short_lived.token_user(issued["access_token"]) is None


def test_deleted_user_loses_its_tokens_and_data(world: World, http: httpx.Client) -> None:
    user, item, _ = new_user(world)
    auth = token_for(http, user)
    world.delete_user(user)
    assert http.get(f"/v3/aggregation/items/{item}", headers=auth).status_code == 401
    assert http.post("/v3/aggregation/authorization/token", json={"user_uuid": user}).status_code == 404
    assert item in world.snapshot()["deleted"]["items"]


# -- shapes and amounts ---------------------------------------------------------------------------------
def test_shapes_omit_none_and_match_the_snapshot(world: World, http: httpx.Client) -> None:
    user = world.add_user()
    item = world.add_item(user)
    account = world.add_account(item, iban=None)
    world.add_transactions(account, 2)
    auth = token_for(http, user)
    got_item = http.get(f"/v3/aggregation/items/{item}", headers=auth).json()
    assert set(got_item) == ITEM_KEYS  # status_code_info, description and expiry are None: omitted
    got_account = decimal_json(http.get(f"/v3/aggregation/accounts/{account}", headers=auth))
    assert set(got_account) == ACCOUNT_KEYS - {"iban"}
    txns = decimal_json(http.get(f"/v3/aggregation/transactions?account_id={account}", headers=auth))[
        "resources"
    ]
    assert [set(t) for t in txns] == [TXN_KEYS, TXN_KEYS]
    snap = world.snapshot()
    assert got_item == snap["items"][item] and got_account == snap["accounts"][account]
    assert txns == [snap["transactions"][t["id"]] for t in txns]
    assert all(t["updated_at"].endswith("Z") and len(t["updated_at"]) == 24 for t in txns)


def test_amounts_are_rendered_exactly(world: World, http: httpx.Client) -> None:
    user, _, account = new_user(world, transactions=40)
    world.update_account(account, balance=Decimal("1234.50"), instant_balance="-0.10")
    first = world.add_transactions(account, 1)[0]
    world.update_transaction(first, amount=Decimal("-12.30"))
    auth = token_for(http, user)
    response = http.get(f"/v3/aggregation/transactions?account_id={account}&limit=100", headers=auth)
    assert '"amount":-12.30' in response.text
    txns = decimal_json(response)["resources"]
    snap = world.snapshot()["transactions"]
    for txn in txns:
        assert str(txn["amount"]) == str(snap[txn["id"]]["amount"])
        assert txn["amount"].as_tuple().exponent == -2
    assert {t["amount"] < 0 for t in txns} == {True, False}
    got = decimal_json(http.get(f"/v3/aggregation/accounts/{account}", headers=auth))
    assert (str(got["balance"]), str(got["instant_balance"])) == ("1234.50", "-0.10")


def test_updated_at_is_unique_and_increasing(world: World) -> None:
    _, _, account = new_user(world, transactions=50)
    snap = world.snapshot()["transactions"]
    stamps = [snap[i]["updated_at"] for i in sorted(snap) if snap[i]["account_id"] == account]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


# -- pagination and since -------------------------------------------------------------------------------
@pytest.mark.parametrize(("count", "limit", "pages"), [(23, 5, 5), (20, 5, 4), (3, 50, 1)])
def test_pagination_follows_next_uri(
    world: World, server: FakeBridgeServer, http: httpx.Client, count: int, limit: int, pages: int
) -> None:
    user, _, account = new_user(world, transactions=count)
    auth = token_for(http, user)
    rows = all_pages(http, server, f"/v3/aggregation/transactions?account_id={account}&limit={limit}", auth)
    expected = [t for t in world.snapshot()["transactions"].values() if t["account_id"] == account]
    assert rows == expected
    assert len([r for r in world.requests if r.path.endswith("/transactions")]) == pages


def test_pagination_limits_and_other_lists(
    world: World, server: FakeBridgeServer, http: httpx.Client
) -> None:
    user = world.add_user()
    items = [world.add_item(user) for _ in range(3)]
    accounts = [world.add_account(items[0]) for _ in range(4)] + [world.add_account(items[1])]
    auth = token_for(http, user)
    assert [i["id"] for i in all_pages(http, server, "/v3/aggregation/items?limit=2", auth)] == items
    assert [a["id"] for a in all_pages(http, server, "/v3/aggregation/accounts?limit=2", auth)] == accounts
    in_first = all_pages(http, server, f"/v3/aggregation/accounts?item_id={items[0]}&limit=3", auth)
    assert [a["id"] for a in in_first] == accounts[:4]
    for bad in ("limit=0", "limit=501", "limit=x", "after=x"):
        assert http.get(f"/v3/aggregation/accounts?{bad}", headers=auth).status_code == 400
    assert http.get("/v3/aggregation/accounts?item_id=1", headers=auth).status_code == 404


def test_pages_are_capped_at_500(world: World, http: httpx.Client) -> None:
    user, _, account = new_user(world, transactions=501)
    auth = token_for(http, user)
    url = f"/v3/aggregation/transactions?account_id={account}"
    full = http.get(f"{url}&limit=500", headers=auth).json()
    assert len(full["resources"]) == 500 and full["pagination"]["next_uri"] is not None
    too_big = http.get(f"{url}&limit=501", headers=auth)
    assert (too_big.status_code, too_big.json()["code"]) == (400, "invalid_parameter")
    assert "500" in too_big.json()["message"]


def test_since_returns_only_newer_changes_including_deletions(world: World, http: httpx.Client) -> None:
    user, _, account = new_user(world, transactions=10)
    ids = sorted(t["id"] for t in world.snapshot()["transactions"].values() if t["account_id"] == account)
    mark = world.now_iso()
    world.update_transaction(ids[2], amount="-1.00", future=False)
    world.delete_transaction(ids[5])
    added = world.add_transactions(account, 1)
    auth = token_for(http, user)
    url = f"/v3/aggregation/transactions?account_id={account}"
    for since in (mark, mark.replace("Z", "+00:00")):
        changed = http.get(url, params={"since": since}, headers=auth).json()["resources"]
        assert [(t["id"], t["deleted"]) for t in changed] == [
            (ids[2], False),
            (ids[5], True),
            (added[0], False),
        ]
    raw_plus = http.get(f"{url}&since={mark.replace('Z', '+00:00')}", headers=auth)  # "+" unencoded
    assert [t["id"] for t in raw_plus.json()["resources"]] == [ids[2], ids[5], added[0]]
    coarse = mark[:19] + "Z"  # without milliseconds: at least the same rows
    assert len(http.get(url, params={"since": coarse}, headers=auth).json()["resources"]) >= 3
    current = http.get(url, headers=auth).json()["resources"]
    assert ids[5] not in {t["id"] for t in current} and len(current) == 10
    everything = http.get("/v3/aggregation/transactions", params={"since": mark}, headers=auth).json()
    assert len(everything["resources"]) == 3
    assert http.get(url + "&since=yesterday", headers=auth).status_code == 400


def test_deleted_accounts_and_items_disappear(world: World, http: httpx.Client) -> None:
    user, item, account = new_user(world)
    other = world.add_account(item)
    auth = token_for(http, user)
    world.delete_account(account)
    assert http.get(f"/v3/aggregation/accounts/{account}", headers=auth).json()["code"] == "not_found"
    listed = http.get(f"/v3/aggregation/accounts?item_id={item}", headers=auth).json()["resources"]
    assert [a["id"] for a in listed] == [other]
    world.delete_item(item)
    assert http.get(f"/v3/aggregation/items/{item}", headers=auth).status_code == 404
    assert http.get(f"/v3/aggregation/accounts/{other}", headers=auth).status_code == 404
    stranger = token_for(http, new_user(world)[0])
    _, foreign_item, _ = new_user(world)
    assert http.get(f"/v3/aggregation/items/{foreign_item}", headers=stranger).status_code == 404


def test_status_1100_obfuscates_but_snapshot_keeps_real_values(world: World, http: httpx.Client) -> None:
    user, item, account = new_user(world, transactions=2)
    world.set_item_status(item, 1100, status_code_info="pro_verification")
    auth = token_for(http, user)
    got = http.get(f"/v3/aggregation/accounts/{account}", headers=auth).json()
    assert (got["iban"], got["name"]) == ("XXXX", "XXXX")
    txns = http.get(f"/v3/aggregation/transactions?account_id={account}", headers=auth).json()["resources"]
    assert {(t["clean_description"], t["provider_description"]) for t in txns} == {("XXXX", "XXXX")}
    item_view = http.get(f"/v3/aggregation/items/{item}", headers=auth).json()
    assert (item_view["status"], item_view["status_code_info"]) == (1100, "pro_verification")
    snap = world.snapshot()
    assert snap["accounts"][account]["iban"].startswith("FR76")
    assert "XXXX" not in {t["clean_description"] for t in snap["transactions"].values()}
    world.set_item_status(item, 0)
    assert http.get(f"/v3/aggregation/accounts/{account}", headers=auth).json()["iban"].startswith("FR76")
    refreshed = world.snapshot()
    assert refreshed["items"][item]["last_successful_refresh"] == refreshed["items"][item]["last_try_refresh"]
    assert refreshed["accounts"][account]["updated_at"] > refreshed["items"][item]["last_try_refresh"]


# -- faults and request log -----------------------------------------------------------------------------
def test_fail_next_and_rate_limit_next(world: World, http: httpx.Client) -> None:
    auth = token_for(http, new_user(world)[0])
    world.reset_requests()
    world.faults.fail_next(2, status=503)
    world.faults.rate_limit_next(1, retry_after=7)
    statuses = [http.get("/v3/aggregation/items", headers=auth) for _ in range(4)]
    assert [r.status_code for r in statuses] == [503, 503, 429, 200]
    assert statuses[0].json()["code"] == "service_unavailable"
    assert statuses[2].headers["Retry-After"] == "7"
    assert [r.status for r in world.requests] == [503, 503, 429, 200]
    assert all(r.path == "/v3/aggregation/items" and r.method == "GET" for r in world.requests)


def test_ratio_faults_are_seeded_and_cleared(world: World, http: httpx.Client) -> None:
    auth = token_for(http, new_user(world)[0])

    def run() -> list[int]:
        world.faults.set_ratios(p500=0.3, p429=0.3, retry_after=2, seed=42)
        return [http.get("/v3/aggregation/items", headers=auth).status_code for _ in range(30)]

    first, second = run(), run()
    assert first == second and {200, 429, 500} == set(first)
    world.faults.clear()
    assert {http.get("/v3/aggregation/items", headers=auth).status_code for _ in range(5)} == {200}


def test_fail_item_hits_every_route_about_that_item(world: World, http: httpx.Client) -> None:
    user, item, account = new_user(world)
    healthy_item = world.add_item(user)
    healthy_account = world.add_account(healthy_item)
    auth = token_for(http, user)
    world.faults.fail_item(item, status=502)
    concerned = [
        f"/v3/aggregation/items/{item}",
        f"/v3/aggregation/accounts?item_id={item}",
        f"/v3/aggregation/accounts/{account}",
        f"/v3/aggregation/transactions?account_id={account}",
    ]
    assert [http.get(path, headers=auth).status_code for path in concerned] == [502] * 4
    assert http.get(f"/v3/aggregation/accounts/{healthy_account}", headers=auth).status_code == 200
    assert http.get("/v3/aggregation/items", headers=auth).status_code == 200
    world.faults.unfail_item(item)
    assert [http.get(path, headers=auth).status_code for path in concerned] == [200] * 4
    assert [r.status for r in world.requests[-10:-4]] == [502, 502, 502, 502, 200, 200]


def test_delay_slows_every_response(world: World, http: httpx.Client) -> None:
    world.faults.delay(0.15)
    started = time.monotonic()
    assert http.get("/v3/aggregation/items").status_code == 401
    assert time.monotonic() - started >= 0.15
    world.faults.clear()
    started = time.monotonic()
    http.get("/v3/aggregation/items")
    assert time.monotonic() - started < 0.15


def test_request_log_records_user_and_status(world: World, http: httpx.Client) -> None:
    user, item, _ = new_user(world)
    auth = token_for(http, user)
    http.get(f"/v3/aggregation/items/{item}", headers=auth)
    http.get("/v3/aggregation/accounts", params={"limit": 10}, headers=auth)
    http.get("/v3/aggregation/items/999", headers=auth)
    log = world.requests
    assert [(r.method, r.status, r.user_uuid) for r in log] == [
        ("POST", 201, None),
        ("GET", 200, user),
        ("GET", 200, user),
        ("GET", 404, user),
    ]
    assert log[2].query == "limit=10" and log[0].time <= log[1].time <= log[3].time
    world.reset_requests()
    assert world.requests == []


# -- rate limits (budgets) ------------------------------------------------------------------------------
def items(http: httpx.Client, auth: dict[str, str]) -> httpx.Response:
    return http.get("/v3/aggregation/items", headers=auth)


def token_request(http: httpx.Client, **body: str) -> httpx.Response:
    return http.post("/v3/aggregation/authorization/token", json=body)


def test_sliding_window_arithmetic() -> None:
    budgets = World().budgets
    budgets.set(user=(2, 10))
    assert budgets.admit({"app": "c", "user": "u"}, now=0) is None
    assert budgets.admit({"app": "c", "user": "u"}, now=4) is None
    assert budgets.admit({"app": "c", "user": "u"}, now=5) == Refusal("user", 5)
    assert budgets.admit({"app": "c", "user": "u"}, now=9.5) == Refusal("user", 1)  # 0.5 s, rounded up
    assert budgets.admit({"app": "c", "user": "other"}, now=9.5) is None
    assert budgets.admit({"app": "c", "user": "u"}, now=10) is None  # the request at 0 has left
    assert budgets.admit({"app": "c", "user": "u"}, now=10.2) == Refusal("user", 4)  # the one at 4 next
    assert budgets.refused == {"app": 0, "user": 3, "token": 0}
    budgets.set(app=(1, 60), user=(1, 5))
    assert budgets.admit({"app": "c", "user": "u"}, now=100) is None
    assert budgets.admit({"app": "c", "user": "u"}, now=101) == Refusal("app", 59)  # the longest wait
    assert budgets.limits == {"app": (1, 60), "user": (1, 5), "token": None}
    with pytest.raises(ValueError, match="user budget"):
        budgets.set(user=(0, 60))
    budgets.clear()
    assert budgets.refused == {"app": 0, "user": 0, "token": 0}
    assert budgets.admit({"app": "c", "user": "u"}, now=101) is None


def test_user_budget_answers_429_with_retry_after(world: World, http: httpx.Client) -> None:
    user = new_user(world)[0]
    auth, other = token_for(http, user), token_for(http, new_user(world)[0])
    world.budgets.set(user=(3, 1))
    world.reset_requests()
    assert [items(http, auth).status_code for _ in range(3)] == [200] * 3
    refused = items(http, auth)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json() == {
        "code": "too_many_requests",
        "message": "user rate limit exceeded, retry in 1 s",
    }
    assert items(http, other).status_code == 200  # a budget per user
    assert [(r.status, r.user_uuid) for r in world.requests][3] == (429, user)
    assert world.budgets.refused == {"app": 0, "user": 1, "token": 0}
    time.sleep(int(refused.headers["Retry-After"]))
    assert items(http, auth).status_code == 200


def test_refused_requests_do_not_count(world: World, http: httpx.Client) -> None:
    auth = token_for(http, new_user(world)[0])
    world.budgets.set(user=(3, 1))
    started = time.monotonic()
    assert [items(http, auth).status_code for _ in range(3)] == [200] * 3
    hammering = []
    while time.monotonic() - started < 0.8:  # a client retrying too early, all the window long
        hammering.append(items(http, auth).status_code)
        time.sleep(0.05)
    assert set(hammering) == {429}
    time.sleep(max(0.0, started + 1.1 - time.monotonic()))
    assert [items(http, auth).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_sliding_window_has_no_double_burst_at_the_edge(world: World, http: httpx.Client) -> None:
    auth = token_for(http, new_user(world)[0])
    world.budgets.set(user=(3, 1))
    started = time.monotonic()
    assert items(http, auth).status_code == 200
    time.sleep(0.5)
    assert [items(http, auth).status_code for _ in range(2)] == [200, 200]
    time.sleep(max(0.0, started + 1.15 - time.monotonic()))
    # A fixed window would start afresh at 1 s and admit 3 more: 5 within 0.7 s. Only the first left.
    after_edge = [items(http, auth) for _ in range(3)]
    assert [r.status_code for r in after_edge] == [200, 429, 429]
    assert after_edge[1].headers["Retry-After"] == "1"


def test_app_budget_is_shared_by_all_users_and_all_or_none(world: World, http: httpx.Client) -> None:
    first, second = (token_for(http, new_user(world)[0]) for _ in range(2))
    world.budgets.set(app=(5, 10), user=(2, 10))
    assert [items(http, first).status_code for _ in range(3)] == [200, 200, 429]  # the user budget
    # The refusal above took nothing from the app budget: the second user still has 3 of its 5.
    assert [items(http, second).status_code for _ in range(2)] == [200, 200]
    assert token_request(http, user_uuid=new_user(world)[0]).status_code == 201
    wrong_secret = http.get("/v3/aggregation/items", headers={**first, "Client-Secret": "nope"})
    assert wrong_secret.status_code == 401  # credentials first: neither refused nor counted
    for refused in (items(http, second), token_request(http, user_uuid=new_user(world)[0])):
        assert (refused.status_code, refused.headers["Retry-After"]) == (429, "10")
        assert refused.json()["message"].startswith("app rate limit exceeded")
    assert world.budgets.refused == {"app": 2, "user": 1, "token": 0}
    assert [r.status for r in world.requests][-3:] == [401, 429, 429]


def test_token_budget_is_per_user_and_by_any_identifier(world: World, http: httpx.Client) -> None:
    user = world.add_user("ext-budget")
    other = new_user(world)[0]
    auth = token_for(http, user)
    world.budgets.set(token=(2, 1))
    assert [token_request(http, user_uuid=user).status_code for _ in range(2)] == [201, 201]
    refused = token_request(http, external_user_id="ext-budget")  # the same user, otherwise named
    assert (refused.status_code, refused.json()["code"]) == (429, "too_many_requests")
    assert refused.headers["Retry-After"] == "1"
    assert token_request(http, user_uuid=other).status_code == 201
    assert items(http, auth).status_code == 200  # only token requests count
    assert world.budgets.refused == {"app": 0, "user": 0, "token": 1}
    time.sleep(int(refused.headers["Retry-After"]))
    assert token_request(http, external_user_id="ext-budget").json()["user"]["uuid"] == user


# -- latency --------------------------------------------------------------------------------------------
def test_latency_draws_are_seeded_and_bounded() -> None:
    faults = World().faults
    faults.latency(mean=0.12, jitter=0.04, seed=3)
    draws = [faults.next_delay() for _ in range(500)]
    assert all(0.08 <= d <= 0.16 for d in draws) and sum(draws) / 500 == pytest.approx(0.12, abs=0.005)
    faults.latency(mean=0.12, jitter=0.04, seed=3)
    assert [faults.next_delay() for _ in range(500)] == draws
    faults.delay(1)
    assert 1.08 <= faults.next_delay() <= 1.16  # on top of the fixed delay
    assert faults.latency_seconds == (0.12, 0.04)
    faults.clear()
    assert (faults.next_delay(), faults.latency_seconds) == (0.0, (0.0, 0.0))
    with pytest.raises(ValueError, match="jitter"):
        faults.latency(mean=0.01, jitter=0.02)


def test_latency_slows_requests_without_blocking_the_others(world: World, http: httpx.Client) -> None:
    auth = token_for(http, new_user(world)[0])
    world.faults.latency(mean=0.1, jitter=0.05, seed=0)
    elapsed = []
    for _ in range(6):
        started = time.monotonic()
        assert items(http, auth).status_code == 200
        elapsed.append(time.monotonic() - started)
    assert all(0.05 <= e < 0.4 for e in elapsed) and 0.07 <= sum(elapsed) / 6 < 0.3
    world.faults.latency(mean=0.2, jitter=0.05)
    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda _: items(http, auth).status_code, range(10)))
    assert statuses == [200] * 10 and time.monotonic() - started < 1.0  # one after the other: >= 1.5 s
    world.faults.clear()
    started = time.monotonic()
    items(http, auth)
    assert time.monotonic() - started < 0.15


# -- CLI ------------------------------------------------------------------------------------------------
def test_cli_options_configure_latency_and_budgets() -> None:
    flags = "--latency-ms 120 --jitter-ms 40 --budget-app 2000/300 --budget-user 60/60 --budget-token 10/0.5"
    strict = make_world(parse_args(["serve", *flags.split()]))
    assert strict.budgets.limits == {"app": (2000, 300), "user": (60, 60), "token": (10, 0.5)}
    assert strict.faults.latency_seconds == pytest.approx((0.12, 0.04))
    lenient = make_world(parse_args(["serve"]))
    assert lenient.budgets.limits == {"app": None, "user": None, "token": None}
    assert lenient.faults.latency_seconds == (0.0, 0.0)
    for bad in (
        ["--budget-user", "60"],
        ["--budget-user", "0/60"],
        ["--budget-app", "x/1"],
        ["--budget-token", "10/0"],
        ["--latency-ms", "10", "--jitter-ms", "20"],
    ):
        with pytest.raises(SystemExit) as exited:
            parse_args(["serve", *bad])
        assert exited.value.code == 2


def test_cli_serves_with_its_budgets() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "fakebridge", "serve", "--port", str(port), "--budget-app", "2/60"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_BRIDGE_")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url, deadline = f"http://127.0.0.1:{port}/v3/aggregation/items", time.monotonic() + 10
        while True:
            try:
                first = httpx.get(url, headers=HEADERS)  # no bearer token: 401, counted all the same
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, "the CLI did not serve"
                time.sleep(0.05)
        statuses = [first.status_code] + [httpx.get(url, headers=HEADERS).status_code for _ in range(2)]
        assert statuses == [401, 401, 429]
    finally:
        process.terminate()
        process.wait(10)


# -- webhooks -------------------------------------------------------------------------------------------
class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/webhooks/bridge", _Receiver.received
    httpd.shutdown()
    httpd.server_close()


def test_webhook_sender_signs_the_raw_body(world: World, receiver: tuple[str, list[Any]]) -> None:
    url, received = receiver
    user, item, account = new_user(world)
    with WebhookSender(url, "whsec-1") as sender:
        assert sender.send(*world.event_item_created(item), timestamp_ms=1700000000000).status_code == 200
        sender.send(*world.event_account(account, "updated"))
    with WebhookSender(url, ["whsec-new", "whsec-old"]) as rotating:
        rotating.send_body(
            b'{"content":{},"timestamp":1,"type":"TEST_EVENT"}', headers={"X-Forwarded-For": "1.2.3.4"}
        )
    (h1, b1), (h2, b2), (h3, b3) = received
    assert (
        b1
        == b'{"content":{"item_id":%d,"user_uuid":"%s"},"timestamp":1700000000000,"type":"item.created"}'
        % (
            item,
            user.encode(),
        )
    )
    for headers, body in ((h1, b1), (h2, b2)):
        expected = hmac.new(b"whsec-1", body, hashlib.sha256).hexdigest().upper()
        assert headers["BridgeApi-Signature"] == f"v1={expected}"
        assert headers["Content-Type"] == "application/json"
    assert json.loads(b2)["content"]["nb_new_transactions"] == 3
    assert h3["BridgeApi-Signature"] == f"v1={sign(b3, 'whsec-new')},v1={sign(b3, 'whsec-old')}"
    assert h3["X-Forwarded-For"] == "1.2.3.4"


def test_event_contents(world: World) -> None:
    user, item, account = new_user(world, transactions=4)
    world.event_account(account, "updated")  # consumes the creation batch
    ids = world.add_transactions(account, 2)
    world.update_transaction(ids[0], clean_description="Changed")
    old = sorted(t for t, v in world.snapshot()["transactions"].items() if v["account_id"] == account)[0]
    world.update_transaction(old, amount="-3.00")
    world.delete_transaction(ids[1])
    kind, content = world.event_account(account, "updated")
    assert (kind, content["nb_new_transactions"], content["nb_updated_transactions"]) == (
        "item.account.updated",
        1,
        1,
    )
    assert content["nb_deleted_transactions"] == 0 and isinstance(content["balance"], Decimal)
    world.delete_transaction(old)
    assert world.event_account(account, "updated")[1]["nb_deleted_transactions"] == 1
    world.set_item_status(item, 1007, status_code_info="sca_required")
    assert world.event_item_refreshed(item) == (
        "item.refreshed",
        {
            "item_id": item,
            "user_uuid": user,
            "status_code": 1007,
            "status_code_info": "sca_required",
            "full_refresh": False,
            "refresh_trigger": "scheduled",
            "account_types": "payment",
        },
    )
    world.delete_account(account)
    assert world.event_account(account, "deleted") == (
        "item.account.deleted",
        {"item_id": item, "account_id": account, "user_uuid": user},
    )
    world.delete_user(user)
    assert world.event_item_deleted(item) == ("item.deleted", {"item_id": item, "user_uuid": user})
    assert world.event_user_deleted(user) == ("user.deleted", {"user_uuid": user})
    body = json.loads(webhook_body("item.created", {"amount": Decimal("-1.50")}, 5), parse_float=Decimal)
    assert str(body["content"]["amount"]) == "-1.50" and body["timestamp"] == 5


# -- seed_demo and a second world -----------------------------------------------------------------------
def test_seed_demo_over_http() -> None:
    world = World(client_id="demo-id", client_secret="demo-secret", page_limit_max=100)
    seed_demo(world)
    snap = world.snapshot()
    assert set(snap["items"]) == {4568477, 4568565, 6365343}
    assert set(snap["accounts"]) == {22908770, 22908771, 22908780, 16623323}
    assert snap["items"][4568565]["status"] == 1003
    by_account: dict[int, list[Any]] = {}
    for txn in snap["transactions"].values():
        by_account.setdefault(txn["account_id"], []).append(txn)
    assert {k: len(v) for k, v in by_account.items() if k != 16623323} == {
        22908770: 120,
        22908771: 30,
        22908780: 10,
    }
    assert 0 < sum(t["future"] for t in by_account[22908770]) < 10
    assert {t["operation_type"] for t in by_account[22908770]} >= {"card", "transfer", "deferred_debit_card"}
    headers = {**HEADERS, "Client-Id": "demo-id", "Client-Secret": "demo-secret"}
    with FakeBridgeServer(world) as server, httpx.Client(base_url=server.url, headers=headers) as http:
        assert server.api_url == server.url + "/v3/aggregation"
        token = http.post("/v3/aggregation/authorization/token", json={"external_user_id": "demo-user"})
        auth = {"Authorization": f"Bearer {token.json()['access_token']}"}
        rows = all_pages(http, server, "/v3/aggregation/transactions?limit=100", auth)
        assert len(rows) == 160 and [r["id"] for r in rows] == sorted(r["id"] for r in rows)
        assert http.get("/v3/aggregation/transactions?limit=101", headers=auth).status_code == 400
        items = http.get("/v3/aggregation/items", headers=auth).json()["resources"]
        assert [i["id"] for i in items] == [4568477, 4568565]


def test_a_page_size_serves_fewer_than_asked(fake: FakeBridgeServer, world: World) -> None:
    """``World(page_size=…)``: Bridge may serve fewer than ``limit``; next_uri goes on from there."""
    world.page_size = 3
    user = world.add_user()
    account = world.add_account(world.add_item(user))
    ids = world.add_transactions(account, 7)
    token = world.issue_token(user)
    assert token is not None
    headers = {"Authorization": f"Bearer {token['access_token']}", "Client-Id": world.client_id,
               "Client-Secret": world.client_secret, "Bridge-Version": "2025-01-15"}  # fmt: skip
    seen, url = [], f"{fake.api_url}/transactions?account_id={account}&limit=500"
    root = fake.api_url.split("/v3/")[0]
    while url:
        page = httpx.get(url, headers=headers).json()
        assert len(page["resources"]) <= 3
        seen += [t["id"] for t in page["resources"]]
        nxt = page["pagination"]["next_uri"]
        url = root + nxt if nxt else ""
    assert seen == ids
