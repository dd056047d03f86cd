"""Idempotent, order-independent writes of Bridge objects, and the event ledger.

Every write is an upsert keyed by Bridge's id with an ``updated_at`` guard, so an older
payload never overwrites a newer row and running any job twice, or jobs in any order,
leaves the same rows. Values Bridge obfuscates (``XXXX``, as under status 1100: see :func:`clear`)
are written as NULL and the upsert keeps the stored value (``COALESCE``). Deletions only set
``deleted_at`` (the earliest time we heard of), never drop a row. Batches are written in the
caller's transaction (one transaction per page, not per row): through ``executemany``, and on
PostgreSQL a page of transactions through ``COPY`` into a staging table merged by one
``INSERT … SELECT … ON CONFLICT`` with the very same ``SET`` and guard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from itertools import chain
from operator import attrgetter, methodcaller
from typing import Any, NamedTuple, cast

from msgspec.structs import astuple

from workers.bridge import Transaction
from workers.codec import Codec, PlainCodec
from workers.db import Database, Tx, iso_utc, to_datetime

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


class _Memo(dict[Any, Any]):
    """A pure function of one value, memoised for one batch (a page holds a few dozen distinct days
    and descriptions). Only strings are remembered: a string never equals a value of another type,
    so every hit is exactly what the function would return."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        super().__init__()
        self.function = function

    def __missing__(self, value: Any) -> Any:
        result = self.function(value)
        if type(value) is str:
            self[value] = result
        return result


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


def _upsert(table: str, key: str, columns: list[str], **conflict: Any) -> str:
    """``INSERT … VALUES (%s, …) ON CONFLICT …`` for one row (``executemany`` runs it per row).

    Table and column names come from the constants below, never from input."""
    placeholders = ", ".join(["%s"] * len(columns))
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) "  # noqa: S608
    return sql + _on_conflict(table, key, columns, **conflict)


def _merge(table: str, source: str, key: str, columns: list[str], **conflict: Any) -> str:
    """The same upsert as :func:`_upsert`, as ONE statement over every row of ``source`` (a staging
    table whose ``key`` values are distinct: one statement may not update a row twice)."""
    names = ", ".join(columns)
    sql = f"INSERT INTO {table} ({names}) SELECT {names} FROM {source} "  # noqa: S608
    return sql + _on_conflict(table, key, columns, **conflict)


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
# last_successful_refresh is the refresh of Bridge's that our last complete sync of the item saw (see
# Storage.item_synced): an upsert keeps it; the reconciliation sweep compares it with Bridge's.
UPSERT_ITEM = _upsert(
    "items", "id", ITEM_COLUMNS, guard="last_try_refresh", keep=("last_successful_refresh",),
    custom={"status_changed_at": "CASE WHEN items.status = excluded.status THEN items.status_changed_at "
                                 "ELSE excluded.status_changed_at END"},
)  # fmt: skip
UPSERT_ACCOUNT = _upsert("accounts", "id", ACCOUNT_COLUMNS, keep=("name", "iban"), guard="bridge_updated_at")
_TRANSACTION_CONFLICT: dict[str, Any] = {
    "keep": ("clean_description", "provider_description"), "guard": "bridge_updated_at",
}  # fmt: skip
UPSERT_TRANSACTION = _upsert("transactions", "id", TRANSACTION_COLUMNS, **_TRANSACTION_CONFLICT)

