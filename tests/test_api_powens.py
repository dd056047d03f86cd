"""The application API with Powens beside Bridge: a Powens user made through the API (its token stored
encrypted), its connection's data read back with Bridge's, and its deletion at Powens and here; on
SQLite and PostgreSQL, against both fakes over HTTP."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from starlette.testclient import TestClient

from api.app import create_app
from fakebridge.powens import FakePowensServer
from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from service import bearer
from tests.harness import worker_settings
from tests.powens_harness import PowensHarness, powens_environ
from tests.test_api import API_ENV, AUTH
from workers.context import WorkerContext
from workers.providers import powens_user_id


@pytest.fixture
def api(
    redis_url: str,
    r: redis.Redis,
    database_url: str,
    world: World,
    fake: FakeBridgeServer,
    fake_powens: FakePowensServer,
) -> Iterator[tuple[PowensHarness, TestClient]]:
    env = API_ENV | powens_environ(fake_powens, fake_powens.world)
    h = PowensHarness(
        worker_settings(redis_url, database_url, fake.api_url, world, **env), world, fake, r, fake_powens
    )
    context = WorkerContext.build(h.settings)
    with TestClient(create_app(h.settings, context)) as client:
        yield h, client
    context.close()
    h.close()


def test_a_powens_user_made_read_and_deleted_through_the_api(api: tuple[PowensHarness, TestClient]) -> None:
    h, client = api
    made = client.put("/v1/users/u-1?provider=powens", headers=AUTH)
    assert made.status_code == 201, made.text
    uuid = made.json()["uuid"]
    assert made.json()["provider"] == "powens" and uuid.startswith("powens-")
    again = client.put("/v1/users/u-1?provider=powens", headers=AUTH)
    assert (again.status_code, again.json()["uuid"]) == (200, uuid)
    user = h.pworld.users[powens_user_id(uuid)]
    [(stored,)] = h.rows("SELECT token FROM user_tokens WHERE user_uuid = %s", (uuid,))
    assert stored.startswith("bh1:") and user.token not in stored  # encrypted, like bank data
    assert client.put("/v1/users/u-1", headers=AUTH).status_code == 201  # and a Bridge user, beside

    connection = h.pworld.add_connection(user.id, accounts=1, transactions=4)
    [account] = [a for a in h.pworld.accounts.values() if a.id_connection == connection.id]
    h.pworld.enable_account(account.id)
    assert h.deliver("CONNECTION_SYNCED", h.pworld.synced(connection.id)) == "queued"
    h.drain()
    items = client.get("/v1/users/u-1/items", headers=AUTH).json()["items"]
    [item] = [i for i in items if i["provider"] == "powens"]
    assert item["item_id"] == -connection.id and item["action"] is None
    assert [a["account_id"] for a in item["accounts"]] == [-account.id]
    page = client.get(f"/v1/users/u-1/transactions?account_id={-account.id}", headers=AUTH).json()
    assert sorted(t["transaction_id"] for t in page["transactions"]) == sorted(
        -t.id for t in h.pworld.transactions.values()
    )

    assert client.delete("/v1/users/u-1", headers=AUTH).status_code == 204
    assert user.id not in h.pworld.users  # deleted at Powens first
    assert h.rows("SELECT uuid FROM users") == [] and h.rows("SELECT user_uuid FROM user_tokens") == []
    assert h.rows("SELECT id FROM transactions") == []
    assert client.delete("/v1/users/u-1", headers=AUTH).status_code == 204  # idempotent


def test_an_unknown_provider_is_400(api: tuple[PowensHarness, TestClient]) -> None:
    _, client = api
    answer = client.put("/v1/users/u-1?provider=plaid", headers=AUTH)
    assert (answer.status_code, answer.json()["error"]) == (400, "invalid_provider")


def test_powens_failing_is_answered_as_powens(api: tuple[PowensHarness, TestClient]) -> None:
    h, client = api
    h.pworld.faults.fail_next(10, 503)  # every attempt of the client's
    answer = client.put("/v1/users/u-2?provider=powens", headers=AUTH)
    assert (answer.status_code, answer.json()["error"]) == (503, "powens_unavailable")
    assert "Retry-After" in answer.headers
    assert h.rows("SELECT uuid FROM users") == []


def test_powens_not_configured_is_400(api: tuple[PowensHarness, TestClient]) -> None:
    h, _ = api
    settings = replace(h.settings, powens_api_url=None)
    context = WorkerContext.build(settings)
    with TestClient(create_app(settings, context)) as client:
        answer = client.put("/v1/users/u-3?provider=powens", headers=AUTH)
    context.close()
    assert (answer.status_code, answer.json()["error"]) == (400, "provider_not_configured")


def test_put_publishes_the_tokens_digest_and_delete_removes_it(api: tuple[PowensHarness, TestClient]) -> None:
    """For the receiver's bearer mode (service/bearer.py), which reads the digest from Redis."""
    h, client = api
    uuid = client.put("/v1/users/u-4?provider=powens", headers=AUTH).json()["uuid"]
    user = h.pworld.users[powens_user_id(uuid)]
    assert h.r.hgetall(bearer.KEY) == {
        str(user.id).encode(): hashlib.sha256(user.token.encode()).hexdigest().encode()
    }
    assert client.delete("/v1/users/u-4", headers=AUTH).status_code == 204
    assert h.r.hgetall(bearer.KEY) == {}
