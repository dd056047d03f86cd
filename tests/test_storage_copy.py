"""The bulk write paths write exactly what the row-by-row upsert writes, on PostgreSQL and SQLite.

On PostgreSQL a page of transactions goes through binary COPY: into a staging table merged by one
``INSERT … SELECT … ON CONFLICT`` (any page), or straight into ``transactions`` (a page of ids never
seen, in a transaction of its own); on SQLite ``executemany`` sends fifty rows to a statement. The
reference here is the original path, verbatim: each row built field by field and upserted on its
own. Every path must leave the same rows, whatever
the order: the ``updated_at`` guard (older loses, equal wins), obfuscated descriptions that never
overwrite (``COALESCE``), ``deleted`` → ``deleted_at``, ``future``, ids twice in a page, odd types.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from tests.harness import storage_at, worker_settings
from workers.bridge import BridgeClient
from workers.db import Database, Tx
from workers.schema import upgrade
from workers.storage import Storage, clear, money, parse_date, parse_ts
from workers.sync import Syncer
from workers.writer import (
    COPY_MIN_ROWS,
    LIVE_FUTURE_IDS,
    TRANSACTION_COLUMNS,
    TRANSACTION_PG_TYPES,
    UPSERT_TRANSACTION,
    Writer,
    _blocks,
)

Page = list[dict[str, Any]]
T0 = datetime(2026, 11, 25, 21, 0, tzinfo=UTC)


@pytest.fixture
def storage(database_url: str) -> Iterator[Storage]:
    """On SQLite with a variable limit of 45 (three rows to a statement), so that every page here of
    three rows or more goes in several multi-row statements and a leftover (at the usual 32,766, a
    page of 500 rows is one statement)."""
    with storage_at(database_url) as opened:
        if opened.db.dialect == "sqlite":
            assert opened.db._sqlite is not None
            opened.db._sqlite.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 45)
        yield opened


def reference_rows(transactions: list[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """How the worker built rows before COPY (kept verbatim as the reference)."""
    rows = []
    for t in transactions:
        updated_at = parse_ts(t.get("updated_at"))
        rows.append(
            (
                t["id"], t.get("account_id"), money(t.get("amount")), t.get("currency_code"),
                parse_date(t.get("date")), parse_date(t.get("booking_date")),
                parse_date(t.get("transaction_date")), parse_date(t.get("value_date")),
                clear(t.get("clean_description")), clear(t.get("provider_description")),
                t.get("category_id"), t.get("operation_type"), bool(t.get("future", False)),
                updated_at, updated_at if t.get("deleted") else None,
            )
        )  # fmt: skip
    return rows


def one_by_one(storage: Storage, page: Page) -> None:
    with storage.transaction() as tx:
        for row in reference_rows(page):
            tx.execute(UPSERT_TRANSACTION, row)


def by_executemany(storage: Storage, page: Page) -> None:
    with storage.transaction() as tx:
        tx.executemany(UPSERT_TRANSACTION, reference_rows(page))


def writer(storage: Storage) -> Writer:
    return Writer(storage.db, storage.codec)


def upsert(storage: Storage, tx: Tx, page: Page) -> None:
    """A page in the caller's transaction, as the syncer writes a page of a delta."""
    to = writer(storage)
    to.write(tx, to.page(page))


def by_upsert(storage: Storage, page: Page) -> None:
    with storage.transaction() as tx:
        upsert(storage, tx, page)


def by_copy_first(storage: Storage, page: Page) -> None:
    """As the syncer writes a page of a new account: COPY it straight in, else the upsert."""
    to = writer(storage)
    rows = to.page(page)
    if not to.write_together([rows]):
        with storage.transaction() as tx:
            to.write(tx, rows)


WRITERS: dict[str, Callable[[Storage, Page], None]] = {
    "one_by_one": one_by_one,
    "executemany": by_executemany,
    "upsert": by_upsert,
    "copy_first": by_copy_first,
}


def table(storage: Storage) -> list[tuple[Any, ...]]:
    with storage.transaction() as tx:
        return tx.execute(f"SELECT {', '.join(TRANSACTION_COLUMNS)} FROM transactions ORDER BY id").fetchall()  # noqa: S608


def replay(storage: Storage, pages: list[Page], writer: str) -> list[tuple[Any, ...]]:
    with storage.transaction() as tx:
        tx.execute("DELETE FROM transactions")
    for page in pages:
        WRITERS[writer](storage, page)
    return table(storage)


