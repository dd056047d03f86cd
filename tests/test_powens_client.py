"""The Powens client against the fake Powens served over HTTP, and how its rows are read.

Nothing of ours is mocked: the fake answers over a real socket, budgets live in the test's Redis, and
sleeps are recorded through the ``sleep=`` seam the client and its limiter take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import pytest
import redis

from fakebridge.powens import FakePowensServer
from fakebridge.powens_world import PowensWorld
from fakebridge.powens_world import powens_time as fake_time
from service.settings import Settings
from workers import powens_rows
from workers.actions import PROVIDER_ERROR, action
from workers.db import Database
from workers.errors import AuthError, BudgetExhausted, NotFound, PermanentError, TransientError
from workers.powens import PAGE_LIMIT, PowensClient
from workers.powens_rows import read_time
from workers.providers import powens_user
from workers.schema import upgrade
from workers.storage import Storage
from workers.writer import COPY_MIN_ROWS, Writer

Make = Callable[..., PowensClient]


@pytest.fixture
def make(
    settings_factory: Callable[..., Settings], r: redis.Redis, fake_powens: FakePowensServer
) -> Iterator[Make]:
    """PowensClients on the fake and the test's Redis, never really sleeping (``sleeps`` records)."""
    opened: list[PowensClient] = []

    def build(*, sleeps: list[float] | None = None, url: str | None = None, **env: Any) -> PowensClient:
        kw = {k: env.pop(k) for k in ("max_attempts", "max_retry_after", "jitter") if k in env}
        credentials = {
            "POWENS_CLIENT_ID": fake_powens.world.client_id,
            "POWENS_CLIENT_SECRET": fake_powens.world.client_secret,
        }
        settings = settings_factory(**{"POWENS_API_URL": url or fake_powens.api_url, **credentials, **env})
        client = PowensClient(settings, r, sleep=(sleeps if sleeps is not None else []).append, **kw)
        opened.append(client)
        return client

    yield build
    for client in opened:
        client.close()


def user_with_accounts(
    client: PowensClient, powens_world: PowensWorld, accounts: int = 2, transactions: int = 3
) -> tuple[int, str]:
    """A user through /auth/init, with one connection whose accounts are all enabled."""
    user_id, token = client.auth_init()
    connection = powens_world.add_connection(user_id, accounts=accounts, transactions=transactions)
    for account in [a for a in powens_world.accounts.values() if a.id_connection == connection.id]:
        powens_world.enable_account(account.id)
    return user_id, token


def listed(client: PowensClient, user_id: int, token: str, **kw: Any) -> list[dict[str, Any]]:
    return [row for page in client.transactions(user_id, token, **kw) for row in page]


def transaction_calls(powens_world: PowensWorld) -> list[str]:
    return [q.query for q in powens_world.requests if q.path.endswith("/transactions")]


# -- the API ---------------------------------------------------------------------------------------------
def test_auth_init_connections_and_accounts(make: Make, powens_world: PowensWorld) -> None:
    client = make()
    user_id, token = client.auth_init()
    assert powens_world.users[user_id].token == token and token not in repr(client)
    assert client.connections(user_id, token) == []
    connection = powens_world.add_connection(user_id, accounts=2, transactions=1)
    (listed_connection,) = client.connections(user_id, token)
    assert listed_connection["id"] == connection.id and listed_connection["state"] is None
    assert len(client.accounts(user_id, token)) == 2  # all: disabled ones too
    assert client.accounts(user_id, token, all=False) == []  # none enabled yet
    assert listed(client, user_id, token) == []  # 409 noAccount: an empty listing
    with pytest.raises(AuthError) as refused:
        make(POWENS_CLIENT_SECRET="another-client-secret").auth_init()
    assert refused.value.status == 401 and refused.value.code == "invalidClient"
    with pytest.raises(AuthError) as other:  # a token for another user's id
        client.accounts(user_id + 1, token)
    assert other.value.status == 403


def test_more_than_a_thousand_transactions_come_in_pages_of_a_thousand(
    make: Make, powens_world: PowensWorld
) -> None:
    client = make()
    user_id, token = user_with_accounts(client, powens_world, accounts=1, transactions=2345)
    pages = list(client.transactions(user_id, token))
    assert [len(page) for page in pages] == [PAGE_LIMIT, PAGE_LIMIT, 345]
    assert {row["id"] for page in pages for row in page} == set(powens_world.transactions)
    calls = transaction_calls(powens_world)
    assert len(calls) == 3 and all("limit=1000" in q and "all=true" in q for q in calls)
    assert all(type(row["value"]) in (Decimal, int) for page in pages for row in page)