# PostgreSQL: a page is COPYed into a session-private staging table and merged by one statement
# with exactly the upsert above (same SET, same guard). ``ON COMMIT DELETE ROWS`` empties it at
# every commit (PostgreSQL skips that for transactions that never touched a temporary table);
# ``IF NOT EXISTS`` makes it work on any pooled connection, and after a rollback that undid its
# creation. ``LIKE`` gives the staging table the column types but no index and no constraint.
TRANSACTION_STAGE = "bridgehook_stage_transactions"
PREPARE_TRANSACTION_STAGE = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {TRANSACTION_STAGE} "  # noqa: S608
    f"(LIKE transactions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS; DELETE FROM {TRANSACTION_STAGE}"
)
MERGE_TRANSACTIONS = _merge(
    "transactions", TRANSACTION_STAGE, "id", TRANSACTION_COLUMNS, **_TRANSACTION_CONFLICT
)
# The PostgreSQL types of TRANSACTION_COLUMNS, as the schema declares them (a test holds the two
# equal): pages travel in COPY's binary format, several times cheaper to produce than its text.
TRANSACTION_PG_TYPES = [
    "int8", "int8", "numeric", "text", "date", "date", "date", "date", "text", "text", "int8", "text",
    "bool", "timestamptz", "timestamptz",
]  # fmt: skip
# An account's live future transactions: the very condition of the partial index transactions_future
# (migration 3), so that both engines read those few rows by it and not the account's whole history.
LIVE_FUTURE_IDS = "SELECT id FROM transactions WHERE account_id = %s AND future = TRUE AND deleted_at IS NULL"
COPY_MIN_ROWS = 16  # below this a pipelined executemany is as quick as three round trips


def _earliest(table: str, where: str) -> str:
    return f"UPDATE {table} SET deleted_at = %s WHERE {where} AND (deleted_at IS NULL OR deleted_at > %s)"  # noqa: S608


_INT, _TEXT = {int}, {str, type(None)}
# Columns whose values reach COPY as Bridge sent them (or as the codec made them): binary COPY needs
# exactly these Python types. transaction_rows builds the other columns with exactly their types.
_PASS_THROUGH = ((1, _INT), (3, _TEXT), (8, _TEXT), (9, _TEXT), (10, {int, type(None)}), (11, _TEXT))


class TransactionRows(NamedTuple):
    rows: list[tuple[Any, ...]]  # in TRANSACTION_COLUMNS order, adapted
    latest: datetime | None  # the latest updated_at among them
    copy: bool  # PostgreSQL writes them with COPY and one merge (see _copyable)
    future_ids: Sequence[Any] = ()  # ids of its future transactions that are not deleted
    stored: bool = False  # values already as the engine stores them (SQLite: text, 0/1), not adapted again


def _sqlite_day(value: Any) -> str | None:
    """parse_date, as SQLite stores it (db.py: ISO text)."""
    day = parse_date(value)
    return None if day is None else day.isoformat()


def _sqlite_time(value: datetime | None) -> str | None:
    """A parsed timestamp as SQLite stores it (db.py's iso_utc)."""
    return None if value is None else iso_utc(value)


_fromiso = datetime.fromisoformat
_NONE = type(None)
_ISO_MICROSECONDS = methodcaller("isoformat", timespec="microseconds")
_FIELD = {name: n for n, name in enumerate(Transaction.__struct_fields__)}
# (Hours 00 to 23 only: from Python 3.14 fromisoformat takes 24:00 as the next day's midnight.)
_BRIDGE_TIMES = re.compile(r"(?:\d{4}-\d\d-\d\dT(?:[01]\d|2[0-3]):\d\d:\d\d\.\d\d\dZ\n)+")


def _sqlite_bridge_times(stamps: Sequence[str]) -> list[str] | None:
    """Timestamps exactly as Bridge writes them (``2026-11-24T14:26:41.575Z``: UTC, milliseconds) as
    SQLite stores them (``iso_utc``: ``…41.575000+00:00``), by editing the text; None unless every one
    has exactly that shape. Formatting a datetime costs ten times as much, and a full sync formats one
    per transaction. Only for stamps ``fromisoformat`` has accepted: the shape alone would let
    ``2026-13-45`` through. All 24 characters long, the joined text matches stamp by stamp."""
    if set(map(len, stamps)) != {24} or not _BRIDGE_TIMES.fullmatch("\n".join(stamps) + "\n"):
        return None
    return [stamp[:23] + "000+00:00" for stamp in stamps]