def txn(
    id: int,
    minutes: int,
    *,
    description: str = "Carrefour",
    deleted: bool = False,
    future: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """A transaction as Bridge renders it (keys with no value omitted)."""
    data: dict[str, Any] = {
        "id": id, "account_id": 20_000_001, "amount": Decimal("-12.30"), "currency_code": "EUR",
        "date": "2026-11-20", "booking_date": "2026-11-20", "transaction_date": "2026-11-19",
        "value_date": "2026-11-21", "clean_description": description,
        "provider_description": f"CB {description.upper()} 19/11", "category_id": 273,
        "operation_type": "card", "future": future, "deleted": deleted,
        "updated_at": f"{T0 + timedelta(minutes=minutes):%Y-%m-%dT%H:%M:%S}.000Z",
    }  # fmt: skip
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


def first_page(n: int = 40) -> Page:
    return [txn(1000 + i, 0, future=i % 7 == 0) for i in range(n)]


def second_page() -> Page:
    """Over first_page(): older (ignored), equal (applied), newer, obfuscated, deleted, future flips,
    an unknown id; more than COPY_MIN_ROWS rows."""
    page = [txn(1000 + i, -5, amount=Decimal("-99.99")) for i in range(0, 5)]  # older: ignored
    page += [txn(1000 + i, 0, amount=Decimal("-1.00")) for i in range(5, 10)]  # equal: applied
    page += [txn(1000 + i, 3, description="XXXX", amount=Decimal("7")) for i in range(10, 15)]  # obfuscated
    page += [txn(1000 + i, 4, deleted=True) for i in range(15, 20)]  # deleted
    page += [txn(1000 + i, 6, future=i % 7 != 0) for i in range(20, 27)]  # future flips
    page += [txn(5000 + i, 1, clean_description=None) for i in range(3)]  # new, one description missing
    assert len(page) >= COPY_MIN_ROWS
    return page


@pytest.mark.parametrize("writer", ["executemany", "upsert", "copy_first"])
def test_guard_keep_deleted_future_as_the_row_by_row_upsert(storage: Storage, writer: str) -> None:
    pages = [first_page(), second_page()]
    expected = replay(storage, pages, "one_by_one")
    assert replay(storage, pages, writer) == expected
    rows = {row[0]: dict(zip(TRANSACTION_COLUMNS, row, strict=True)) for row in expected}
    assert str(rows[1000]["amount"]) == "-12.30"  # the older payload lost
    assert str(rows[1005]["amount"]) == "-1.00"  # the equal one won
    assert rows[1010]["clean_description"] == "Carrefour"  # XXXX never overwrites…
    assert str(rows[1010]["amount"]) == "7"  # …while the rest of the row moves on
    assert rows[1015]["deleted_at"] is not None and rows[1014]["deleted_at"] is None
    assert not rows[1021]["future"] and rows[1022]["future"]  # 1021 was future, 1022 was not
    assert rows[5000]["clean_description"] is None
    # In another order, and again: still what the row-by-row upsert leaves.
    again = [*pages[::-1], *pages, *pages]
    assert replay(storage, again, writer) == replay(storage, again, "one_by_one")


def test_a_page_with_an_id_twice_or_odd_types_goes_row_by_row(storage: Storage) -> None:
    twice = [*first_page(20), txn(1003, 9, amount=Decimal("-3.33")), txn(1004, -9, amount=Decimal("-4.44"))]
    odd = [txn(2000 + i, 1, category_id=str(273)) for i in range(20)]  # a number as text
    for pages in ([twice], [odd], [first_page(), twice, odd]):
        expected = replay(storage, pages, "one_by_one")
        assert replay(storage, pages, "executemany") == expected
        assert replay(storage, pages, "upsert") == expected
        assert replay(storage, pages, "copy_first") == expected
    assert not writer(storage).page(twice).copy and not writer(storage).page(odd).copy


@pytest.mark.parametrize("variables", [45, 750, 32766])
def test_ids_repeated_within_a_statement_of_many_rows_end_as_one_by_one(
    storage: Storage, variables: int
) -> None:
    """1,010 rows of 30 ids at the same ``updated_at``: on SQLite each id comes back within a statement
    of 3, 50 or 500 rows and across statements (leftover rows go on their own), and the last of each
    must win."""
    if storage.db._sqlite is not None:
        storage.db._sqlite.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variables)
    page = [txn(3000 + i % 30, 0, amount=Decimal(i)) for i in range(1010)]
    expected = replay(storage, [page], "one_by_one")
    assert {row[0]: int(row[2]) for row in expected} == {3000 + k: max(range(k, 1010, 30)) for k in range(30)}
    assert replay(storage, [page], "executemany") == expected
    assert replay(storage, [page], "upsert") == expected


