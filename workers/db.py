"""One database interface over PostgreSQL (psycopg 3, a connection pool) and SQLite.

SQL is written once, with ``%s`` placeholders and ``INSERT … ON CONFLICT`` (both engines
speak it); for SQLite the placeholders become ``?`` and values are adapted to what SQLite
stores losslessly: ``Decimal`` as text (SQLite's NUMERIC would round it through a float),
timestamps as ISO 8601 UTC text with microseconds (so that they compare as text), dates
as ISO text and booleans as 0/1. Reads adapt back through :func:`to_decimal` and
:func:`to_datetime`, which accept either engine's values.

PostgreSQL alone also takes bulk rows through ``COPY … FROM STDIN`` (:meth:`Tx.copy_rows`, in the
caller's transaction; :meth:`Database.copy_in`, a transaction of its own), in COPY's binary format
when given the columns' types.

Durability: a transaction commits synchronously (PostgreSQL waits for its WAL to reach the disk)
unless it is opened with ``durable=False``: then PostgreSQL answers the COMMIT at once and flushes
within a few hundred milliseconds (asynchronous commit, ``synchronous_commit = off`` for that
transaction only). A server crash in that window may lose such a transaction, never corrupt
anything, and WAL is flushed in order: once a later synchronous commit returns, every transaction
committed before it is on disk too. A job writes its pages that way and ends with a synchronous
commit (its ledger row), so nothing it reports done can be lost, and what a crash loses before that
is what a retry rewrites. SQLite does the same: in WAL mode with ``synchronous=NORMAL`` a commit
is not synced to disk (a power loss may drop it, never corrupt the file), and a durable transaction
commits with ``synchronous=FULL``, which syncs the WAL, and so every commit before it, to the disk.
A job's final ledger row is such a commit: what a sync records in Redis (workers.coverage) after it
can never outlive the rows it describes.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg_pool import ConnectionPool

from service.settings import mask_url

Dialect = Literal["postgresql", "sqlite"]

ASYNC_COMMIT = "SET LOCAL synchronous_commit TO off"  # this transaction only; see the module's docstring


class Tx:
    """A cursor inside one transaction; values are adapted for the engine."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql.replace("%s", "?") if self.dialect == "sqlite" else sql

    def _params(self, params: Sequence[Any]) -> Sequence[Any]:
        if self.dialect == "postgresql":
            return params
        return [
            v if type(v) in _SQLITE_AS_IS else _SQLITE_BY_TYPE.get(type(v), _to_sqlite)(v) for v in params
        ]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Tx:
        self._cursor.execute(self._sql(sql), self._params(params))
        return self

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], *, stored: bool = False) -> None:
        """``stored``: the values are already what the engine stores (nothing to adapt)."""
        values = rows if stored else [self._params(r) for r in rows]
        if self.dialect == "sqlite":
            values = self._insert_in_blocks(sql, values if isinstance(values, list) else list(values))
        self._cursor.executemany(self._sql(sql), values)

    def _insert_in_blocks(self, sql: str, values: list[Sequence[Any]]) -> list[Sequence[Any]]:
        """SQLite: when ``sql`` inserts one row ``VALUES (%s, …)``, send ``values`` many rows to a
        statement (a page of Bridge's in one; what is left in statements of a tenth, then a hundredth
        of that), in order, and return the few left over for the one-row statement. SQLite's cost is
        per statement run, far more than per value, and each run hands the interpreter lock to other
        threads and waits to take it back. A row that conflicts with an earlier one of its statement
        meets it exactly as it would one statement later."""
        limit = self._cursor.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        blocks = _sqlite_insert_blocks(sql, limit)
        if not blocks or len(values) < blocks[-1][1]:
            return values
        if set(map(len, values)) != {sql.count("%s")}:
            return values  # a row of another length: the one-row statement says which, as before
        for statement, per in blocks:
            whole = len(values) - len(values) % per
            if whole:
                rows = (list(chain.from_iterable(values[i : i + per])) for i in range(0, whole, per))
                self._cursor.executemany(statement, rows)
                values = values[whole:]
        return values

    def copy_rows(
        self,
        table: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        types: Sequence[str] | None = None,
    ) -> int:
        """``COPY table (columns) FROM STDIN`` the rows, in this transaction; PostgreSQL only.

        With ``types`` (the columns' PostgreSQL types, e.g. ``int8``, ``numeric``, ``timestamptz``)
        the rows travel in COPY's binary format, which costs a fraction of the text format to produce;
        each value must then be of the Python type psycopg dumps as that type (``int`` for ``int8``,
        ``str`` for ``text``…). ``table`` and ``columns`` are our own constants, never input.
        Returns the number of rows sent."""
        if self.dialect != "postgresql":
            raise NotImplementedError("COPY is PostgreSQL's; use executemany on SQLite")
        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        sent = 0
        with self._cursor.copy(statement + (" (FORMAT BINARY)" if types else "")) as copy:
            if types:
                copy.set_types(types)
            for row in rows:
                copy.write_row(row)
                sent += 1
        return sent

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


