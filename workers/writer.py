"""Writing transactions: one page of Bridge's to its rows, and each account's listing to its end.

One page goes this way (:mod:`workers.sync` fetches it, in a thread of its own; this module writes it):

1. ``resources``: the page as the client decoded it, :class:`~workers.bridge.Transaction` structs (or
   dicts, for a page that does not fit them, converted into the same structs by :func:`_structs`).
2. :meth:`Writer.page` turns them into a :class:`Page`: rows in ``TRANSACTION_COLUMNS`` order, as the
   engine stores them (:func:`workers.db.as_stored`), the latest ``updated_at``, the ids of its live
   future transactions, and whether PostgreSQL's binary COPY can take it as it is.
3. :meth:`Writer.add` writes it as part of its account's :class:`Listing`:

   - a page of a whole listing is held back until ``HELD_ROWS`` rows or the listing's end, and the
     held pages are written together: on PostgreSQL by one COPY straight into ``transactions`` (ids
     never seen, a new account's history: most rows we ever write), on SQLite by the upsert in one
     transaction (its cost is per commit);
   - any other page goes in a transaction of its own: on PostgreSQL COPYed into a staging table and
     merged by one ``INSERT … SELECT … ON CONFLICT``, or upserted row by row when it is short or COPY
     cannot take its values; on SQLite upserted by statements of many rows;
   - a COPY that meets an id already there writes nothing: its pages go the second way, and so does
     the rest of the account.

4. In the same transaction as its pages, what the listing is now: its position (the next page's
   ``next_uri``, the newest ``updated_at`` and the future ids seen so far), so that an attempt that
   stops is followed by one that goes on from there; with the last page, its end (:class:`End`): the
   account's cursor, the future transactions a whole listing no longer shows, a resync's reset.

Every upsert is keyed by Bridge's id with an ``updated_at`` guard (an older payload never overwrites a
newer row), keeps a stored description over Bridge's mask (``COALESCE``), and turns ``deleted`` into
``deleted_at``: any pages, in any order, any number of times, leave the same rows. Every transaction
here commits asynchronously on PostgreSQL (``durable=False``, see :mod:`workers.db`): the job's
ledger row, committed synchronously at its end, makes them durable together.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from operator import attrgetter
from typing import Any, NamedTuple, cast

from msgspec.structs import astuple

from workers.bridge import Transaction
from workers.codec import Codec, PlainCodec
from workers.db import Database, DuplicateKey, Tx, as_stored, to_datetime
from workers.storage import MASK, clear, merge_sql, money, parse_date, parse_ts, upsert_sql

TRANSACTION_COLUMNS = [
    "id", "account_id", "amount", "currency_code", "date", "booking_date", "transaction_date", "value_date",
    "clean_description", "provider_description", "category_id", "operation_type", "future",
    "bridge_updated_at", "deleted_at",
]  # fmt: skip
# The PostgreSQL types of TRANSACTION_COLUMNS, as the schema declares them (a test holds the two equal):
# pages travel in COPY's binary format, several times cheaper to produce than its text.
TRANSACTION_PG_TYPES = [
    "int8", "int8", "numeric", "text", "date", "date", "date", "date", "text", "text", "int8", "text",
    "bool", "timestamptz", "timestamptz",
]  # fmt: skip
_CONFLICT: dict[str, Any] = {
    "keep": ("clean_description", "provider_description"),
    "guard": "bridge_updated_at",
}
UPSERT_TRANSACTION = upsert_sql("transactions", "id", TRANSACTION_COLUMNS, **_CONFLICT)

# PostgreSQL: a page is COPYed into a session-private staging table and merged by one statement with
# exactly the upsert above (same SET, same guard). ``ON COMMIT DELETE ROWS`` empties it at every commit
# (PostgreSQL skips that for transactions that never touched a temporary table); ``IF NOT EXISTS``
# makes it work on any pooled connection, and after a rollback that undid its creation. ``LIKE`` gives
# the staging table the column types but no index and no constraint.
TRANSACTION_STAGE = "bridgehook_stage_transactions"
PREPARE_TRANSACTION_STAGE = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {TRANSACTION_STAGE} "  # noqa: S608
    f"(LIKE transactions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS; DELETE FROM {TRANSACTION_STAGE}"
)
MERGE_TRANSACTIONS = merge_sql("transactions", TRANSACTION_STAGE, "id", TRANSACTION_COLUMNS, **_CONFLICT)
# An account's live future transactions: the very condition of the partial index transactions_future
# (migration 3), so that both engines read those few rows by it and not the account's whole history.
LIVE_FUTURE_IDS = "SELECT id FROM transactions WHERE account_id = %s AND future = TRUE AND deleted_at IS NULL"
COPY_MIN_ROWS = 16  # below this a pipelined executemany is as quick as COPY's three round trips
HELD_ROWS = 5000  # rows of held pages written in one transaction (ten of Bridge's pages of 500)
_ROWS_PER_INSERT = 500  # SQLite: at most a page of Bridge's (its largest ``limit``) to a statement


class Page(NamedTuple):
    """One page of transactions, ready to write."""

    rows: list[tuple[Any, ...]]  # in TRANSACTION_COLUMNS order, as the engine stores them
    latest: datetime | None  # the latest updated_at among them
    copy: bool  # PostgreSQL's binary COPY takes the rows as they are
    future_ids: Sequence[int] = ()  # ids of its future transactions that are not deleted


@dataclass
class Listing:
    """One account's listing being written: what it asks Bridge for, and what it has seen so far."""

    account_id: int
    cursor: datetime | None  # the account's cursor when the listing began (None for a whole listing)
    since: datetime | None  # what it asks Bridge for: None, every transaction (a whole listing)
    started: datetime  # when it began (an earlier attempt's, when resumed)
    reset: bool = False  # a resync's whole listing: the cursor becomes what it saw
    resumed: bool = False  # it goes on where an earlier attempt stopped
    newest: datetime | None = None  # the latest updated_at written (at first, the cursor)
    future: set[int] = field(default_factory=set)  # live future ids seen (a whole listing's end needs them)
    written: int = 0  # rows written
    saved: bool = False  # a position of it is stored: its end must be written, even on an empty page
    copying: bool = True  # its pages may still go by COPY
    held: list[Page] = field(default_factory=list)
    held_rows: int = 0
    held_mark: Position | End | None = None
    # The accounts listed together with it by one listing of the user's (see Writer.add_group), or ().
    group: tuple[int, ...] = ()
    # A whole listing of an account of which no transaction was stored when it began: it shows all
    # there is to know, deletions included (there is nothing of the account's to delete).
    first: bool = False

    @classmethod
    def begin(
        cls, account_id: int, cursor: datetime | None, since: datetime | None, *, reset: bool
    ) -> Listing:
        """A listing from page 1 (``since`` None: a whole one; ``reset``: a resync's)."""
        return cls(account_id, cursor, since, datetime.now(UTC), reset and since is None, newest=cursor)

    @classmethod
    def resume(
        cls, account_id: int, cursor: datetime | None, saved: Mapping[str, Any], *, reset: bool
    ) -> Listing:
        """A listing where an earlier attempt stopped, from the position it saved with its pages."""
        since, newest = parse_ts(saved.get("since")), parse_ts(saved.get("newest"))
        return cls(
            account_id, cursor, since, parse_ts(saved.get("started")) or datetime.now(UTC),
            (reset or bool(saved.get("reset"))) and since is None, resumed=True, saved=True,
            newest=_later(cursor, newest),
            future=set(saved.get("future") or ()), group=tuple(saved.get("group") or ()),
        )  # fmt: skip

    @property
    def whole(self) -> bool:
        return self.since is None