def test_sqlite_sends_as_many_rows_to_a_statement_as_its_variable_limit_allows() -> None:
    def sizes(limit: int) -> list[int]:
        blocks = _blocks(limit)
        for statement, rows in blocks:
            assert statement.count("%s") == rows * UPSERT_TRANSACTION.count("%s")
            assert statement.endswith(UPSERT_TRANSACTION[UPSERT_TRANSACTION.index(" ON CONFLICT") :])
        return [rows for _, rows in blocks]

    assert sizes(32766) == [500, 50, 5]  # a page of Bridge's, then what is left
    assert sizes(999) == [66, 6]  # builds with the old, lower limit
    assert sizes(45) == [3]
    assert sizes(20) == []  # one row: the plain statement


def test_rows_of_another_length_fail_as_one_by_one(storage: Storage) -> None:
    """One row one value short and another one value over: blocks of eleven rows would take the 88
    values, shifted into the wrong columns; the one-row statement refuses them, as it always did."""
    now = datetime.now(UTC)
    rows: list[tuple[Any, ...]] = [(f"u{i}", None, now, now) for i in range(22)]
    rows[3], rows[4] = ("u3", None, now, now, now), ("u4", None, now)
    error = sqlite3.ProgrammingError if storage.db.dialect == "sqlite" else psycopg.ProgrammingError
    with pytest.raises(error), storage.transaction() as tx:
        sql = "INSERT INTO users (uuid, external_user_id, created_at, updated_at) VALUES (%s, %s, %s, %s)"
        tx.executemany(sql, rows)
    with storage.transaction() as tx:
        assert tx.execute("SELECT count(*) FROM users").fetchone() == (0,)


transactions_st = st.builds(
    lambda id, minutes, obfuscated, deleted, future, cents: txn(
        id,
        minutes,
        description="XXXX" if obfuscated else f"shop {id}",
        deleted=deleted,
        future=future,
        amount=Decimal(cents).scaleb(-2),
    ),
    id=st.integers(1, 60),
    minutes=st.integers(0, 4),
    obfuscated=st.booleans(),
    deleted=st.booleans(),
    future=st.booleans(),
    cents=st.integers(-100_000, 100_000),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pages=st.lists(st.lists(transactions_st, min_size=1, max_size=120), min_size=1, max_size=4))
def test_any_pages_in_any_order_leave_the_rows_the_row_by_row_upsert_leaves(
    storage: Storage, pages: list[Page]
) -> None:
    """Pages of up to 120 rows among 60 ids: on SQLite, ids twice in one statement of fifty rows."""
    expected = replay(storage, pages, "one_by_one")
    assert replay(storage, pages, "executemany") == expected
    assert replay(storage, pages, "upsert") == expected
    assert replay(storage, pages, "copy_first") == expected


# -- PostgreSQL's COPY machinery ----------------------------------------------------------------------------
@pytest.fixture
def pg(pg_schema_url: str) -> Iterator[Storage]:
    with storage_at(pg_schema_url) as opened:
        yield opened


def test_the_future_index_built_concurrently_beforehand_satisfies_migration_3(pg_schema_url: str) -> None:
    """As docs/deploy.md (Rollbacks) tells an operator with a large table: build the index without
    holding writes back, then upgrade."""
    with storage_at(pg_schema_url) as opened, opened.transaction() as tx:  # migrated: back to version 2
        tx.execute("DROP INDEX transactions_future")
        tx.execute("DELETE FROM schema_migrations WHERE version = 3")
    with psycopg.connect(pg_schema_url, autocommit=True) as conn:
        conn.execute(
            "CREATE INDEX CONCURRENTLY transactions_future ON transactions (account_id, id) "
            "WHERE future = TRUE AND deleted_at IS NULL"
        )
    db = Database.from_url(pg_schema_url)
    try:
        assert upgrade(db) == [3]
    finally:
        db.close()


