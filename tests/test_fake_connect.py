"""The fake Bridge's users, Connect sessions, Connect page and status descriptions, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from fakebridge import FakeBridgeServer, WebhookSender, World

HEADERS = {
    "Client-Id": "fake-client-id",
    "Client-Secret": "fake-client-secret",
    "Bridge-Version": "2025-01-15",
}
CALLBACK = "https://app.example/connect/callback"


@pytest.fixture
def world() -> World:
    return World(seed=3)


@pytest.fixture
def http(world: World) -> Iterator[httpx.Client]:
    with FakeBridgeServer(world) as server, httpx.Client(base_url=server.url, headers=HEADERS) as client:
        yield client


def token(http: httpx.Client, **who: str) -> dict[str, str]:
    response = http.post("/v3/aggregation/authorization/token", json=who)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def session(http: httpx.Client, auth: dict[str, str], **body: Any) -> httpx.Response:
    return http.post("/v3/aggregation/connect-sessions", json={"user_email": "a@b.fr", **body}, headers=auth)


def test_users_are_created_found_by_external_id_and_deleted(world: World, http: httpx.Client) -> None:
    created = http.post("/v3/aggregation/users", json={"external_user_id": "app-42"})
    assert created.status_code == 201
    uuid = created.json()["uuid"]
    assert created.json() == {"uuid": uuid, "external_user_id": "app-42"}
    again = http.post("/v3/aggregation/users", json={"external_user_id": "app-42"})
    assert again.status_code == 409  # taken: the caller recovers the user by its external id
    found = http.post("/v3/aggregation/authorization/token", json={"external_user_id": "app-42"})
    assert found.json()["user"] == {"uuid": uuid, "external_user_id": "app-42"}
    assert http.delete(f"/v3/aggregation/users/{uuid}").status_code == 204
    assert http.delete(f"/v3/aggregation/users/{uuid}").status_code == 404
    gone = http.post("/v3/aggregation/authorization/token", json={"external_user_id": "app-42"})
    assert gone.status_code == 404
    assert world.snapshot()["deleted"]["users"] == [uuid]


def test_connect_creates_an_item_sends_its_webhooks_and_redirects(world: World, http: httpx.Client) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    world.webhooks = lambda kind, content: sent.append((kind, content))
    user = world.add_user("app-1")
    opened = session(http, token(http, user_uuid=user), callback_url=CALLBACK, context="a&b=<c>")
    assert opened.status_code == 201
    page = opened.json()["url"]
    answer = httpx.get(page)  # a browser: no client credentials
    assert answer.status_code == 303
    location = urlsplit(answer.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == CALLBACK
    params = {k: v[0] for k, v in parse_qs(location.query).items()}
    [item] = world.api_items(user)
    assert params == {"user_uuid": user, "item_id": str(item["id"]), "success": "true", "context": "a&b=<c>"}
    assert [kind for kind, _ in sent] == ["item.created", "item.account.created", "item.refreshed"]
    assert all(content["user_uuid"] == user for _, content in sent)
    assert world.api_transactions(user)  # a history to sync
    assert httpx.get(page).status_code == 404  # a page serves once


def test_connect_repairs_the_sessions_item(world: World, http: httpx.Client) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    world.webhooks = lambda kind, content: sent.append((kind, content))
    user = world.add_user("app-2")
    item = world.add_item(user, status=402)
    world.add_account(item)
    opened = session(http, token(http, user_uuid=user), callback_url=CALLBACK, item_id=item)
    answer = httpx.get(opened.json()["url"])
    assert parse_qs(urlsplit(answer.headers["location"]).query)["item_id"] == [str(item)]
    assert world.api_item(user, item)["status"] == 0  # type: ignore[index]
    assert [kind for kind, _ in sent] == ["item.refreshed", "item.account.updated"]


def test_a_user_who_leaves_connect_changes_nothing(world: World, http: httpx.Client) -> None:
    sent: list[Any] = []
    world.webhooks = lambda kind, content: sent.append(kind)
    user = world.add_user("app-3")
    opened = session(http, token(http, user_uuid=user), callback_url=CALLBACK)
    answer = httpx.get(opened.json()["url"] + "?success=false&step=otp_form")
    params = parse_qs(urlsplit(answer.headers["location"]).query)
    assert params == {"user_uuid": [user], "success": ["false"], "step": ["otp_form"]}
    assert world.api_items(user) == [] and sent == []


def test_sessions_refuse_bad_input(world: World, http: httpx.Client) -> None:
    user, other = world.add_user("app-4"), world.add_user("app-5")
    others_item = world.add_item(other)
    auth = token(http, user_uuid=user)
    assert http.post("/v3/aggregation/connect-sessions", json={"user_email": "a@b.fr"}).status_code == 401
    assert session(http, auth, user_email="not-an-email").status_code == 400
    assert session(http, auth, context="x" * 101).status_code == 400
    assert session(http, auth, callback_url="javascript:alert(1)").status_code == 400
    assert session(http, auth, item_id=others_item).status_code == 404
    assert http.get("/connect/unknown").status_code == 404


@pytest.mark.parametrize(
    ("header", "text"),
    [("fr-FR,fr;q=0.9", "Identifiants incorrects"), ("en", "Wrong credentials"), (None, "Wrong credentials"),
     ("de, fr;q=0.5", "Identifiants incorrects")],
)  # fmt: skip
def test_status_descriptions_follow_accept_language(
    world: World, http: httpx.Client, header: str | None, text: str
) -> None:
    user = world.add_user()
    item = world.add_item(user, status=402)
    auth = token(http, user_uuid=user) | ({"Accept-Language": header} if header else {})
    assert http.get(f"/v3/aggregation/items/{item}", headers=auth).json()["status_code_description"] == text
    [listed] = http.get("/v3/aggregation/items", headers=auth).json()["resources"]
    assert listed["status_code_description"] == text


def test_the_cli_sends_the_connect_webhooks_where_it_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from fakebridge.__main__ import make_world, parse_args

    assert make_world(parse_args(["serve"])).webhooks is None
    with pytest.raises(SystemExit, match="FAKE_BRIDGE_WEBHOOK_SECRET"):
        make_world(parse_args(["serve", "--webhook-url", "http://127.0.0.1:9/webhooks/bridge"]))
    monkeypatch.setenv("FAKE_BRIDGE_WEBHOOK_SECRET", "whsec-0123456789")
    world = make_world(parse_args(["serve", "--webhook-url", "http://127.0.0.1:9/webhooks/bridge"]))
    sender = getattr(world.webhooks, "__self__", None)  # the bound WebhookSender.send
    assert isinstance(sender, WebhookSender) and sender.secrets == ["whsec-0123456789"]
    assert sender.receiver_url == "http://127.0.0.1:9/webhooks/bridge"
