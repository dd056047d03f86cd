"""Idempotent, order-independent writes of Bridge objects, and the event ledger.

Every write is an upsert keyed by Bridge's id with an ``updated_at`` guard, so an older
payload never overwrites a newer row and running any job twice, or jobs in any order,
leaves the same rows. Values Bridge obfuscates (``XXXX``, as under status 1100) are
written as NULL and the upsert keeps the stored value (``COALESCE``). Deletions only set
``deleted_at`` (the earliest time we heard of), never drop a row. Batches go through
``executemany`` in the caller's transaction: one transaction per page, not per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from workers.codec import Codec, PlainCodec
from workers.db import Database, Tx, to_datetime

USER_ACTION_STATUSES = frozenset({402, 429, 430, 1007, 1009, 1010, 1100})
TEMPORARY_STATUSES = frozenset({1003, -2, -3})

_NEWER = "{t}.{col} IS NULL OR excluded.{col} IS NULL OR excluded.{col} >= {t}.{col}"


def parse_ts(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_date(value: Any) -> date | None:
    return None if value is None or value == "" else date.fromisoformat(str(value)[:10])


def money(value: Any) -> Decimal | None:
    """Bridge amounts, parsed from JSON as Decimal (never float), or ints."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        raise TypeError("amounts must be parsed as Decimal, not float")
    return Decimal(str(value))


def clear(value: Any) -> str | None:
    """A bank-data string, or None when Bridge obfuscated it."""
    if value is None:
        return None
    text = str(value)
    return None if "XXXX" in text else text


def _upsert(
    table: str,
    key: str,
    columns: list[str],
    keep: Iterable[str] = (),
    guard: str | None = None,
    custom: Mapping[str, str] | None = None,
) -> str:
    """``INSERT … ON CONFLICT (key) DO UPDATE``; ``keep`` columns keep their value over a new NULL,
    ``custom`` columns take the given expression.

    Table and column names come from the constants below, never from input."""
    keep, custom = set(keep), dict(custom or {})
    sets = ", ".join(
        f"{c} = {custom[c]}"
        if c in custom
        else f"{c} = COALESCE(excluded.{c}, {table}.{c})"
        if c in keep
        else f"{c} = excluded.{c}"
        for c in columns
        if c != key
    )
    placeholders = ", ".join(["%s"] * len(columns))
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) "  # noqa: S608
    sql += f"ON CONFLICT ({key}) DO UPDATE SET {sets}"
    return sql + (f" WHERE {_NEWER.format(t=table, col=guard)}" if guard else "")


ITEM_COLUMNS = [
    "id", "user_uuid", "status", "status_code_info", "status_code_description", "provider_id",
    "needs_user_action", "authentication_expires_at", "last_successful_refresh", "last_try_refresh",
    "updated_at", "status_changed_at",
]  # fmt: skip
ACCOUNT_COLUMNS = [
    "id", "item_id", "name", "type", "currency_code", "balance", "accounting_balance", "instant_balance",
    "iban", "data_access", "last_refresh_status", "pro", "provider_id", "bridge_updated_at",
]  # fmt: skip
TRANSACTION_COLUMNS = [
    "id", "account_id", "amount", "currency_code", "date", "booking_date", "transaction_date", "value_date",
    "clean_description", "provider_description", "category_id", "operation_type", "future",
    "bridge_updated_at", "deleted_at",
]  # fmt: skip

UPSERT_USER = (
    "INSERT INTO users (uuid, external_user_id, created_at, updated_at) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (uuid) DO UPDATE SET external_user_id = COALESCE(excluded.external_user_id, "
    "users.external_user_id), updated_at = excluded.updated_at"
)
UPSERT_ITEM = _upsert(
    "items", "id", ITEM_COLUMNS, guard="last_try_refresh",
    custom={"status_changed_at": "CASE WHEN items.status = excluded.status THEN items.status_changed_at "
                                 "ELSE excluded.status_changed_at END"},
)  # fmt: skip
UPSERT_ACCOUNT = _upsert("accounts", "id", ACCOUNT_COLUMNS, keep=("name", "iban"), guard="bridge_updated_at")
UPSERT_TRANSACTION = _upsert(
    "transactions", "id", TRANSACTION_COLUMNS,
    keep=("clean_description", "provider_description"), guard="bridge_updated_at",
)  # fmt: skip


def _earliest(table: str, where: str) -> str:
    return f"UPDATE {table} SET deleted_at = %s WHERE {where} AND (deleted_at IS NULL OR deleted_at > %s)"  # noqa: S608