_ROWS_PER_INSERT = 500  # at most: a page of Bridge's (its largest ``limit``)
_ONE_ROW = re.compile(r"^INSERT INTO \w+ \([\w, ]+\) VALUES (\(%s(?:, %s)*\))")


@functools.lru_cache(maxsize=32)
def _sqlite_insert_blocks(sql: str, max_variables: int) -> list[tuple[str, int]]:
    """``sql``, an INSERT of one row ``VALUES (%s, …)`` whose only parameters are those values, as
    INSERTs of many rows, each with its number of rows, largest first: as many as SQLite's variable
    limit allows (up to ``_ROWS_PER_INSERT``), a tenth and a hundredth of that (at least two rows).
    None of them (an empty list) for any other statement."""
    match = _ONE_ROW.match(sql)
    if match is None or match.group(1).count("%s") != sql.count("%s"):
        return []
    most = min(_ROWS_PER_INSERT, max_variables // sql.count("%s"))
    sizes = sorted({n for n in (most, most // 10, most // 100) if n >= 2}, reverse=True)
    head, tail = sql[: match.start(1)], sql[match.end(1) :]
    return [(f"{head}{', '.join([match.group(1)] * n)}{tail}".replace("%s", "?"), n) for n in sizes]


_SQLITE_AS_IS = frozenset({str, int, float, bytes, type(None)})  # exactly these: _to_sqlite keeps them


def _to_sqlite(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


def _iso_date(value: date) -> str:
    return value.isoformat()


def iso_utc(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def to_decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def to_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


# _to_sqlite by exact type, without its isinstance chain (subclasses still go through it).
_SQLITE_BY_TYPE: dict[type, Callable[[Any], Any]] = {
    bool: int, Decimal: str, datetime: iso_utc, date: _iso_date,
}  # fmt: skip


class Database:
    """Open with :meth:`from_url`; use :meth:`transaction` for every read and write."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect: Dialect
        if url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
            # One direct connection first: an unreachable or misconfigured server fails here, at
            # once and with psycopg's own message, rather than as a pool timeout later.
            psycopg.connect(url, connect_timeout=10).close()
            self._pool: ConnectionPool | None = ConnectionPool(
                url, min_size=1, max_size=4, open=True, name="bridgehook", timeout=30
            )
            self._sqlite: sqlite3.Connection | None = None
        else:
            self.dialect = "sqlite"
            self._pool = None
            path = url.removeprefix("sqlite:///")
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: we issue BEGIN IMMEDIATE ourselves, so a writer takes the
            # lock at the start of its transaction instead of failing halfway through.
            self._sqlite = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            self._sqlite.execute("PRAGMA journal_mode=WAL")
            self._sqlite.execute("PRAGMA synchronous=NORMAL")
            self._sqlite.execute("PRAGMA busy_timeout=30000")
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> Database:
        return cls(url)

    def __repr__(self) -> str:
        return f"Database({mask_url(self.url)!r})"

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Tx]:
        """One transaction: committed when the block ends, rolled back if it raises; ``durable=False``:
        committed asynchronously (see the module's docstring)."""
        if self._pool is not None:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                if not durable:
                    cur.execute(ASYNC_COMMIT)
                yield Tx(cur, "postgresql")
            return
        assert self._sqlite is not None
        with self._lock:
            lite = self._sqlite.cursor()
            if durable:  # (SQLite refuses to change it inside a transaction)
                lite.execute("PRAGMA synchronous=FULL")
            try:
                lite.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(lite, "sqlite")
                    lite.execute("COMMIT")
                finally:
                    if self._sqlite.in_transaction:  # the block or its COMMIT failed
                        lite.execute("ROLLBACK")
            finally:
                if durable:
                    lite.execute("PRAGMA synchronous=NORMAL")

    def copy_in(
        self,
        table: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        types: Sequence[str],
        *,
        durable: bool = True,
        then: Callable[[Tx], None] | None = None,
    ) -> bool:
        """COPY the rows into ``table``, then run ``then``, in one transaction (``durable=False``:
        committed asynchronously): True, or False with nothing written when a row collides with one
        already there (a unique violation). PostgreSQL only; see :meth:`Tx.copy_rows` for ``types``."""
        if self._pool is None:
            raise NotImplementedError("COPY is PostgreSQL's")
        try:
            with self.transaction(durable=durable) as tx:
                tx.copy_rows(table, columns, rows, types)
                if then is not None:
                    then(tx)
        except psycopg.errors.UniqueViolation:
            return False
        return True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._sqlite is not None:
            self._sqlite.close()