def test_a_delta_lists_what_changed_after_the_cursor_deletions_included(
    make: Make, powens_world: PowensWorld
) -> None:
    client = make()
    user_id, token = user_with_accounts(client, powens_world, accounts=1, transactions=5)
    (account_id,) = powens_world.accounts
    first = listed(client, user_id, token)
    cursor = max(t for t in (read_time(row["last_update"]) for row in first) if t is not None)
    assert cursor == max(t.last_update for t in powens_world.transactions.values() if t.last_update)
    assert listed(client, user_id, token, last_update=cursor) == []
    changed, gone = sorted(powens_world.transactions)[:2]
    powens_world.update_transaction(changed, value=Decimal("-1.50"))
    powens_world.delete_transaction(gone)
    new = powens_world.add_transaction(account_id, coming=True)
    delta = listed(client, user_id, token, last_update=cursor)
    assert [row["id"] for row in delta] == [changed, gone, new.id]
    assert str(delta[0]["value"]) == "-1.50" and delta[1]["deleted"] is not None and delta[2]["coming"]
    assert [row["id"] for row in listed(client, user_id, token, last_update=cursor, include_all=False)] == [
        changed,
        new.id,
    ]
    # The cursor goes back written as Powens writes its times: the instant the fake wrote.
    assert parse_qs(transaction_calls(powens_world)[-1])["last_update"] == [fake_time(cursor)]


def test_a_listing_goes_on_from_the_link_it_stopped_at(make: Make, powens_world: PowensWorld) -> None:
    client = make()
    user_id, token = user_with_accounts(client, powens_world, accounts=1, transactions=2100)
    listing = client.transaction_listing(user_id, token)
    first, link = next(listing)
    assert len(first) == PAGE_LIMIT and link is not None and "offset=1000" in link
    rest = [row for page, _ in client.transaction_listing(user_id, token, start=link) for row in page]
    assert {row["id"] for row in first + rest} == set(powens_world.transactions) and len(first + rest) == 2100
    with pytest.raises(PermanentError, match="another host"):
        next(client.transaction_listing(user_id, token, start="http://elsewhere.example/2.0/users/me"))


def test_delete_user(make: Make, powens_world: PowensWorld) -> None:
    client = make()
    user_id, token = user_with_accounts(client, powens_world)
    assert client.delete_user(user_id, token) is True
    assert user_id not in powens_world.users and not powens_world.accounts and not powens_world.transactions
    with pytest.raises(AuthError):  # its token went with it
        client.delete_user(user_id, token)
    other_id, other_token = client.auth_init()
    powens_world.faults.fail_next(1, 404)
    assert client.delete_user(other_id, other_token) is False


# -- failures ------------------------------------------------------------------------------------------
def test_5xx_and_network_errors_are_retried_then_transient(make: Make, powens_world: PowensWorld) -> None:
    sleeps: list[float] = []
    client = make(sleeps=sleeps, jitter=lambda: 1.0)
    user_id, token = client.auth_init()
    powens_world.faults.fail_next(2, 503)
    assert client.connections(user_id, token) == []
    assert sleeps == [0.5, 1.0]
    powens_world.faults.fail_next(4, 500)
    with pytest.raises(TransientError) as failed:
        client.connections(user_id, token)
    assert failed.value.status == 500 and not isinstance(failed.value, BudgetExhausted)
    unreachable = make(url="http://127.0.0.1:1/2.0", max_attempts=2)
    with pytest.raises(TransientError, match="ConnectError on POST /auth/init"):
        unreachable.auth_init()


def test_404_401_and_other_4xx(make: Make, powens_world: PowensWorld) -> None:
    client = make()
    user_id, token = client.auth_init()
    powens_world.faults.fail_next(1, 404)
    with pytest.raises(NotFound):
        client.connections(user_id, token)
    with pytest.raises(AuthError) as refused:
        client.connections(user_id, "not-the-token")
    assert refused.value.code == "invalidToken" and "not-the-token" not in str(refused.value)
    powens_world.faults.fail_next(1, 400)
    with pytest.raises(PermanentError) as wrong:
        client.accounts(user_id, token)
    assert wrong.value.status == 400