class Storage:
    def __init__(self, db: Database, codec: Codec | None = None) -> None:
        self.db = db
        self.codec = codec or PlainCodec()

    def __repr__(self) -> str:
        return f"Storage({self.db!r})"

    def transaction(self) -> Any:
        return self.db.transaction()

    # -- users and items -----------------------------------------------------------------------

    def upsert_user(self, tx: Tx, uuid: str, external_user_id: str | None = None) -> None:
        now = datetime.now(UTC)
        tx.execute(UPSERT_USER, (uuid, external_user_id, now, now))

    def upsert_item(self, tx: Tx, user_uuid: str, item: Mapping[str, Any]) -> None:
        status, now = item.get("status"), datetime.now(UTC)
        tx.execute(
            UPSERT_ITEM,
            (
                item["id"], user_uuid, status, item.get("status_code_info"),
                item.get("status_code_description"), item.get("provider_id"), status in USER_ACTION_STATUSES,
                parse_ts(item.get("authentication_expires_at")),
                parse_ts(item.get("last_successful_refresh")),
                parse_ts(item.get("last_try_refresh")), now, now,
            ),
        )  # fmt: skip

    def item_synced(self, tx: Tx, item_id: int) -> None:
        tx.execute("UPDATE items SET last_synced_at = %s WHERE id = %s", (datetime.now(UTC), item_id))

    # -- accounts and transactions -------------------------------------------------------------

    def upsert_accounts(self, tx: Tx, accounts: Iterable[Mapping[str, Any]]) -> None:
        enc = self.codec.encode
        rows = [
            (
                a["id"], a.get("item_id"), enc(clear(a.get("name"))), a.get("type"), a.get("currency_code"),
                money(a.get("balance")), money(a.get("accounting_balance")), money(a.get("instant_balance")),
                enc(clear(a.get("iban"))), a.get("data_access"), a.get("last_refresh_status"), a.get("pro"),
                a.get("provider_id"), parse_ts(a.get("updated_at")),
            )
            for a in accounts
        ]  # fmt: skip
        if rows:
            tx.executemany(UPSERT_ACCOUNT, rows)

    def upsert_transactions(self, tx: Tx, transactions: Iterable[Mapping[str, Any]]) -> None:
        enc = self.codec.encode
        rows = []
        for t in transactions:
            updated_at = parse_ts(t.get("updated_at"))
            rows.append(
                (
                    t["id"], t.get("account_id"), money(t.get("amount")), t.get("currency_code"),
                    parse_date(t.get("date")), parse_date(t.get("booking_date")),
                    parse_date(t.get("transaction_date")), parse_date(t.get("value_date")),
                    enc(clear(t.get("clean_description"))), enc(clear(t.get("provider_description"))),
                    t.get("category_id"), t.get("operation_type"), bool(t.get("future", False)),
                    updated_at, updated_at if t.get("deleted") else None,
                )
            )  # fmt: skip
        if rows:
            tx.executemany(UPSERT_TRANSACTION, rows)

    def cursor(self, account_id: int) -> datetime | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT transactions_cursor FROM accounts WHERE id = %s", (account_id,)
            ).fetchone()
        return to_datetime(row[0]) if row else None

    def advance_cursor(self, tx: Tx, account_id: int, cursor: datetime) -> None:
        """Move the account's cursor forward (never back), in the caller's transaction."""
        tx.execute(
            "UPDATE accounts SET transactions_cursor = %s WHERE id = %s "
            "AND (transactions_cursor IS NULL OR transactions_cursor < %s)",
            (cursor, account_id, cursor),
        )

    def reset_cursors(self, tx: Tx, item_id: int) -> None:
        """Forget how far the item's accounts were synced: the next sync reads everything."""
        tx.execute("UPDATE accounts SET transactions_cursor = NULL WHERE item_id = %s", (item_id,))

    def vanish_future(self, tx: Tx, account_id: int, seen: set[int], at: datetime) -> int:
        """After a full listing: future transactions we hold that Bridge no longer lists are gone."""
        rows = tx.execute(
            "SELECT id FROM transactions WHERE account_id = %s AND future = %s AND deleted_at IS NULL",
            (account_id, True),
        ).fetchall()
        gone = [(at, row[0]) for row in rows if row[0] not in seen]
        if gone:
            tx.executemany("UPDATE transactions SET deleted_at = %s WHERE id = %s", gone)
        return len(gone)

    # -- deletions: the earliest deletion time wins, whatever order events arrive in -----------

    def mark_account_deleted(self, tx: Tx, account_id: int, at: datetime) -> None:
        tx.execute(_earliest("accounts", "id = %s"), (at, account_id, at))

    def mark_item_deleted(self, tx: Tx, item_id: int, at: datetime) -> None:
        tx.execute(_earliest("items", "id = %s"), (at, item_id, at))
        tx.execute(_earliest("accounts", "item_id = %s"), (at, item_id, at))

    def mark_user_deleted(self, tx: Tx, user_uuid: str, at: datetime) -> None:
        self.upsert_user(tx, user_uuid)
        tx.execute(_earliest("users", "uuid = %s"), (at, user_uuid, at))
        tx.execute(_earliest("items", "user_uuid = %s"), (at, user_uuid, at))
        tx.execute(
            _earliest("accounts", "item_id IN (SELECT id FROM items WHERE user_uuid = %s)"),
            (at, user_uuid, at),
        )

    # -- the event ledger ----------------------------------------------------------------------

    def event_started(
        self, event_id: str, event: Mapping[str, Any], body: str, received_at: datetime
    ) -> None:
        content = event.get("content") or {}
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO webhook_events (id, type, item_id, received_at, status, attempts, body) "
                "VALUES (%s, %s, %s, %s, 'queued', 1, %s) ON CONFLICT (id) DO UPDATE SET "
                "attempts = webhook_events.attempts + 1, status = 'queued'",
                (event_id, event.get("type"), content.get("item_id"), received_at, self.codec.encode(body)),
            )

    def event_done(self, event_id: str) -> None:
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE webhook_events SET status = 'done', processed_at = %s, last_error = NULL "
                "WHERE id = %s",
                (datetime.now(UTC), event_id),
            )

    def event_purged(
        self, event_id: str, event: Mapping[str, Any], body: str, attempts: int, received_at: datetime
    ) -> None:
        content = event.get("content") or {}
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO webhook_events (id, type, item_id, received_at, status, attempts, body) "
                "VALUES (%s, %s, %s, %s, 'purged', %s, %s) ON CONFLICT (id) DO UPDATE SET status = 'purged'",
                (event_id, event.get("type", "?"), content.get("item_id"), received_at, attempts,
                 self.codec.encode(body)),
            )  # fmt: skip

    def event_failed(self, event_id: str, error: str, *, final: bool) -> None:
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE webhook_events SET status = %s, last_error = %s WHERE id = %s",
                ("failed" if final else "queued", error[:2000], event_id),
            )
