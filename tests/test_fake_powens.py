"""The fake Powens: its ground truth over HTTP, as a sync will read it, and its signed webhooks."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from bridgehook import powens_send
from fakebridge.powens import FakePowensServer, PowensSender, now_header
from fakebridge.powens import sign as fake_sign
from fakebridge.powens_demo import demo_world
from fakebridge.powens_world import PowensWorld
from service.powens import sign as receiver_sign
from service.settings import Settings
from tests.support import POWENS_SECRET, queued_ids, running_receiver
from workers import powens_rows


def user_client(server: FakePowensServer) -> tuple[httpx.Client, int]:
    """A user made through /auth/init, and a client carrying its permanent token."""
    world = server.world
    answer = httpx.post(
        server.api_url + "/auth/init",
        json={"client_id": world.client_id, "client_secret": world.client_secret},
    )
    assert answer.status_code == 200 and answer.json()["type"] == "permanent"
    token, user_id = answer.json()["auth_token"], answer.json()["id_user"]
    return httpx.Client(base_url=server.api_url, headers={"Authorization": f"Bearer {token}"}), user_id


def all_pages(client: httpx.Client, url: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    next_url: str | None = url
    while next_url:
        page = client.get(next_url.removeprefix("/2.0"))
        assert page.status_code == 200, page.text
        rows += page.json()["transactions"]
        link = page.json()["_links"]["next"]
        next_url = link["href"] if link else None
    return rows


def test_auth_is_the_users_own_token(fake_powens: FakePowensServer) -> None:
    client, user_id = user_client(fake_powens)
    assert httpx.get(fake_powens.api_url + f"/users/{user_id}/accounts").status_code == 401
    assert client.get("/users/999999/accounts").json()["code"] == "forbidden"
    refused = httpx.post(fake_powens.api_url + "/auth/init", json={"client_id": "x", "client_secret": "y"})
    assert refused.status_code == 401 and refused.json()["code"] == "invalidClient"
    assert client.get(f"/users/{user_id}/accounts").status_code == 200
    assert client.get("/users/me/connections").json() == {"connections": [], "total": 0}


def test_accounts_are_disabled_until_consent(
    fake_powens: FakePowensServer, powens_world: PowensWorld
) -> None:
    client, user_id = user_client(fake_powens)
    connection = powens_world.add_connection(user_id, accounts=2, transactions=3)
    assert client.get("/users/me/accounts").json()["accounts"] == []
    assert len(client.get("/users/me/accounts?all").json()["accounts"]) == 2
    assert client.get("/users/me/transactions?limit=10").status_code == 409  # noAccount
    first = min(a.id for a in powens_world.accounts.values())
    powens_world.enable_account(first)
    (account,) = client.get("/users/me/accounts").json()["accounts"]
    assert (
        account["id"] == first and account["disabled"] is None and account["id_connection"] == connection.id
    )
    assert len(client.get("/users/me/transactions?limit=10").json()["transactions"]) == 3


def test_transactions_page_and_filter_on_last_update(
    fake_powens: FakePowensServer, powens_world: PowensWorld
) -> None:
    client, user_id = user_client(fake_powens)
    powens_world.add_connection(user_id, accounts=1, transactions=7)
    (account_id,) = powens_world.accounts
    powens_world.enable_account(account_id)
    rows = all_pages(client, "/users/me/transactions?limit=3")
    assert len(rows) == 7 and len({r["id"] for r in rows}) == 7
    cursor = max(str(r["last_update"]) for r in rows)
    assert all_pages(client, f"/users/me/transactions?limit=3&last_update={cursor}") == []
    # After the cursor: an update, a deletion (seen with `all` only) and a new one.
    changed, gone = sorted(powens_world.transactions)[:2]
    powens_world.update_transaction(changed, value=Decimal("-1.50"))
    powens_world.delete_transaction(gone)
    new = powens_world.add_transaction(account_id, coming=True)
    delta = all_pages(client, f"/users/me/transactions?limit=2&last_update={cursor}")
    assert [r["id"] for r in delta] == [changed, new.id]
    assert delta[0]["value"] == -1.5 and delta[1]["coming"] is True
    with_deleted = all_pages(client, f"/users/me/transactions?limit=2&last_update={cursor}&all")
    assert [r["id"] for r in with_deleted] == [changed, gone, new.id]
    assert with_deleted[1]["deleted"] is not None
    assert client.get("/users/me/transactions").json()["code"] == "invalidValue"  # limit is required
    assert client.get("/users/me/transactions?limit=1001").status_code == 400


def test_disabling_an_account_deletes_its_transactions(
    fake_powens: FakePowensServer, powens_world: PowensWorld
) -> None:
    client, user_id = user_client(fake_powens)
    powens_world.add_connection(user_id, accounts=2, transactions=2)
    first, second = sorted(powens_world.accounts)
    powens_world.enable_account(first)
    powens_world.enable_account(second)
    powens_world.disable_account(second)
    rows = all_pages(client, "/users/me/transactions?limit=100&all")
    assert {r["id_account"] for r in rows} == {first}  # a disabled account's are not listed at all
    assert all(t.deleted for t in powens_world.transactions.values() if t.id_account == second)


def test_connection_synced_carries_activated_accounts_and_new_transactions(powens_world: PowensWorld) -> None:
    user = powens_world.add_user()
    connection = powens_world.add_connection(user.id, accounts=2, transactions=2)
    first = min(powens_world.accounts)
    powens_world.enable_account(first)
    new = powens_world.add_transaction(first)
    body = powens_world.connection_synced(connection.id, new=[new.id])
    assert body["user"] == {"id": user.id} and body["connection"]["id"] == connection.id
    (account,) = body["connection"]["accounts"]
    assert account["id"] == first and [t["id"] for t in account["transactions"]] == [new.id]
    assert powens_world.connection_synced(connection.id)["id_webhook_data"] == body["id_webhook_data"] + 1


def test_the_fake_signs_as_the_receiver_verifies() -> None:
    stamp, body = now_header(), b'{"id": 1}'
    assert fake_sign("/webhooks/powens/user_deleted", stamp, body, "k" * 12) == receiver_sign(
        "/webhooks/powens/user_deleted", stamp, body, "k" * 12
    )


@pytest.mark.parametrize("compress,sign_compressed", [(False, True), (True, True), (True, False)])
def test_sender_delivers_to_a_real_receiver(
    settings_factory: Callable[..., Settings], r: redis.Redis, compress: bool, sign_compressed: bool
) -> None:
    world = PowensWorld()
    user = world.add_user()
    connection = world.add_connection(user.id, accounts=1, transactions=3)
    world.enable_account(min(world.accounts))
    body = world.connection_synced(connection.id)
    with running_receiver(settings_factory(POWENS_WEBHOOK_SECRETS=POWENS_SECRET)) as (base, _):
        sender = PowensSender(base, POWENS_SECRET)
        answer = sender.send("CONNECTION_SYNCED", body, compress=compress, sign_compressed=sign_compressed)
        assert answer.json() == {
            "status": "queued",
            "event_id": f"powens-connection_synced-{body['id_webhook_data']}",
        }
        assert sender.send("connection.synced", body).json()["status"] == "duplicate"
        assert (
            PowensSender(base, "powens-wrong-secret-000").send("user.deleted", {"id": 1}).status_code == 401
        )
        sender.close()
    (job_id,) = queued_ids(r)
    event = Job.fetch(job_id, connection=r, serializer=JSONSerializer).args[0]
    (account,) = event["content"]["connection"]["accounts"]
    assert len(account["transactions"]) == 3


def test_delete_budgets_faults_latency_and_the_request_log(
    fake_powens: FakePowensServer, powens_world: PowensWorld
) -> None:
    client, user_id = user_client(fake_powens)
    powens_world.sandbox_budgets(user=(2, 60.0))
    assert client.get("/users/me/connections").status_code == 200
    assert client.get("/users/me/accounts").status_code == 200
    refused = client.get("/users/me/connections")
    assert refused.status_code == 429 and 55 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["code"] == "tooManyRequests"
    powens_world.budgets.clear()
    powens_world.retry_after_header = False
    powens_world.faults.rate_limit_next(1)
    assert "retry-after" not in client.get("/users/me/connections").headers
    powens_world.faults.latency(0.2)
    assert client.get("/users/me/connections").elapsed.total_seconds() >= 0.2
    powens_world.faults.clear()
    assert client.delete(f"/users/{user_id}").status_code == 204 and user_id not in powens_world.users
    assert client.get("/users/me/connections").status_code == 401  # the token went with the user
    assert [(r.method, r.status) for r in powens_world.requests[-3:]] == [
        ("GET", 200),
        ("DELETE", 204),
        ("GET", 401),
    ]


def test_the_demo_world_lists_what_the_powens_fixtures_say() -> None:
    """`make run`'s fake Powens (fakebridge.powens_demo) holds the fixtures' user, connection, accounts
    and transactions: read as a worker reads them, its listings give the rows connection.synced's body
    gives (a listing after the body rewrites them: it must not change them), and the Livret A that
    accounts.fetched shows awaiting consent and account.enabled names."""
    world = demo_world()
    [user] = world.users.values()

    def fixture(name: str) -> dict[str, Any]:
        return dict(json.loads(powens_send.fixture_body(name), parse_float=Decimal))

    synced = fixture("connection.synced")
    assert user.id == synced["user"]["id"]
    with FakePowensServer(world) as server:
        client = httpx.Client(base_url=server.api_url, headers={"Authorization": f"Bearer {user.token}"})

        def listed(path: str, key: str) -> list[dict[str, Any]]:
            answer = client.get(path)
            assert answer.status_code == 200, answer.text
            return list(json.loads(answer.content, parse_float=Decimal)[key])

        [connection] = listed("/users/me/connections", "connections")
        accounts = {a["id"]: a for a in listed("/users/me/accounts?all", "accounts")}
        transactions = listed("/users/me/transactions?limit=1000&all", "transactions")
    assert powens_rows.item(connection) == powens_rows.item(synced["connection"])
    [current] = synced["connection"]["accounts"]
    assert powens_rows.account(accounts.pop(current["id"])) == powens_rows.account(current)
    assert [powens_rows.transaction(t) for t in transactions] == [
        powens_rows.transaction(t) for t in current["transactions"]
    ]
    [savings] = fixture("accounts.fetched")["connection"]["accounts"]
    shown, said = powens_rows.account(accounts.pop(savings["id"])), powens_rows.account(savings)
    keys = ("id", "item_id", "name", "type", "balance", "data_access", "updated_at")
    assert {k: shown[k] for k in keys} == {k: said[k] for k in keys}
    assert shown["iban"] == fixture("account.enabled")["iban"]  # (accounts.fetched shows none)
    assert accounts == {}
