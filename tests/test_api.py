"""The application API and the end of Connect, end to end: the API over the real app, the fake Bridge
over HTTP (its Connect page sends its webhooks to the real receiver), real RQ workers, on SQLite and
PostgreSQL; then bad input on every endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from starlette.testclient import TestClient

from api.app import create_app
from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from tests.harness import Harness, worker_settings
from workers.context import WorkerContext

TOKEN, OLD_TOKEN = "api-token-0123456789", "api-token-previous-987"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RETURN = "https://app.example/back"
CALLBACK = "http://testserver/connect/callback"
# Every table that may hold a row of a user (erased_users keeps only ids, by design).
USER_TABLES = ("users", "items", "accounts", "transactions", "webhook_events", "connect_sessions")


class Flow:
    """The harness (receiver, workers, database) and a client of the API beside it."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.context = WorkerContext.build(harness.settings)
        self.api = TestClient(create_app(harness.settings, self.context))
        self.api.__enter__()

    def close(self) -> None:
        self.api.__exit__(None, None, None)
        self.context.close()

    def connect(self, url: str, query: str = "") -> dict[str, str]:
        """The user's browser: the fake's Connect page, then our callback; the parameters it returns
        with to the application."""
        page = httpx.get(url + query)
        assert page.status_code == 303, page.text
        callback = page.headers["location"]
        assert callback.startswith(CALLBACK + "?")
        back = self.h.receiver.get(callback.removeprefix("http://testserver"), follow_redirects=False)
        return returned(back)

    def count(self, table: str) -> int:
        [(n,)] = self.h.rows(f"SELECT count(*) FROM {table}")  # noqa: S608
        return int(n)


def returned(response: httpx.Response) -> dict[str, str]:
    """Where a callback sent the browser: the application's page, and the parameters it carries."""
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == RETURN
    assert response.content == b""  # never a page
    return {k: v[0] for k, v in parse_qs(location.query).items()}


API_ENV = {
    "API_TOKENS": f"{TOKEN},{OLD_TOKEN}",
    "CONNECT_CALLBACK_URL": CALLBACK,
    "CONNECT_RETURN_URL": RETURN,
}


@pytest.fixture
def flow(
    redis_url: str, r: redis.Redis, database_url: str, world: World, fake: FakeBridgeServer
) -> Iterator[Flow]:
    harness = Harness(
        worker_settings(redis_url, database_url, fake.api_url, world, **API_ENV), world, fake, r
    )
    world.webhooks = lambda kind, content: harness.send((kind, content))  # Connect page → our receiver
    f = Flow(harness)
    yield f
    f.close()
    harness.close()


