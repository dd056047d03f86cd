"""Idempotent, order-independent writes of users, items and accounts, and how Bridge's values are read.

Every write is an upsert keyed by Bridge's id with an ``updated_at`` guard, so an older
payload never overwrites a newer row and running any job twice, or jobs in any order,
leaves the same rows. Values Bridge obfuscates (``XXXX``, as under status 1100: see :func:`clear`)
are written as NULL and the upsert keeps the stored value (``COALESCE``). Deletions only set
``deleted_at`` (the earliest time we heard of), never drop a row. Transactions, which come by the
thousand, have a module of their own (:mod:`workers.writer`), and so has the event ledger
(:mod:`workers.ledger`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from workers.codec import Codec, PlainCodec
from workers.db import Database, Tx, to_datetime
from workers.providers import provider_of_id, provider_of_user

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
    if type(value) is Decimal:  # immutable: the same number as Decimal(str(value)), sooner
        return value
    if isinstance(value, float):
        raise TypeError("amounts must be parsed as Decimal, not float")
    return Decimal(str(value))


MASK = "XXXX"  # what Bridge shows in place of a sensitive value while an item is in 1100


def masked(text: str) -> bool:
    """Whether ``text`` is Bridge's mask itself (``XXXX``, or any run of X's and blanks holding it),
    not bank data. A real label may hold X's (``CB CARTE 4974XXXXXXXX1234 MONOPRIX``): it is data."""
    return MASK in text and not text.replace("X", "").strip()


def clear(value: Any) -> str | None:
    """A bank-data string, or None when it is Bridge's mask (see :func:`masked`)."""
    if value is None:
        return None
    text = str(value)
    return None if masked(text) else text


def clear_iban(value: Any) -> str | None:
    """An IBAN, or None when any of it is masked: an IBAN never holds four X's in a row
    (``FR76XXXXXXXXXXXX`` is a masked one)."""
    if value is None:
        return None
    text = str(value)
    return None if MASK in text else text


def _on_conflict(
    table: str,
    key: str,
    columns: list[str],
    keep: Iterable[str] = (),
    guard: str | None = None,
    custom: Mapping[str, str] | None = None,
) -> str:
    """``ON CONFLICT (key) DO UPDATE``; ``keep`` columns keep their value over a new NULL,
    ``custom`` columns take the given expression, and ``guard`` refuses an older payload."""
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
    sql = f"ON CONFLICT ({key}) DO UPDATE SET {sets}"
    return sql + (f" WHERE {_NEWER.format(t=table, col=guard)}" if guard else "")


def upsert_sql(table: str, key: str, columns: list[str], *, rows: int = 1, **conflict: Any) -> str:
    """``INSERT … VALUES (%s, …) ON CONFLICT …`` for one row (``executemany`` runs it per row), or for
    ``rows`` rows (SQLite meets a key twice in one statement as it would in two; PostgreSQL refuses).

    Table and column names come from our constants, never from input."""
    values = ", ".join(["(" + ", ".join(["%s"] * len(columns)) + ")"] * rows)
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values} "  # noqa: S608
    return sql + _on_conflict(table, key, columns, **conflict)


def merge_sql(table: str, source: str, key: str, columns: list[str], **conflict: Any) -> str:
    """The same upsert as :func:`upsert_sql`, as ONE statement over every row of ``source`` (a staging
    table whose ``key`` values are distinct: one statement may not update a row twice)."""
    names = ", ".join(columns)
    sql = f"INSERT INTO {table} ({names}) SELECT {names} FROM {source} "  # noqa: S608
    return sql + _on_conflict(table, key, columns, **conflict)