class Position(NamedTuple):
    """Where a listing stands after a page: written with it, so that a later attempt resumes there."""

    account_id: int
    state: str  # JSON: next (the next page's next_uri), since, newest, future, started, reset


class End(NamedTuple):
    """What a listing's last page ends, in its transaction."""

    account_id: int
    whole: bool  # every transaction was listed: future ones it no longer shows are gone
    newest: datetime | None  # the cursor it sets (None: none; see Writer.add)
    future: frozenset[int]  # the live future ids it showed
    reset: bool  # the cursor becomes ``newest`` whatever it was
    cap: datetime | None  # a resumed listing's cursor is no later than when it began


class Writer:
    def __init__(self, db: Database, codec: Codec | None = None) -> None:
        self.db = db
        self.codec = codec or PlainCodec()

    def __repr__(self) -> str:
        return f"Writer({self.db!r})"

    # -- a page's rows --------------------------------------------------------------------------

    def page(self, resources: Sequence[Transaction] | Sequence[Mapping[str, Any]]) -> Page:
        """A page of Bridge's as rows to write (no I/O: the prefetching thread builds them). Built
        column by column: each conversion runs once per distinct value (a page holds a few dozen days)
        and the rest in C (``map``, ``zip``), not a Python step per field of every row."""
        if not resources:
            return Page([], None, False)
        structs: list[Transaction]
        if type(resources[0]) is Transaction:
            structs, exact = cast(list[Transaction], list(resources)), True
        else:
            structs, exact = _structs(cast(Sequence[Mapping[str, Any]], resources))
        dialect, enc = self.db.dialect, None if type(self.codec) is PlainCodec else self.codec.encode
        columns = list(zip(*map(astuple, structs), strict=True))  # the page column by column, in C

        def column(name: str) -> Sequence[Any]:
            return columns[_FIELD[name]]

        sent_ids = column("id")  # (as Bridge sent them: the future ids the listing keeps)
        if not exact:  # values of types we did not expect go as the engine takes any value
            for name in _AS_THEY_ARE_NAMES:
                columns[_FIELD[name]] = tuple(as_stored(dialect, "any", columns[_FIELD[name]]))
        ids, account_ids = column("id"), column("account_id")
        # Days: parse_date once per distinct day of the page, whichever of the four columns holds it.
        days = [column(name) for name in ("date", "booking_date", "transaction_date", "value_date")]
        distinct = list(set().union(*days))
        parsed = dict(zip(distinct, as_stored(dialect, "date", list(map(parse_date, distinct))), strict=True))
        if not all(k is v or (type(k) is str and type(v) is str and k == v) for k, v in parsed.items()):
            days = [list(map(parsed.__getitem__, values)) for values in days]
        # Descriptions: clear() changes only a value holding the mask ("\0" between values: no false match).
        texts = [column("clean_description"), column("provider_description")]
        if MASK in "\0".join(filter(None, chain(*texts))):
            texts = [list(map(clear, values)) for values in texts]
        if enc is not None:
            texts = [
                [enc(v, "transactions.clean_description") for v in texts[0]],
                [enc(v, "transactions.provider_description") for v in texts[1]],
            ]
        flags, deleted, stamps = column("future"), column("deleted"), column("updated_at")
        times: Sequence[Any]
        if None in stamps or "" in stamps:
            times = list(map(parse_ts, stamps))
            latest = max((t for t in times if t is not None), default=None)
            written = None
        else:  # parse_ts, in C
            times, written = list(map(datetime.fromisoformat, stamps)), stamps
            if None in set(map(attrgetter("tzinfo"), times)):
                times = [t if t.tzinfo is not None else t.replace(tzinfo=UTC) for t in times]
            latest = max(times, default=None)
        times = as_stored(dialect, "timestamp", times, written=written)
        gone = (
            [t if d else None for t, d in zip(times, deleted, strict=True)]
            if True in deleted
            else [None] * len(ids)
        )
        rows = list(zip(
            ids, account_ids, as_stored(dialect, "decimal", column("amount")), column("currency_code"), *days,
            *texts, column("category_id"), column("operation_type"), as_stored(dialect, "bool", flags), times,
            gone, strict=True,
        ))  # fmt: skip
        # Every value a strictly decoded page holds has its binary COPY type already (msgspec checked):
        # left to check are what types cannot say (ids distinct, account_id present) and what the codec
        # made.
        copy = (
            dialect == "postgresql"
            and exact
            and len(rows) >= COPY_MIN_ROWS
            and len(set(ids)) == len(ids)
            and None not in account_ids
            and (enc is None or all({type(v) for v in values} <= _TEXT for values in texts))
        )
        live = zip(sent_ids, flags, deleted, strict=True)
        future_ids = [i for i, f, d in live if f and not d] if True in flags else []
        return Page(rows, latest, copy, future_ids)

    def write(self, tx: Tx, page: Page) -> None:
        """Write one page in the caller's transaction: COPY and merge, or the upsert."""
        if page.copy and tx.dialect == "postgresql":
            tx.execute(PREPARE_TRANSACTION_STAGE)
            tx.copy_rows(TRANSACTION_STAGE, TRANSACTION_COLUMNS, page.rows, TRANSACTION_PG_TYPES)
            tx.execute(MERGE_TRANSACTIONS)
        elif page.rows and tx.dialect == "sqlite":
            _upsert_in_blocks(tx, page.rows)
        elif page.rows:  # a few rows, or values binary COPY cannot take as they are: row by row
            tx.executemany(UPSERT_TRANSACTION, page.rows, stored=True)

    # -- listings --------------------------------------------------------------------------------

    def add(self, listing: Listing, page: Page, next_uri: str | None) -> None:
        """Write ``page`` of ``listing`` (held back, or at once, see the module's docstring) with where
        the listing stands after it: its next page's ``next_uri``, or (None) its end."""
        listing.future.update(page.future_ids)
        listing.newest = _later(listing.newest, page.latest)
        last = next_uri is None
        mark = self._end(listing) if next_uri is None else self._position(listing, next_uri)
        if (
            listing.copying
            and listing.whole
            and bool(page.rows)
            and (page.copy or self.db.dialect == "sqlite")
        ):
            listing.held.append(page)
            listing.held_rows += len(page.rows)
            listing.held_mark = mark
            if last or listing.held_rows >= HELD_ROWS:
                listing.copying = self.flush(listing)
        else:
            listing.copying = False
            self.flush(listing)
            # Nothing to write: no rows, a cursor that would not move, nothing to close (a delta that
            # found nothing new, most refreshes): no transaction at all.
            moves = listing.newest is not None and listing.newest != listing.cursor
            closes = (
                listing.saved or moves or (listing.whole and (listing.newest is not None or listing.reset))
            )
            # A page that is not the last saves where the listing stands even when it has no rows of
            # ours: it was a call spent, and the next attempt goes on after it.
            idle = not page.rows and last and not closes
            if not idle:
                with self.db.transaction(durable=False) as tx:
                    self.write(tx, page)
                    self._mark(tx, mark)
        listing.written += len(page.rows)
        listing.saved |= not last

    def add_group(self, listings: Sequence[Listing], pages: Mapping[int, Page], next_uri: str | None) -> None:
        """Write one page of a listing of the user's transactions (not one account's), split into
        ``pages`` by account, for the accounts of ``listings`` (the page's other rows are not ours to
        write here), with where each of those listings stands after it: in one transaction, so that
        every account of the group saves the same ``next_uri`` (a later attempt resumes them together)
        and every cursor moves with the last page only. A delta: nothing is held back."""
        last = next_uri is None
        for listing in listings:
            page = pages.get(listing.account_id)
            if page is not None:
                listing.future.update(page.future_ids)
                listing.newest = _later(listing.newest, page.latest)
        rows = any(page.rows for page in pages.values())
        moves = any(lst.saved or (lst.newest is not None and lst.newest != lst.cursor) for lst in listings)
        if rows or moves or not last:  # a page with none of the group's rows still moves the listing on
            with self.db.transaction(durable=False) as tx:
                for page in pages.values():
                    self.write(tx, page)
                for listing in listings:
                    self._mark(tx, self._end(listing) if last else self._position(listing, next_uri or ""))
        for listing in listings:
            listing.written += len(pages[listing.account_id].rows) if listing.account_id in pages else 0
            listing.saved |= not last

    def flush(self, listing: Listing) -> bool:
        """Write the listing's held pages, with the mark of the last one: together if they can be
        (:meth:`write_together`), else each page through the upsert in a transaction of its own, the
        mark with the last. True if they went together."""
        pages, mark = listing.held, listing.held_mark
        listing.held, listing.held_rows, listing.held_mark = [], 0, None
        if not pages or self.write_together(pages, mark):
            return True
        for n, page in enumerate(pages, 1):
            with self.db.transaction(durable=False) as tx:
                self.write(tx, page)
                if mark is not None and n == len(pages):
                    self._mark(tx, mark)
        return False

    def write_together(self, pages: Sequence[Page], mark: Position | End | None = None) -> bool:
        """Pages (and ``mark``) in one transaction: on SQLite by the upsert, always True; on PostgreSQL
        by one COPY straight into ``transactions``, which the upsert of ids never seen amounts to for a
        fraction of the cost. False, with nothing written, when a page is not one COPY takes as it is,
        or a row turns out to exist already (in the table, or twice among the pages)."""
        if self.db.dialect == "postgresql" and not all(page.copy for page in pages):
            return False
        try:
            with self.db.transaction(durable=False) as tx:
                if tx.dialect == "sqlite":
                    for page in pages:
                        self.write(tx, page)
                else:
                    rows = chain.from_iterable(page.rows for page in pages)
                    tx.copy_rows("transactions", TRANSACTION_COLUMNS, rows, TRANSACTION_PG_TYPES)
                if mark is not None:
                    self._mark(tx, mark)
        except DuplicateKey:
            return False
        return True

    def _position(self, listing: Listing, next_uri: str) -> Position:
        state = {
            "next": next_uri, "since": _text(listing.since), "newest": _text(listing.newest),
            "future": sorted(listing.future), "started": _text(listing.started), "reset": listing.reset,
        }  # fmt: skip
        if listing.group:
            state["group"] = list(listing.group)
        return Position(listing.account_id, json.dumps(state, separators=(",", ":")))

    @staticmethod
    def _end(listing: Listing) -> End:
        cap = listing.started if listing.resumed else None
        return End(
            listing.account_id, listing.whole, listing.newest, frozenset(listing.future), listing.reset, cap
        )

    def _mark(self, tx: Tx, mark: Position | End) -> None:
        """Where the listing stands, in the transaction of the pages up to there."""
        if isinstance(mark, Position):
            tx.execute("UPDATE accounts SET listing = %s WHERE id = %s", (mark.state, mark.account_id))
            return
        if mark.whole and mark.newest is not None:  # future transactions it no longer shows are gone
            rows = tx.execute(LIVE_FUTURE_IDS, (mark.account_id,)).fetchall()
            gone = [(mark.newest, row[0]) for row in rows if row[0] not in mark.future]
            if gone:
                tx.executemany("UPDATE transactions SET deleted_at = %s WHERE id = %s", gone)
        if mark.reset:
            tx.execute("UPDATE accounts SET transactions_cursor = NULL WHERE id = %s", (mark.account_id,))
        if mark.newest is not None:
            cursor = mark.newest if mark.cap is None else min(mark.newest, mark.cap)
            self.advance_cursor(tx, mark.account_id, cursor)
        tx.execute("UPDATE accounts SET listing = NULL WHERE id = %s", (mark.account_id,))

    # -- cursors -------------------------------------------------------------------------------

    def position(self, account_id: int) -> tuple[datetime | None, dict[str, Any] | None]:
        """In one read: the account's cursor, and where its unfinished listing stopped (None if none)."""
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT transactions_cursor, listing FROM accounts WHERE id = %s", (account_id,)
            ).fetchone()
        if row is None:
            return None, None
        return to_datetime(row[0]), (dict(json.loads(row[1])) if row[1] else None)

    def holds_transactions(self, account_id: int) -> bool:
        """Whether any transaction of the account is stored, deleted or not."""
        with self.db.transaction() as tx:
            return (
                tx.execute(
                    "SELECT 1 FROM transactions WHERE account_id = %s LIMIT 1", (account_id,)
                ).fetchone()
                is not None
            )

    def cursor(self, account_id: int) -> datetime | None:
        return self.position(account_id)[0]

    @staticmethod
    def advance_cursor(tx: Tx, account_id: int, cursor: datetime) -> None:
        """Move the account's cursor forward (never back), in the caller's transaction."""
        tx.execute(
            "UPDATE accounts SET transactions_cursor = %s WHERE id = %s "
            "AND (transactions_cursor IS NULL OR transactions_cursor < %s)",
            (cursor, account_id, cursor),
        )