def test_a_short_429_is_waited_out_a_long_one_defers_the_job(make: Make, powens_world: PowensWorld) -> None:
    sleeps: list[float] = []
    client = make(sleeps=sleeps)
    user_id, token = client.auth_init()
    powens_world.faults.rate_limit_next(2, retry_after=3)
    assert client.connections(user_id, token) == [] and sleeps == [3.0, 3.0]
    powens_world.faults.rate_limit_next(1, retry_after=40)
    with pytest.raises(BudgetExhausted) as spent:
        client.connections(user_id, token)
    assert spent.value.retry_after == 40.0 and spent.value.status == 429
    powens_world.retry_after_header = False  # Powens does not document one: a minute, its budgets' period
    powens_world.faults.rate_limit_next(4)
    with pytest.raises(BudgetExhausted) as unsaid:
        client.connections(user_id, token)
    assert unsaid.value.retry_after == 60.0


def test_the_sandboxs_per_user_budget_and_ours(make: Make, powens_world: PowensWorld) -> None:
    powens_world.sandbox_budgets(user=(3, 60.0))
    theirs = make(POWENS_RATE_LIMIT_USER="100/60", max_retry_after=0)
    user_id, token = theirs.auth_init()  # the application's budget only
    for _ in range(3):
        theirs.connections(user_id, token)
    with pytest.raises(BudgetExhausted) as refused:  # Powens's 429: a minute's wait, more than we hold
        theirs.connections(user_id, token)
    assert refused.value.status == 429 and 55 <= (refused.value.retry_after or 0) <= 60
    powens_world.budgets.clear()
    ours = make(POWENS_RATE_LIMIT_USER="2/60", max_retry_after=0)
    other_id, other_token = ours.auth_init()
    before = len(powens_world.requests)
    ours.connections(other_id, other_token)
    ours.accounts(other_id, other_token)
    with pytest.raises(BudgetExhausted) as ours_refused:  # ours refuses before Powens sees it
        ours.connections(other_id, other_token)
    assert ours_refused.value.status is None and "powens:user:" in str(ours_refused.value)
    assert len(powens_world.requests) == before + 2


# -- the rows --------------------------------------------------------------------------------------------
def test_rows_are_bridge_shaped_in_the_negative_id_space(make: Make, powens_world: PowensWorld) -> None:
    client = make()
    user_id, token = user_with_accounts(client, powens_world, accounts=2, transactions=2)
    first, second = sorted(powens_world.accounts)
    powens_world.accounts[first].coming = Decimal("-12.30")
    powens_world.disable_account(second)
    (connection,) = client.connections(user_id, token)
    item = powens_rows.item(connection)
    truth = powens_world.connections[connection["id"]]
    assert item["id"] == -truth.id and item["status"] == 0 and item["status_code_info"] is None
    assert truth.expire is not None and truth.last_update is not None
    assert item["authentication_expires_at"] == truth.expire.isoformat()
    assert item["last_successful_refresh"] == item["last_try_refresh"] == truth.last_update.isoformat()
    accounts = {a["id"]: a for a in map(powens_rows.account, client.accounts(user_id, token))}
    enabled, disabled = accounts[-first], accounts[-second]
    assert enabled["item_id"] == -truth.id and enabled["currency_code"] == "EUR"
    assert enabled["data_access"] == "enabled" and disabled["data_access"] == "disabled"
    balance = powens_world.accounts[first].balance
    assert enabled["balance"] == balance and enabled["instant_balance"] == balance + Decimal("-12.30")
    assert str(enabled["instant_balance"]) == str(balance + Decimal("-12.30"))  # exact, its digits kept
    assert enabled["deleted_at"] is None and disabled["iban"] == powens_world.accounts[second].iban
    new = powens_world.add_transaction(first, value=Decimal("-7.10"), coming=True)
    rows = {t["id"]: t for t in map(powens_rows.transaction, listed(client, user_id, token))}
    assert set(rows) == {
        -t for t in powens_world.transactions if powens_world.transactions[t].id_account == first
    }
    coming = rows[-new.id]
    assert coming["future"] is True and coming["deleted"] is False and coming["account_id"] == -first
    assert str(coming["amount"]) == "-7.10" and coming["updated_at"] == new.last_update.isoformat()
    assert (
        coming["provider_description"] == new.wording
        and coming["clean_description"] == new.wording.split(" ", 1)[-1]
    )
    assert coming["date"] == coming["transaction_date"] == coming["value_date"] == new.day.isoformat()
    powens_world.delete_transaction(new.id)
    gone = [t for t in map(powens_rows.transaction, listed(client, user_id, token)) if t["id"] == -new.id]
    assert gone[0]["deleted"] is True