def test_closing_a_listing_reads_live_future_transactions_by_their_index(storage: Storage) -> None:
    explain = "EXPLAIN QUERY PLAN " if storage.db.dialect == "sqlite" else "EXPLAIN "
    with storage.transaction() as tx:
        if storage.db.dialect == "postgresql":
            tx.execute("SET LOCAL enable_seqscan = off")  # an empty table: judge the plan, not the size
        plan = " ".join(str(row) for row in tx.execute(explain + LIVE_FUTURE_IDS, (1,)).fetchall())
    assert "transactions_future" in plan


def test_binary_copy_types_are_the_schema_types(pg: Storage) -> None:
    with pg.transaction() as tx:
        found = dict(
            tx.execute(
                "SELECT column_name, udt_name FROM information_schema.columns "
                "WHERE table_name = 'transactions' AND table_schema = current_schema()"
            ).fetchall()
        )
    assert [found[c] for c in TRANSACTION_COLUMNS] == TRANSACTION_PG_TYPES


def test_a_copy_that_meets_a_known_id_writes_nothing(pg: Storage) -> None:
    by_upsert(pg, [txn(1020, 0)])
    to = writer(pg)
    page = to.page(first_page())  # ids 1000…1039: 1020 is known
    assert page.copy
    assert to.write_together([page]) is False
    assert [row[0] for row in table(pg)] == [1020]
    assert to.write_together([to.page([txn(3000 + i, 0) for i in range(20)])]) is True
    assert len(table(pg)) == 21


def test_pages_copied_together_write_all_or_nothing(pg: Storage) -> None:
    to = writer(pg)
    one = to.page([txn(5000 + i, 0) for i in range(20)])
    two = to.page([txn(5019 + i, 0) for i in range(20)])  # 5019 is in both pages
    assert one.copy and two.copy
    assert to.write_together([one, two]) is False
    assert table(pg) == []
    three = to.page([txn(5020 + i, 0) for i in range(20)])
    assert to.write_together([one, three]) is True
    assert len(table(pg)) == 40


def test_the_staging_table_serves_twice_in_a_transaction_and_after_a_rollback(pg: Storage) -> None:
    with pytest.raises(RuntimeError), pg.transaction() as tx:
        upsert(pg, tx, first_page())
        raise RuntimeError("rolled back, staging table with it")
    assert table(pg) == []
    with pg.transaction() as tx:
        upsert(pg, tx, first_page())
        upsert(pg, tx, second_page())
    reference = replay(pg, [first_page(), second_page()], "executemany")
    replay(pg, [], "executemany")
    with pg.transaction() as tx:
        upsert(pg, tx, first_page())
        upsert(pg, tx, second_page())
    assert table(pg) == reference


def test_copy_rows_is_postgresql_only(tmp_path: Any) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(NotImplementedError), db.transaction() as tx:
        tx.copy_rows("transactions", ["id"], [(1,)])
    db.close()


# -- the syncer: multi-page accounts, new then known ---------------------------------------------------------
def stored(storage: Storage) -> dict[int, tuple[Any, ...]]:
    with storage.transaction() as tx:
        rows = tx.execute(
            "SELECT id, amount, clean_description, bridge_updated_at, deleted_at FROM transactions"
        ).fetchall()
    return {row[0]: row[1:] for row in rows}