def test_the_whole_flow(flow: Flow, world: World) -> None:
    api, h = flow.api, flow.h
    created = api.put("/v1/users/app-user.1@x", headers=AUTH)
    assert created.status_code == 201
    uuid = created.json()["uuid"]
    assert created.json() == {"external_user_id": "app-user.1@x", "uuid": uuid, "provider": "bridge"}
    assert world.user_by_external_id("app-user.1@x") == uuid
    again = api.put("/v1/users/app-user.1@x", headers={"Authorization": f"Bearer {OLD_TOKEN}"})
    assert (again.status_code, again.json()["uuid"]) == (200, uuid)

    session = api.post("/v1/users/app-user.1@x/connect-sessions", headers=AUTH,
                       json={"user_email": "ann@example.fr", "context": "onboarding-7"})  # fmt: skip
    assert session.status_code == 201
    back = flow.connect(session.json()["url"])
    [item] = [i["id"] for i in world.api_items(uuid)]
    assert back == {"item_id": str(item), "success": "true", "context": "onboarding-7"}
    world.reset_requests()
    h.drain()
    assert h.failed_ids() == []
    # The callback's sync coalesced with the webhooks': three jobs read the item (item.created,
    # item.account.created, item.refreshed), the callback's was served by the last one's sync.
    assert [q.path for q in world.requests].count(f"/v3/aggregation/items/{item}") == 3
    tables, truth = h.tables(), h.truth()
    assert tables["transactions"] == truth["transactions"] and len(tables["transactions"]) == 12

    [listed] = api.get("/v1/users/app-user.1@x/items", headers=AUTH).json()["items"]
    [account] = world.api_accounts(uuid, item) or []
    assert listed["item_id"] == item and listed["status"] == 0 and listed["action"] is None
    assert listed["last_connect"]["success"] is True and listed["consent_expires_at"] is not None
    assert listed["accounts"] == [
        {"account_id": account["id"], "name": "Compte courant", "type": "checking",
         "balance": str(account["balance"]), "currency_code": "EUR",
         "iban_masked": "FR76*******************0189", "data_access": "enabled", "last_refresh_ok": True}
    ]  # fmt: skip

    pages, cursor = [], None
    while True:
        page = api.get("/v1/users/app-user.1@x/transactions", headers=AUTH,
                       params={"limit": 5, **({"cursor": cursor} if cursor else {})}).json()  # fmt: skip
        pages.append(page["transactions"])
        if not (cursor := page["next_cursor"]):
            break
    seen = [t for p in pages for t in p]
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [(t["date"], t["transaction_id"]) for t in seen] == sorted(
        ((t["date"], t["id"]) for t in world.api_transactions(uuid) or []), reverse=True
    )
    assert {t["clean_description"] for t in seen} <= {
        t["clean_description"] for t in truth["transactions"].values()
    }
    # A transaction Bridge deletes leaves the default listing, and shows with include_deleted.
    gone = seen[0]["transaction_id"]
    world.delete_transaction(gone)
    h.send(world.event_account(account["id"]))
    h.drain()
    live = api.get("/v1/users/app-user.1@x/transactions", headers=AUTH).json()["transactions"]
    query = {"include_deleted": "true", "account_id": account["id"]}
    every = api.get("/v1/users/app-user.1@x/transactions", headers=AUTH, params=query).json()["transactions"]
    assert gone not in {t["transaction_id"] for t in live} and len(live) == 11
    assert [t["deleted_at"] is not None for t in every if t["transaction_id"] == gone] == [True]
    since = api.get("/v1/users/app-user.1@x/transactions", headers=AUTH, params={"since": seen[5]["date"]})
    assert all(t["date"] >= seen[5]["date"] for t in since.json()["transactions"])

    # The bank wants new credentials: the item says so, in the user's language, as Bridge words it.
    world.set_item_status(item, 402)
    h.send(world.event_item_refreshed(item))
    h.drain()
    fr = api.get("/v1/users/app-user.1@x/items", headers=AUTH | {"Accept-Language": "fr-FR,fr;q=0.9"})
    en = api.get("/v1/users/app-user.1@x/items", headers=AUTH | {"Accept-Language": "en-GB"})
    assert fr.json()["items"][0]["action"] == "update_credentials"
    assert fr.json()["items"][0]["status_code_description"] == "Identifiants incorrects"
    assert en.json()["items"][0]["status_code_description"] == "Wrong credentials"

    # The repair flow: a session for that item, the user goes through, the item is usable again.
    repair = api.post("/v1/users/app-user.1@x/connect-sessions", headers=AUTH,
                      json={"user_email": "ann@example.fr", "item_id": item})  # fmt: skip
    assert flow.connect(repair.json()["url"])["item_id"] == str(item)
    h.drain()
    [fixed] = api.get("/v1/users/app-user.1@x/items", headers=AUTH).json()["items"]
    assert (fixed["status"], fixed["action"]) == (0, None)

    # A user who leaves Connect: recorded, nothing synced.
    left = api.post("/v1/users/app-user.1@x/connect-sessions", headers=AUTH,
                    json={"user_email": "ann@example.fr", "item_id": item})  # fmt: skip
    assert flow.connect(left.json()["url"], "?success=false&step=otp_form") == {
        "item_id": str(item), "success": "false", "step": "otp_form"
    }  # fmt: skip
    h.drain()
    [after] = api.get("/v1/users/app-user.1@x/items", headers=AUTH).json()["items"]
    assert after["last_connect"]["success"] is False and after["last_connect"]["step"] == "otp_form"

    # The customer leaves: gone at Bridge, and no row of theirs here.
    assert api.delete("/v1/users/app-user.1@x", headers=AUTH).status_code == 204
    assert uuid in world.snapshot()["deleted"]["users"]
    assert {t: flow.count(t) for t in USER_TABLES} == dict.fromkeys(USER_TABLES, 0)
    assert not h.r.exists(f"bridgehook:token:{uuid}")
    assert api.delete("/v1/users/app-user.1@x", headers=AUTH).status_code == 204  # idempotent
    assert api.get("/v1/users/app-user.1@x/items", headers=AUTH).status_code == 404
    # Bridge's own user.deleted, arriving after: still nothing.
    h.send(world.event_user_deleted(uuid))
    h.drain()
    assert {t: flow.count(t) for t in USER_TABLES} == dict.fromkeys(USER_TABLES, 0)


