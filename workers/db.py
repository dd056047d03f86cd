"""One database interface over PostgreSQL (psycopg 3, a connection pool) and SQLite.

SQL is written once, with ``%s`` placeholders and ``INSERT … ON CONFLICT`` (both engines
speak it); for SQLite the placeholders become ``?`` and values are adapted to what SQLite
stores losslessly: ``Decimal`` as text (SQLite's NUMERIC would round it through a float),
timestamps as ISO 8601 UTC text with microseconds (so that they compare as text), dates
as ISO text and booleans as 0/1: value by value (:meth:`Tx.execute`), or a column at a time
(:func:`as_stored`, for rows built by the thousand). Reads adapt back through :func:`to_decimal` and
:func:`to_datetime`, which accept either engine's values. This module alone knows those formats.

PostgreSQL alone also takes bulk rows through ``COPY … FROM STDIN`` (:meth:`Tx.copy_rows`), in
COPY's binary format when given the columns' types.

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
A job's final ledger row is such a commit: what a sync records in Redis (workers.watermark) after it
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
from operator import attrgetter, methodcaller
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg_pool import ConnectionPool

from service.settings import mask_url

Dialect = Literal["postgresql", "sqlite"]

ASYNC_COMMIT = "SET LOCAL synchronous_commit TO off"  # this transaction only; see the module's docstring


class DuplicateKey(Exception):
    """A row sent by COPY has the key of a row already there (or of another sent with it)."""


class Tx:
    """A cursor inside one transaction; values are adapted for the engine."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return _qmarks(sql) if self.dialect == "sqlite" else sql

    def _params(self, params: Sequence[Any]) -> Sequence[Any]:
        return params if self.dialect == "postgresql" else _sqlite_values(params)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Tx:
        self._cursor.execute(self._sql(sql), self._params(params))
        return self

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], *, stored: bool = False) -> None:
        """``stored``: the values are already what the engine stores (:func:`as_stored`)."""
        self._cursor.executemany(self._sql(sql), rows if stored else [self._params(r) for r in rows])

    def max_variables(self) -> int:
        """How many values one statement may take: SQLite's limit (32,766 by default); PostgreSQL's."""
        if self.dialect == "sqlite":
            return int(self._cursor.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
        return 65_535

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
        Returns the number of rows sent; :class:`DuplicateKey` (the transaction then fails) when a row
        has the key of one already there."""
        if self.dialect != "postgresql":
            raise NotImplementedError("COPY is PostgreSQL's; use executemany on SQLite")
        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        sent = 0
        try:
            with self._cursor.copy(statement + (" (FORMAT BINARY)" if types else "")) as copy:
                if types:
                    copy.set_types(types)
                for row in rows:
                    copy.write_row(row)
                    sent += 1
        except psycopg.errors.UniqueViolation as exc:
            raise DuplicateKey(str(exc)) from exc
        return sent

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


@functools.lru_cache(maxsize=256)
def _qmarks(sql: str) -> str:
    """SQLite's placeholders, once per statement (a page's multi-row upsert holds 7,500 of them)."""
    return sql.replace("%s", "?")


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


def _sqlite_values(values: Sequence[Any]) -> list[Any]:
    """Values of any type as SQLite stores them (see the module's docstring)."""
    return [v if type(v) in _SQLITE_AS_IS else _SQLITE_BY_TYPE.get(type(v), _to_sqlite)(v) for v in values]


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

Kind = Literal["decimal", "date", "timestamp", "bool", "any"]
_ISO_MICROSECONDS = methodcaller("isoformat", timespec="microseconds")
# Timestamps as Bridge writes them: UTC, milliseconds. (Hours 00 to 23 only: from Python 3.14
# fromisoformat takes 24:00 as the next day's midnight.)
_BRIDGE_TIMES = re.compile(r"(?:\d{4}-\d\d-\d\dT(?:[01]\d|2[0-3]):\d\d:\d\d\.\d\d\dZ\n)+")


def as_stored(
    dialect: Dialect, kind: Kind, values: Sequence[Any], *, written: Sequence[str] | None = None
) -> Sequence[Any]:
    """A column of values of one kind (``Decimal``, ``date``, aware ``datetime``, ``bool``, or None; or
    ``any`` type) as the engine stores them, what :meth:`Tx.execute` would make of each: on PostgreSQL
    as they are, on SQLite in one pass. ``written``: the text each timestamp was parsed from by
    ``fromisoformat``. Text as Bridge writes it (``2026-11-24T14:26:41.575Z``) becomes SQLite's
    (``…41.575000+00:00``) by an edit, ten times cheaper than formatting the time (the shape alone
    would let ``2026-13-45`` through, hence only text that was parsed)."""
    if dialect == "postgresql" or not values:
        return values
    if kind == "bool":
        return list(map(int, values))
    if kind == "any":
        return _sqlite_values(values)
    # (A Decimal compared with None costs an isinstance on an ABC: the types say it sooner.)
    nulls = type(None) in set(map(type, values))
    if kind == "decimal":
        return [None if v is None else str(v) for v in values] if nulls else list(map(str, values))
    if kind == "date":
        return [None if v is None else v.isoformat() for v in values]
    if (
        written is not None
        and set(map(len, written)) == {24}
        and _BRIDGE_TIMES.fullmatch("\n".join(written) + "\n")
    ):
        return [stamp[:23] + "000+00:00" for stamp in written]
    if not nulls and set(map(attrgetter("tzinfo"), values)) == {UTC}:
        return list(map(_ISO_MICROSECONDS, values))
    return [None if v is None else iso_utc(v) for v in values]


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
    def transaction(self, *, durable: bool = True, read_only: bool = False) -> Iterator[Tx]:
        """One transaction: committed when the block ends, rolled back if it raises; ``durable=False``:
        committed asynchronously (see the module's docstring). ``read_only``: one that can write
        nothing and waits for no writer (PostgreSQL: ``READ ONLY``; SQLite: a deferred ``BEGIN``, which
        in WAL mode reads a snapshot while another connection holds the write lock)."""
        if self._pool is not None:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                if read_only:
                    cur.execute("SET TRANSACTION READ ONLY")
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
                lite.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
                try:
                    yield Tx(lite, "sqlite")
                    lite.execute("COMMIT")
                finally:
                    if self._sqlite.in_transaction:  # the block or its COMMIT failed
                        lite.execute("ROLLBACK")
            finally:
                if durable:
                    lite.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._sqlite is not None:
            self._sqlite.close()