_TEXT = {str, type(None)}
_FIELD = {name: n for n, name in enumerate(Transaction.__struct_fields__)}
# Fields whose values go to the table as they are: a binary COPY needs exactly these types.
_AS_THEY_ARE: tuple[tuple[str, set[Any]], ...] = (
    ("id", {int}), ("account_id", {int, type(None)}), ("currency_code", _TEXT),
    ("category_id", {int, type(None)}), ("operation_type", _TEXT),
)  # fmt: skip
_AS_THEY_ARE_NAMES = frozenset(name for name, _ in _AS_THEY_ARE)


def _structs(resources: Sequence[Mapping[str, Any]]) -> tuple[list[Transaction], bool]:
    """Dicts (a page that did not fit the structs: a value of another type, a NaN…) as the same structs,
    built without validation, each value as the rows take it: amounts exact or none (a float is a
    TypeError), texts as text, flags as booleans; and whether the values written as they are have the
    types binary COPY needs (else the page goes row by row, and fails or not as the database decides)."""
    structs = []
    for t in resources:
        get = t.get
        structs.append(Transaction(
            id=t["id"], account_id=get("account_id"), amount=money(get("amount")),
            currency_code=get("currency_code"), date=_str(get("date")),
            booking_date=_str(get("booking_date")), transaction_date=_str(get("transaction_date")),
            value_date=_str(get("value_date")), clean_description=_str(get("clean_description")),
            provider_description=_str(get("provider_description")), category_id=get("category_id"),
            operation_type=get("operation_type"), future=bool(get("future", False)),
            deleted=bool(get("deleted")), updated_at=_str(get("updated_at")),
        ))  # fmt: skip
    exact = all({type(getattr(s, name)) for s in structs} <= allowed for name, allowed in _AS_THEY_ARE)
    return structs, exact