def test_put_recovers_a_user_bridge_already_has(flow: Flow, world: World) -> None:
    uuid = world.add_user("app-known")  # created at Bridge by an earlier deployment, say
    answer = flow.api.put("/v1/users/app-known", headers=AUTH)
    assert answer.status_code == 200 and answer.json()["uuid"] == uuid
    assert flow.h.rows("SELECT uuid, external_user_id FROM users") == [(uuid, "app-known")]


# -- bad input ----------------------------------------------------------------------------------------

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
ENDPOINTS = [
    ("PUT", "/v1/users/u1", None),
    ("DELETE", "/v1/users/u1", None),
    ("POST", "/v1/users/u1/connect-sessions", {"user_email": "a@b.fr"}),
    ("GET", "/v1/users/u1/items", None),
    ("GET", "/v1/users/u1/transactions", None),
]


@SQLITE
@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
@pytest.mark.parametrize(
    "auth",
    [
        None,
        "Bearer",
        "Bearer wrong-token-0000",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"bearer  {TOKEN[:-1]}",
    ],
)
def test_every_call_needs_a_token(flow: Flow, method: str, path: str, body: Any, auth: str | None) -> None:
    answer = flow.api.request(method, path, json=body, headers={"Authorization": auth} if auth else {})
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized" and answer.headers["www-authenticate"] == "Bearer"
    assert flow.h.world.requests == []  # Bridge never asked


@SQLITE
@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_unknown_users_are_404(flow: Flow, method: str, path: str, body: Any) -> None:
    if method == "PUT":
        return  # PUT creates
    answer = flow.api.request(method, path, json=body, headers=AUTH)
    assert (answer.status_code, answer.json()["error"]) == (404, "user_not_found")


@SQLITE
@pytest.mark.parametrize("bad", ["a b", "x" * 129, "caf%C3%A9", "a%2Fb", "a;b", "%00"])
@pytest.mark.parametrize(("method", "suffix"), [("PUT", ""), ("DELETE", ""), ("GET", "/items")])
def test_malformed_user_ids_are_400(flow: Flow, bad: str, method: str, suffix: str, world: World) -> None:
    answer = flow.api.request(method, f"/v1/users/{bad}{suffix}", headers=AUTH)
    assert answer.status_code in (400, 404)  # a / is another path: 404, never a Bridge call
    if answer.status_code == 400:
        assert answer.json() == {"error": "invalid_user_id", "detail": answer.json()["detail"]}
    assert world.requests == []


@SQLITE
@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"user_email": "not-an-email"}, "invalid_email"),
        ({}, "invalid_email"),
        ({"user_email": "a@b.fr", "context": "x" * 101}, "invalid_context"),
        ({"user_email": "a@b.fr", "context": "line\r\nSet-Cookie: x=1"}, "invalid_context"),
        ({"user_email": "a@b.fr", "context": 7}, "invalid_context"),
        ({"user_email": "a@b.fr", "item_id": "1"}, "invalid_item_id"),
        ({"user_email": "a@b.fr", "item_id": True}, "invalid_item_id"),
        ({"user_email": "a@b.fr", "item_id": -1}, "invalid_item_id"),
        ([], "invalid_body"),
    ],
)
def test_sessions_refuse_bad_bodies(flow: Flow, body: Any, error: str) -> None:
    flow.api.put("/v1/users/u1", headers=AUTH)
    answer = flow.api.post("/v1/users/u1/connect-sessions", json=body, headers=AUTH)
    assert (answer.status_code, answer.json()["error"]) == (400, error)


@SQLITE
def test_sessions_and_transactions_refuse_what_is_not_the_users(flow: Flow, world: World) -> None:
    flow.api.put("/v1/users/u1", headers=AUTH)
    other = world.add_user("u2")
    item = world.add_item(other)
    account = world.add_account(item)
    flow.h.send(world.event_item_created(item))
    flow.h.drain()
    session = flow.api.post("/v1/users/u1/connect-sessions", headers=AUTH,
                            json={"user_email": "a@b.fr", "item_id": item})  # fmt: skip
    assert (session.status_code, session.json()["error"]) == (404, "item_not_found")
    listing = flow.api.get("/v1/users/u1/transactions", params={"account_id": account}, headers=AUTH)
    assert (listing.status_code, listing.json()["error"]) == (404, "account_not_found")
    assert flow.api.get("/v1/users/u1/transactions", headers=AUTH).json()["transactions"] == []