ITEM_COLUMNS = [
    "id", "user_uuid", "status", "status_code_info", "status_code_description", "provider_id",
    "needs_user_action", "authentication_expires_at", "last_successful_refresh", "last_try_refresh",
    "updated_at", "status_changed_at", "provider",
]  # fmt: skip
ACCOUNT_COLUMNS = [
    "id", "item_id", "name", "type", "currency_code", "balance", "accounting_balance", "instant_balance",
    "iban", "data_access", "last_refresh_status", "pro", "provider_id", "bridge_updated_at", "provider",
]  # fmt: skip
UPSERT_USER = (
    "INSERT INTO users (uuid, external_user_id, created_at, updated_at, provider) "
    "VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (uuid) DO UPDATE SET external_user_id = COALESCE(excluded.external_user_id, "
    "users.external_user_id), updated_at = excluded.updated_at"
)
# last_successful_refresh is the refresh of Bridge's that our last complete sync of the item saw (see
# Storage.item_synced): an upsert keeps it; the reconciliation sweep compares it with Bridge's.
UPSERT_ITEM = upsert_sql(
    "items", "id", ITEM_COLUMNS, guard="last_try_refresh", keep=("last_successful_refresh",),
    custom={"status_changed_at": "CASE WHEN items.status = excluded.status THEN items.status_changed_at "
                                 "ELSE excluded.status_changed_at END"},
)  # fmt: skip
UPSERT_ACCOUNT = upsert_sql(
    "accounts", "id", ACCOUNT_COLUMNS, keep=("name", "iban"), guard="bridge_updated_at"
)


def _earliest(table: str, where: str) -> str:
    return f"UPDATE {table} SET deleted_at = %s WHERE {where} AND (deleted_at IS NULL OR deleted_at > %s)"  # noqa: S608