def test_multi_page_accounts_new_then_resynced_then_changed(
    storage: Storage, world: World, fake: FakeBridgeServer, redis_url: str, r: redis.Redis
) -> None:
    user = world.add_user()
    item = world.add_item(user)
    accounts = [world.add_account(item) for _ in range(2)]
    ids = [world.add_transactions(a, 1234) for a in accounts]  # 3 pages each: COPYed straight in
    with storage.transaction() as tx:
        storage.upsert_accounts(tx, [{"id": a, "item_id": item} for a in accounts])
    settings_ = worker_settings(redis_url, storage.db.url, fake.api_url, world)
    client = BridgeClient(settings_, r)
    copies: list[bool] = []  # what each attempt to COPY a page straight in did
    syncer = Syncer(client, storage, overlap=timedelta(0))
    together = syncer.writer.write_together
    syncer.writer.write_together = lambda *a, **kw: copies.append(together(*a, **kw)) or copies[-1]  # type: ignore[method-assign]
    postgresql = storage.db.dialect == "postgresql"
    try:
        assert syncer.sync_transactions(user, *accounts, full=True) == 2468
        # All three pages of each account in one transaction (PostgreSQL: one COPY, with the cursor).
        assert copies == [True, True]
        first = stored(storage)
        assert len(first) == 2468 and all(row[2] is not None and row[3] is None for row in first.values())
        # A full resync of what is stored: every page meets known ids and goes through the upsert.
        copies.clear()
        assert syncer.sync_transactions(user, *accounts, full=True) == 2468
        # PostgreSQL: one refused COPY per account, then the upsert; SQLite: the upsert, as the first time.
        assert copies == ([False, False] if postgresql else [True, True])
        assert stored(storage) == first
        # Changes spread over the history, a deletion, then a delta sync and a full one.
        rng = random.Random(7)
        changed = rng.sample(ids[0], 30)
        for n, t in enumerate(changed):
            world.update_transaction(t, amount=f"-{n}.50", clean_description=f"changed {n}")
        world.delete_transaction(ids[1][600])
        new = world.add_transactions(accounts[1], 700)  # a page and more of new ids after known ones
        assert syncer.sync_transactions(user, *accounts, full=False) == 30 + 1 + 700
        after = stored(storage)
        assert len(after) == 2468 + 700
        assert all(
            after[t][1] == f"changed {n}" and str(after[t][0]) == f"-{n}.50" for n, t in enumerate(changed)
        )
        assert after[ids[1][600]][3] is not None and all(after[t][3] is None for t in new)
        assert syncer.sync_transactions(user, *accounts, full=True) == 2468 + 700 - 1
        assert stored(storage) == after
    finally:
        client.close()


def one_account(storage: Storage, world: World, transactions: int) -> tuple[str, int]:
    """A user with one item and one account of ``transactions`` at the fake; the account stored."""
    user = world.add_user()
    item = world.add_item(user)
    account = world.add_account(item)
    world.add_transactions(account, transactions)
    with storage.transaction() as tx:
        storage.upsert_accounts(tx, [{"id": account, "item_id": item}])
    return user, account


def test_a_long_new_history_goes_in_by_ten_pages_a_transaction(
    storage: Storage, world: World, fake: FakeBridgeServer, redis_url: str, r: redis.Redis
) -> None:
    user, account = one_account(storage, world, 5600)  # 12 pages: 1-10 in a COPY, 11-12 (cursor) in one more
    client = BridgeClient(worker_settings(redis_url, storage.db.url, fake.api_url, world), r)
    copies: list[int] = []
    syncer = Syncer(client, storage, overlap=timedelta(0))
    together = syncer.writer.write_together
    syncer.writer.write_together = lambda pages, *a: copies.append(len(pages)) or together(pages, *a)  # type: ignore[method-assign]
    try:
        assert syncer.sync_transactions(user, account, full=True) == 5600
    finally:
        client.close()
    assert copies == [10, 2]
    assert len(stored(storage)) == 5600 and writer(storage).cursor(account) is not None


def test_an_error_mid_listing_moves_no_cursor_and_the_retry_writes_it_all(
    storage: Storage, world: World, fake: FakeBridgeServer, redis_url: str, r: redis.Redis
) -> None:
    user, account = one_account(storage, world, 1600)  # 4 pages
    settings_ = worker_settings(redis_url, storage.db.url, fake.api_url, world, BRIDGE_MAX_ATTEMPTS="1")
    client = BridgeClient(settings_, r, max_attempts=1)
    try:
        syncer = Syncer(client, storage, overlap=timedelta(0))
        pages_seen = 0
        original = client.transaction_listing

        def pages(*args: Any, **kwargs: Any) -> Iterator[tuple[Page, str | None]]:
            nonlocal pages_seen
            for page in original(*args, **kwargs):
                pages_seen += 1
                if pages_seen == 3:
                    raise ConnectionError("Bridge went away")
                yield page

        client.transaction_listing = pages  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            syncer.sync_transactions(user, account, full=False)
        # Pages 1 and 2 were held back to be written together with the pages after them: nothing
        # written, and no cursor.
        assert stored(storage) == {}
        assert writer(storage).cursor(account) is None
        client.transaction_listing = original  # type: ignore[method-assign]
        assert syncer.sync_transactions(user, account, full=False) == 1600
        assert len(stored(storage)) == 1600 and writer(storage).cursor(account) is not None
    finally:
        client.close()