@SQLITE
@pytest.mark.parametrize(
    "query", ["limit=0", "limit=501", "limit=x", "since=yesterday", "cursor=bm9wZQ", "cursor=%%%",
              "include_deleted=yes", "account_id=0", "account_id=-99999999999999999999",
              "cursor=WyIyMDI2LTAxLTAxIiwgMTAwMDAwMDAwMDAwMDAwMDAwMDAwMF0="]
)  # fmt: skip
def test_transactions_refuse_bad_queries(flow: Flow, query: str) -> None:
    flow.api.put("/v1/users/u1", headers=AUTH)
    answer = flow.api.get(f"/v1/users/u1/transactions?{query}", headers=AUTH)
    assert answer.status_code == 400 and set(answer.json()) == {"error", "detail"}


@SQLITE
def test_bodies_over_16_kib_are_413(flow: Flow) -> None:
    flow.api.put("/v1/users/u1", headers=AUTH)
    big = {"user_email": "a@b.fr", "padding": "x" * 16384}
    answer = flow.api.post("/v1/users/u1/connect-sessions", json=big, headers=AUTH)
    assert (answer.status_code, answer.json()["error"]) == (413, "body_too_large")
    streamed = flow.api.post("/v1/users/u1/connect-sessions", headers=AUTH,
                             content=iter([b"{" + b" " * 9000, b" " * 9000 + b"}"]))  # fmt: skip
    assert streamed.status_code == 413  # no Content-Length: counted as it comes


# -- the end of Connect, on the receiver ------------------------------------------------------------

USER = "766b2f5d-a942-492c-9ea7-2e5aa88cb672"


@SQLITE
@pytest.mark.parametrize(
    "query",
    [
        "", "success=true", f"user_uuid={USER}", "user_uuid=nope&success=true",
        f"user_uuid={USER}&success=maybe", f"user_uuid={USER}&success=true&item_id=abc",
        f"user_uuid={USER}&success=true&item_id=99999999999999999999",
        f"user_uuid={USER}&success=true&context=%0D%0ALocation:%20https://evil.example",
        f"user_uuid={USER}&success=true&context={'x' * 101}",
        f"user_uuid={USER}&success=false&step=%3Cscript%3E",
        f"user_uuid={USER}&uuid={USER}&success=true",
    ],
)  # fmt: skip
def test_invalid_callbacks_go_back_with_an_error(flow: Flow, query: str) -> None:
    answer = flow.h.receiver.get(f"/connect/callback?{query}", follow_redirects=False)
    assert returned(answer) == {"error": "invalid_callback"}
    assert flow.h.r.llen("rq:queue:bridgehook") == 0


@SQLITE
def test_a_hostile_context_goes_back_encoded_and_unknown_users_change_nothing(flow: Flow) -> None:
    context = '"><script>alert(1)</script>&success=false#'
    params = {"user_uuid": USER, "item_id": "42", "success": "true", "context": context}
    answer = flow.h.receiver.get("/connect/callback", params=params, follow_redirects=False)
    assert returned(answer) == {"item_id": "42", "success": "true", "context": context}
    assert "<script>" not in answer.headers["location"]
    flow.h.drain()  # the job: a user we do not know is recorded nowhere, and nothing is synced
    assert flow.count("connect_sessions") == 0 and flow.count("items") == 0
    assert flow.h.world.requests == []


@SQLITE
def test_callbacks_have_a_rate_limit_of_their_own(
    redis_url: str, r: redis.Redis, database_url: str, world: World, fake: FakeBridgeServer
) -> None:
    env = API_ENV | {"CONNECT_CALLBACK_RATE_LIMIT": "2/60"}
    h = Harness(worker_settings(redis_url, database_url, fake.api_url, world, **env), world, fake, r)
    try:
        answers = [
            returned(
                h.receiver.get(f"/connect/callback?user_uuid={USER}&success=true", follow_redirects=False)
            )
            for _ in range(4)
        ]
        assert answers == [{"success": "true"}] * 2 + [{"error": "busy"}] * 2
        assert r.llen("rq:queue:bridgehook") == 2
    finally:
        h.close()