class Storage:
    def __init__(self, db: Database, codec: Codec | None = None) -> None:
        self.db = db
        self.codec = codec or PlainCodec()

    def __repr__(self) -> str:
        return f"Storage({self.db!r})"

    def transaction(self, *, durable: bool = True) -> Any:
        return self.db.transaction(durable=durable)

    # -- users and items -----------------------------------------------------------------------

    def upsert_user(self, tx: Tx, uuid: str, external_user_id: str | None = None) -> None:
        now = datetime.now(UTC)
        tx.execute(UPSERT_USER, (uuid, external_user_id, now, now, provider_of_user(uuid)))

    def upsert_item(self, tx: Tx, user_uuid: str, item: Mapping[str, Any]) -> None:
        """The item as Bridge describes it, but for ``last_successful_refresh``: set by item_synced
        once a sync has fetched all that refresh brought (kept as it was here, none for a new item)."""
        status, now = item.get("status"), datetime.now(UTC)
        tx.execute(
            UPSERT_ITEM,
            (
                item["id"], user_uuid, status, item.get("status_code_info"),
                item.get("status_code_description"), item.get("provider_id"), status in USER_ACTION_STATUSES,
                parse_ts(item.get("authentication_expires_at")),
                None, parse_ts(item.get("last_try_refresh")), now, now, provider_of_id(item["id"]),
            ),
        )  # fmt: skip

    def user_deleted_at(self, tx: Tx, uuid: str) -> datetime | None:
        """When the user was marked deleted (user.deleted), None if not. In the transaction that has
        just upserted the user, whose row it then holds locked (see workers.jobs.user_deleted)."""
        row = tx.execute(
            "SELECT COALESCE(u.deleted_at, e.erased_at) FROM users u "
            "LEFT JOIN erased_users e ON e.uuid = u.uuid WHERE u.uuid = %s",
            (uuid,),
        ).fetchone()
        return None if row is None else to_datetime(row[0])

    def item_deleted_at(self, tx: Tx, item_id: int) -> datetime | None:
        """When we marked the item deleted (item.deleted, user.deleted, a 404), None if we did not."""
        row = tx.execute("SELECT deleted_at FROM items WHERE id = %s", (item_id,)).fetchone()
        return None if row is None else to_datetime(row[0])

    def deleted_accounts(self, tx: Tx, account_ids: Sequence[int]) -> set[int]:
        """Those of ``account_ids`` we marked deleted: deleted stays deleted, whatever Bridge still
        answers for a moment (a sync that runs after item.account.deleted writes nothing under them)."""
        if not account_ids:
            return set()
        marks = ", ".join(["%s"] * len(account_ids))
        sql = f"SELECT id FROM accounts WHERE deleted_at IS NOT NULL AND id IN ({marks})"  # noqa: S608
        return {int(row[0]) for row in tx.execute(sql, tuple(account_ids)).fetchall()}

    def vanish_accounts(self, tx: Tx, item_id: int, listed: Sequence[int], at: datetime) -> list[int]:
        """After a complete listing of the item's accounts: the live ones we hold that Bridge no longer
        lists are gone (an item.account.deleted we missed). Returns their ids."""
        rows = tx.execute(
            "SELECT id FROM accounts WHERE item_id = %s AND deleted_at IS NULL", (item_id,)
        ).fetchall()
        gone = sorted(set(int(row[0]) for row in rows) - set(listed))
        for account_id in gone:
            self.mark_account_deleted(tx, account_id, at)
        return gone

    def item_ids_of(self, user_uuid: str) -> list[int]:
        """The ids of the items we hold for the user, deleted ones included."""
        with self.db.transaction() as tx:
            rows = tx.execute("SELECT id FROM items WHERE user_uuid = %s ORDER BY id", (user_uuid,))
            return [int(row[0]) for row in rows.fetchall()]

    def item_synced(self, tx: Tx, item_id: int, refresh: datetime | None = None) -> None:
        """A sync of the whole item ended: when, and the refresh of Bridge's it saw (``refresh``, the
        item's ``last_successful_refresh`` when the sync began; never moved back). Only such a sync
        moves it, not an account's: the sweep finds a refresh whose webhooks were lost by comparing it
        with Bridge's (workers.reconcile), which one account's event must not hide."""
        tx.execute(
            "UPDATE items SET last_synced_at = %s, last_successful_refresh = CASE WHEN "
            "last_successful_refresh IS NULL OR last_successful_refresh < %s THEN %s "
            "ELSE last_successful_refresh END WHERE id = %s",
            (datetime.now(UTC), refresh, refresh, item_id),
        )

    # -- accounts and transactions -------------------------------------------------------------

    def upsert_accounts(self, tx: Tx, accounts: Iterable[Mapping[str, Any]]) -> None:
        enc = self.codec.encode
        rows = [
            (
                a["id"], a.get("item_id"), enc(clear(a.get("name")), "accounts.name"), a.get("type"),
                a.get("currency_code"), money(a.get("balance")), money(a.get("accounting_balance")),
                money(a.get("instant_balance")), enc(clear_iban(a.get("iban")), "accounts.iban"),
                a.get("data_access"), a.get("last_refresh_status"), a.get("pro"), a.get("provider_id"),
                parse_ts(a.get("updated_at")), provider_of_id(a["id"]),
            )
            for a in accounts
        ]  # fmt: skip
        if rows:
            tx.executemany(UPSERT_ACCOUNT, rows)

    # -- deletions: the earliest deletion time wins, whatever order events arrive in -----------

    def mark_account_deleted(self, tx: Tx, account_id: int, at: datetime) -> None:
        tx.execute(_earliest("accounts", "id = %s"), (at, account_id, at))

    def mark_item_deleted(self, tx: Tx, item_id: int, at: datetime) -> None:
        tx.execute(_earliest("items", "id = %s"), (at, item_id, at))
        tx.execute(_earliest("accounts", "item_id = %s"), (at, item_id, at))

    def mark_user_deleted(self, tx: Tx, user_uuid: str, at: datetime) -> None:
        """Not for a user we erased (workers.erasure): a late user.deleted brings no row of theirs back."""
        if tx.execute("SELECT 1 FROM erased_users WHERE uuid = %s", (user_uuid,)).fetchone() is not None:
            return
        self.upsert_user(tx, user_uuid)
        tx.execute(_earliest("users", "uuid = %s"), (at, user_uuid, at))
        tx.execute(_earliest("items", "user_uuid = %s"), (at, user_uuid, at))
        tx.execute(
            _earliest("accounts", "item_id IN (SELECT id FROM items WHERE user_uuid = %s)"),
            (at, user_uuid, at),
        )