def _str(value: Any) -> str | None:
    return None if value is None else value if type(value) is str else str(value)


@functools.lru_cache(maxsize=8)
def _blocks(max_variables: int) -> list[tuple[str, int]]:
    """SQLite: the upsert as statements of many rows, each with its number of rows, largest first: as
    many as the variable limit allows (up to ``_ROWS_PER_INSERT``), a tenth and a hundredth of that
    (at least two rows)."""
    width = len(TRANSACTION_COLUMNS)
    most = min(_ROWS_PER_INSERT, max_variables // width)
    sizes = sorted({n for n in (most, most // 10, most // 100) if n >= 2}, reverse=True)
    return [(upsert_sql("transactions", "id", TRANSACTION_COLUMNS, rows=n, **_CONFLICT), n) for n in sizes]


def _upsert_in_blocks(tx: Tx, rows: list[tuple[Any, ...]]) -> None:
    """SQLite: the rows by statements of many rows, in order, and the few left over one by one. Its cost
    is per statement run, far more than per value, and each run hands the interpreter lock to other
    threads and waits to take it back. A row that conflicts with an earlier one of its statement meets
    it exactly as it would one statement later."""
    for statement, per in _blocks(tx.max_variables()):
        whole = len(rows) - len(rows) % per
        if whole:
            tx.executemany(
                statement,
                (list(chain.from_iterable(rows[i : i + per])) for i in range(0, whole, per)),
                stored=True,
            )
            rows = rows[whole:]
    if rows:
        tx.executemany(UPSERT_TRANSACTION, rows, stored=True)


def _text(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)