def test_the_rows_go_into_the_tables(make: Make, powens_world: PowensWorld, database_url: str) -> None:
    """What Storage and Writer take, as they take Bridge's (a page long enough for PostgreSQL's COPY):
    negative ids, exact amounts, deletions."""
    client = make()
    user_id, token = user_with_accounts(client, powens_world, accounts=1, transactions=COPY_MIN_ROWS + 4)
    (account_id,) = powens_world.accounts
    powens_world.delete_transaction(min(powens_world.transactions))
    db = Database.from_url(database_url)
    upgrade(db)
    storage, writer = Storage(db), Writer(db)
    page = writer.page([powens_rows.transaction(t) for t in listed(client, user_id, token)])
    assert page.copy == (db.dialect == "postgresql")  # Powens's rows take Bridge's fast way
    with storage.transaction() as tx:
        storage.upsert_user(tx, powens_user(user_id))
        for connection in client.connections(user_id, token):
            storage.upsert_item(tx, powens_user(user_id), powens_rows.item(connection))
        storage.upsert_accounts(tx, [powens_rows.account(a) for a in client.accounts(user_id, token)])
        writer.write(tx, page)
        stored = tx.execute(
            "SELECT id, account_id, amount, deleted_at FROM transactions ORDER BY id"
        ).fetchall()
        (account,) = tx.execute("SELECT id, item_id, data_access FROM accounts").fetchall()
    assert account[0] == -account_id and account[2] == "enabled"
    assert {row[0] for row in stored} == {-t for t in powens_world.transactions}
    assert all(row[1] == -account_id for row in stored)
    amounts = {-row[0]: Decimal(str(row[2])) for row in stored}
    assert amounts == {t.id: t.value for t in powens_world.transactions.values()}
    assert [row[0] for row in stored if row[3] is not None] == [-min(powens_world.transactions)]
    db.close()


@pytest.mark.parametrize(
    ("state", "status", "what"),
    [(None, 0, None), ("", 0, None), ("SCARequired", 1010, "complete_sca"),
     ("webauthRequired", 1010, "complete_sca"), ("decoupled", 1010, "complete_sca"),
     ("additionalInformationNeeded", 1010, "complete_sca"), ("wrongpass", 402, "update_credentials"),
     ("passwordExpired", 402, "update_credentials"), ("actionNeeded", 429, "act_on_bank_site"),
     ("websiteUnavailable", -2, "wait"), ("rateLimiting", -2, "wait"), ("validating", -2, "wait"),
     ("bug", PROVIDER_ERROR, "contact_support"), ("somethingNew", PROVIDER_ERROR, "contact_support")],
)  # fmt: skip
def test_connection_states_read_as_bridge_statuses(state: str | None, status: int, what: str | None) -> None:
    """Each state, as a status, has the action issue #21 gives it."""
    item = powens_rows.item({"id": 4, "state": state, "error_message": "Mot de passe incorrect"})
    assert item["status"] == status and item["id"] == -4
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert action(status, now, None, now, timedelta(days=14)) == what
    assert item["status_code_info"] == (state or None)
    assert item["status_code_description"] == "Mot de passe incorrect"


def test_naive_times_are_paris_time_and_the_cursor_goes_back_as_powens_wrote_it() -> None:
    winter, summer = read_time("2026-12-01 09:00:01"), read_time("2026-07-01 09:00:01")
    assert winter == datetime(2026, 12, 1, 8, 0, 1, tzinfo=UTC)
    assert summer == datetime(2026, 7, 1, 7, 0, 1, tzinfo=UTC)
    assert powens_rows.powens_time(winter + timedelta(microseconds=900)) == "2026-12-01 09:00:01"  # floored
    twice = read_time("2026-10-25 02:30:00")  # Paris lives this half hour twice: the earlier instant
    assert twice == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert powens_rows.read_utc_time("2026-12-01 09:00:01") == datetime(2026, 12, 1, 9, 0, 1, tzinfo=UTC)
    assert read_time(None) is None and read_time("") is None
    # A webhook body's amounts come through the job's JSON as floats: the decimal Powens wrote, or refused.
    assert powens_rows.transaction({"id": 1, "id_account": 2, "value": -1234567.89})["amount"] == Decimal(
        "-1234567.89"
    )
    assert str(powens_rows.account({"id": 1, "id_connection": 2, "balance": 0.1})["balance"]) == "0.1"
    with pytest.raises(ValueError, match="significant digits"):
        powens_rows.transaction({"id": 1, "id_account": 2, "value": 12345678901234.567})