def _copyable(rows: list[tuple[Any, ...]]) -> bool:
    """Whether the COPY-and-merge path writes exactly what ``executemany`` would: ids distinct (one
    statement may not update a row twice; in order, a later duplicate may) and every pass-through
    value of the type binary COPY dumps (anything odd goes row by row and fails, or not, as before)."""
    ids = {row[0] for row in rows}
    if len(ids) != len(rows) or not {type(i) for i in ids} <= _INT:
        return False
    return all({type(row[col]) for row in rows} <= allowed for col, allowed in _PASS_THROUGH)


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
        tx.execute(UPSERT_USER, (uuid, external_user_id, now, now))

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
                None, parse_ts(item.get("last_try_refresh")), now, now,
            ),
        )  # fmt: skip

    def user_deleted_at(self, tx: Tx, uuid: str) -> datetime | None:
        """When the user was marked deleted (user.deleted), None if not. In the transaction that has
        just upserted the user, whose row it then holds locked (see workers.jobs.user_deleted)."""
        row = tx.execute("SELECT deleted_at FROM users WHERE uuid = %s", (uuid,)).fetchone()
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
                parse_ts(a.get("updated_at")),
            )
            for a in accounts
        ]  # fmt: skip
        if rows:
            tx.executemany(UPSERT_ACCOUNT, rows)

    def transaction_rows(self, transactions: Iterable[Mapping[str, Any] | Transaction]) -> TransactionRows:
        """A page of Bridge transactions as rows to write (no I/O: a prefetching thread may build them):
        dicts, or :class:`Transaction` structs (a page the client decoded strictly), the same rows."""
        page: list[Any] = transactions if isinstance(transactions, list) else list(transactions)
        if page and type(page[0]) is Transaction:
            return self._typed_rows(page)
        transactions = cast(list[Mapping[str, Any]], page)
        enc = None if type(self.codec) is PlainCodec else self.codec.encode
        days, texts = _Memo(parse_date), _Memo(clear)
        rows = []
        for t in transactions:
            get = t.get
            updated_at, amount = parse_ts(get("updated_at")), get("amount")
            clean, provider = texts[get("clean_description")], texts[get("provider_description")]
            if enc is not None:
                clean = enc(clean, "transactions.clean_description")
                provider = enc(provider, "transactions.provider_description")
            rows.append(
                (
                    t["id"], get("account_id"), amount if type(amount) is Decimal else money(amount),
                    get("currency_code"), days[get("date")], days[get("booking_date")],
                    days[get("transaction_date")], days[get("value_date")], clean, provider,
                    get("category_id"), get("operation_type"), bool(get("future", False)),
                    updated_at, updated_at if get("deleted") else None,
                )
            )  # fmt: skip
        latest = max((row[13] for row in rows if row[13] is not None), default=None)
        copy = self.db.dialect == "postgresql" and len(rows) >= COPY_MIN_ROWS and _copyable(rows)
        future = [t["id"] for t in transactions if t.get("future") and not t.get("deleted")]
        return TransactionRows(rows, latest, copy, future)

    def _typed_rows(self, page: list[Transaction]) -> TransactionRows:
        """transaction_rows of a strictly decoded page: the very same rows (descriptions through the
        codec as there), built column by column: each conversion runs once per distinct value (a page
        holds a few dozen days) and the rest in C (``map``, ``zip``) rather than a Python step per
        field of every row. On SQLite the values come out as db.py stores them (Decimal and times as
        text, bools as 0/1), so that the page is not adapted again value by value."""
        enc = None if type(self.codec) is PlainCodec else self.codec.encode
        sqlite = self.db.dialect == "sqlite"
        columns = list(zip(*map(astuple, page), strict=True))  # the page column by column, in C

        def column(name: str) -> Sequence[Any]:
            return columns[_FIELD[name]]

        ids, account_ids, amounts = column("id"), column("account_id"), column("amount")
        if sqlite:  # (a Decimal compared with None costs an isinstance on an ABC: look at types instead)
            nulls = _NONE in set(map(type, amounts))
            amounts = [None if a is None else str(a) for a in amounts] if nulls else list(map(str, amounts))
        # Days: parse_date once per distinct day of the page, whichever of the four columns holds it.
        days = [column(name) for name in ("date", "booking_date", "transaction_date", "value_date")]
        day = _sqlite_day if sqlite else parse_date
        parsed = {v: day(v) for v in set().union(*days)}
        if not all(k is v or (type(k) is str and type(v) is str and k == v) for k, v in parsed.items()):
            days = [list(map(parsed.__getitem__, values)) for values in days]
        # Descriptions: clear() changes only a value holding XXXX ("\0" between values: no false match).
        texts = [column("clean_description"), column("provider_description")]
        if MASK in "\0".join(filter(None, chain(*texts))):
            texts = [list(map(clear, values)) for values in texts]
        if enc is not None:  # as transaction_rows encodes them
            texts = [
                [enc(v, "transactions.clean_description") for v in texts[0]],
                [enc(v, "transactions.provider_description") for v in texts[1]],
            ]
        flags, deleted, stamps = column("future"), column("deleted"), column("updated_at")
        times: list[Any]
        zones: set[Any] = set()
        if None in stamps or "" in stamps:
            times = list(map(parse_ts, stamps))
            latest = max((t for t in times if t is not None), default=None)
        else:  # parse_ts, in C
            times = list(map(_fromiso, stamps))
            zones = set(map(attrgetter("tzinfo"), times))
            if None in zones:
                times = [t if t.tzinfo is not None else t.replace(tzinfo=UTC) for t in times]
            latest = max(times, default=None)
        future: Sequence[Any] = flags
        if sqlite:  # iso_utc: Bridge's own text edited, or in C when every time is in UTC already
            stored = _sqlite_bridge_times(stamps) if zones == {UTC} else None
            times = stored or list(map(_ISO_MICROSECONDS if zones == {UTC} else _sqlite_time, times))
            future = list(map(int, flags))
        gone = (
            [t if d else None for t, d in zip(times, deleted, strict=True)]
            if True in deleted
            else [None] * len(page)
        )
        rows = list(zip(
            ids, account_ids, amounts, column("currency_code"), *days, *texts, column("category_id"),
            column("operation_type"), future, times, gone, strict=True,
        ))  # fmt: skip
        # Every value Bridge sent has its binary COPY type already (msgspec checked): left to check are
        # what types cannot say (ids distinct, account_id present) and what the codec made.
        copy = (
            not sqlite
            and len(rows) >= COPY_MIN_ROWS
            and len(set(ids)) == len(ids)
            and None not in account_ids
            and (enc is None or all({type(v) for v in values} <= _TEXT for values in texts))
        )
        future_ids = (
            [i for i, f, d in zip(ids, flags, deleted, strict=True) if f and not d] if True in flags else []
        )
        return TransactionRows(rows, latest, copy, future_ids, stored=sqlite)

    def write_transactions(self, tx: Tx, batch: TransactionRows) -> None:
        """Write rows built by :meth:`transaction_rows`, in the caller's transaction."""
        if batch.copy and tx.dialect == "postgresql":
            tx.execute(PREPARE_TRANSACTION_STAGE)
            tx.copy_rows(TRANSACTION_STAGE, TRANSACTION_COLUMNS, batch.rows, TRANSACTION_PG_TYPES)
            tx.execute(MERGE_TRANSACTIONS)
        elif batch.rows:  # SQLite, a few rows, or a page binary COPY cannot take as it is: row by row
            tx.executemany(UPSERT_TRANSACTION, batch.rows, stored=batch.stored)

    def holds(self, batch: TransactionRows) -> bool:
        """Whether a sync may hold ``batch`` back to write it with the pages after it by
        :meth:`write_pages`: on PostgreSQL a page COPY can take as it is, on SQLite any page of rows."""
        return bool(batch.rows) and (batch.copy or self.db.dialect == "sqlite")

    def write_pages(self, *batches: TransactionRows, then: Callable[[Tx], None] | None = None) -> bool:
        """Write several pages :meth:`holds` accepted, then run ``then``, in one transaction. On
        PostgreSQL, with one COPY of pages none of whose ids is known yet (a new account's history:
        most rows we ever write): the upsert would insert each row as it is, which a plain COPY does
        for a fraction of the cost. False, with nothing written, when a row turns out to exist
        already (in the table, or twice among the pages). On SQLite, with the upsert, always True:
        its cost is per commit. Committed asynchronously, as every page of a sync (see
        :mod:`workers.sync`)."""
        if self.db.dialect == "sqlite":
            with self.transaction(durable=False) as tx:
                for batch in batches:
                    self.write_transactions(tx, batch)
                if then is not None:
                    then(tx)
            return True
        if not all(batch.copy for batch in batches):
            return False
        rows = chain.from_iterable(batch.rows for batch in batches)
        types = TRANSACTION_PG_TYPES
        return self.db.copy_in("transactions", TRANSACTION_COLUMNS, rows, types, durable=False, then=then)

    def upsert_transactions(self, tx: Tx, transactions: Iterable[Mapping[str, Any]]) -> datetime | None:
        """Write a page of transactions; return the latest ``updated_at`` among them (None if none)."""
        batch = self.transaction_rows(transactions)
        self.write_transactions(tx, batch)
        return batch.latest

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

    def position(self, account_id: int) -> tuple[datetime | None, dict[str, Any] | None]:
        """In one read: the account's cursor, and where its unfinished listing stopped (see
        :meth:`save_listing`; None if none)."""
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT transactions_cursor, listing FROM accounts WHERE id = %s", (account_id,)
            ).fetchone()
        if row is None:
            return None, None
        return to_datetime(row[0]), (dict(json.loads(row[1])) if row[1] else None)

    def save_listing(self, tx: Tx, account_id: int, state: Mapping[str, Any] | None) -> None:
        """Where the account's listing stands, in the transaction that writes its pages up to there
        (None: the listing ended). Not bank data: a next_uri, times and transaction ids."""
        value = None if state is None else json.dumps(state, separators=(",", ":"))
        tx.execute("UPDATE accounts SET listing = %s WHERE id = %s", (value, account_id))

    def reset_cursors(self, tx: Tx, account_ids: Sequence[int]) -> None:
        """Forget how far these accounts were synced: their next sync reads everything."""
        forget = "UPDATE accounts SET transactions_cursor = NULL WHERE id = %s"
        tx.executemany(forget, [(account_id,) for account_id in account_ids])

    def vanish_future(self, tx: Tx, account_id: int, seen: set[int], at: datetime) -> int:
        """After a full listing: future transactions we hold that Bridge no longer lists are gone."""
        rows = tx.execute(LIVE_FUTURE_IDS, (account_id,)).fetchall()
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
        self,
        event_id: str,
        event: Mapping[str, Any],
        body: str,
        received_at: datetime,
        *,
        durable: bool = True,
        done: bool = False,
    ) -> None:
        """``durable=False``: committed asynchronously, for a job whose ledger row ends done or failed by
        a synchronous commit (which makes this one durable too; see workers.db). ``done``: the job had
        nothing left to do (an earlier sync covered its event): the row goes in done at once."""
        content = event.get("content") or {}
        with self.db.transaction(durable=durable) as tx:
            tx.execute(
                "INSERT INTO webhook_events (id, type, item_id, received_at, status, attempts, body, "
                "processed_at) VALUES (%s, %s, %s, %s, %s, 1, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                "attempts = webhook_events.attempts + 1, status = excluded.status, processed_at = "
                "COALESCE(excluded.processed_at, webhook_events.processed_at), last_error = CASE WHEN "
                "excluded.status = 'done' THEN NULL ELSE webhook_events.last_error END",
                (
                    event_id,
                    event.get("type"),
                    content.get("item_id"),
                    received_at,
                    "done" if done else "queued",
                    self.codec.encode(body, "webhook_events.body"),
                    datetime.now(UTC) if done else None,
                ),
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
                 self.codec.encode(body, "webhook_events.body")),
            )  # fmt: skip

    def event_failed(self, event_id: str, error: str, *, final: bool) -> None:
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE webhook_events SET status = %s, last_error = %s WHERE id = %s",
                ("failed" if final else "queued", error[:2000], event_id),
            )
