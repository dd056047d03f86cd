"""Listings: which pages of transactions a sync reads from Bridge, and in which order, fetched ahead.

The deltas of an item's accounts that have a cursor are one listing of the user's transactions (no
``account_id``: one page where there were as many as accounts), split by account; the user's other
accounts' rows (disabled, deleted, another item's) are left out, and every account of the group saves
the listing's position with each page, so that they resume together (see :func:`_groups`). The other
accounts are listed one after the other, whole or since their cursor, from page 1 or where an
unfinished listing of the same kind stopped.

Fetching runs ahead of writing (:func:`prefetched`): a thread requests the next pages (and the next
accounts'), parses them and builds their rows while :mod:`workers.sync` writes, at most twelve pages
ahead; what is written, in which order and in which transaction stays the same. This module only
reads: where a listing stands comes from :mod:`workers.writer`, which saves it with the pages.
"""

from __future__ import annotations

import contextvars
import functools
import queue
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from service.logs import get_logger
from workers.bridge import BridgeClient
from workers.errors import NotFound, PermanentError
from workers.storage import parse_ts
from workers.writer import HELD_ROWS, Listing, Page, Writer

log = get_logger("bridgehook.sync")
_T = TypeVar("_T")


class Lister:
    """The pages a sync of some of a user's accounts writes, read from Bridge and built into rows. Runs
    in the prefetching thread: it writes nothing, and asks the writer only where listings stand."""

    def __init__(self, client: BridgeClient, writer: Writer, overlap: timedelta) -> None:
        self.client = client
        self.writer = writer
        self.overlap = overlap

    def pages(
        self, user_uuid: str, account_ids: tuple[int, ...], full: bool, reset: bool
    ) -> Iterator[Listed | Group]:
        """The pages to write: first those of the accounts listed together (see :func:`_groups`), then
        account after account; an unfinished listing of the same kind goes on where it stopped. Runs
        in the prefetching thread."""
        positions = {account_id: self.writer.position(account_id) for account_id in account_ids}
        groups, alone = ([], list(account_ids)) if full else _groups(positions)
        for group, resumed in groups:
            yield from self._group_listing(user_uuid, group, positions, resumed)
        for account_id in alone:
            cursor, saved = positions[account_id]
            cursor = None if full else cursor
            if saved is not None and (saved.get("since") is None) != (cursor is None):
                saved = None  # another kind of listing: this one begins afresh (and saves over it)
            try:
                yield from self._listing(user_uuid, account_id, cursor, saved, reset)
            except _NotResumed as exc:
                # Bridge refuses where the listing stopped (a next_uri it no longer takes): from page 1.
                log.warning("sync.listing_not_resumed", account_id=account_id, error=str(exc.__cause__))
                yield from self._listing(user_uuid, account_id, cursor, None, reset)

    def _listing(
        self,
        user_uuid: str,
        account_id: int,
        cursor: datetime | None,
        saved: dict[str, Any] | None,
        reset: bool,
    ) -> Iterator[Listed]:
        """One account's pages: from page 1 (all, or since the cursor), or where ``saved`` stopped
        (:class:`_NotResumed` if Bridge refuses that page)."""
        if saved is None:
            since = cursor - self.overlap if cursor is not None else None
            listing = Listing.begin(account_id, cursor, since, reset=reset)
            listing.first = cursor is None and not reset and not self.writer.holds_transactions(account_id)
        else:
            listing = Listing.resume(account_id, cursor, saved, reset=reset)
        start = None if saved is None else saved.get("next")
        pages = self.client.transaction_listing(user_uuid, account_id, listing.since, start=start)
        first = True
        try:
            for resources, next_uri in pages:
                try:
                    page: Page | Exception = self.writer.page(resources)
                except Exception as exc:
                    page = exc
                yield Listed(listing, page, next_uri)
                first = False
        except (NotFound, PermanentError) as exc:
            if first and saved is not None:  # refused where the listing stopped: not that the account is gone
                raise _NotResumed from exc
            if not isinstance(exc, NotFound):
                raise
            # The account is gone (sync_transactions marks it): on to the next one.
            yield Listed(listing, exc, None)

    def _group_listing(
        self,
        user_uuid: str,
        group: tuple[int, ...],
        positions: Mapping[int, tuple[datetime | None, dict[str, Any] | None]],
        resumed: bool,
    ) -> Iterator[Group]:
        """The user's transactions since the group's earliest cursor (minus the overlap), every page
        split by account, the other accounts' rows left out; or where such a listing stopped."""
        if resumed:
            listings = [Listing.resume(a, positions[a][0], positions[a][1] or {}, reset=False) for a in group]
            start = (positions[group[0]][1] or {}).get("next")
        else:
            earliest = min(c for c, _ in (positions[a] for a in group) if c is not None) - self.overlap
            listings = [Listing.begin(a, positions[a][0], earliest, reset=False) for a in group]
            start = None
        for listing in listings:
            listing.group = group
        # What each account's own listing would ask for: rows it would not show are not written again.
        since = listings[0].since
        floors = {
            listing.account_id: listing.cursor - self.overlap
            for listing in listings
            if listing.cursor is not None and since is not None and listing.cursor - self.overlap > since
        }
        pages = self.client.transaction_listing(user_uuid, None, since, start=start)
        first = True
        try:
            for resources, next_uri in pages:
                try:
                    split: dict[int, Page] | Exception = self._split(resources, group, floors)
                except Exception as exc:
                    split = exc
                yield Group(listings, split, next_uri)
                first = False
        except (NotFound, PermanentError) as exc:
            if not (first and resumed):
                raise
            # Bridge refuses where the listing stopped (a next_uri it no longer takes): from page 1.
            log.warning("sync.listing_not_resumed", accounts=len(group), error=str(exc))
            fresh = {a: (positions[a][0], None) for a in group}
            yield from self._group_listing(user_uuid, group, fresh, resumed=False)

    def _split(
        self, resources: Sequence[Any], group: tuple[int, ...], floors: Mapping[int, datetime]
    ) -> dict[int, Page]:
        """A page of the user's transactions as one page of rows per account of the group: the rows
        each account's own listing would show (updated after its ``floors``, if it has one)."""
        by_account: dict[int, list[Any]] = {a: [] for a in group}
        for resource in resources:
            get = resource.get if isinstance(resource, dict) else functools.partial(getattr, resource)
            account_id = get("account_id")
            if account_id not in by_account:
                continue
            floor = floors.get(account_id)
            if (
                floor is not None
                and (updated := parse_ts(get("updated_at"))) is not None
                and updated <= floor
            ):
                continue
            by_account[account_id].append(resource)
        return {a: self.writer.page(rows) for a, rows in by_account.items() if rows}


# Accounts listed together are those whose cursors are at most this far from the latest of them: a
# listing since the earliest cursor also reads the others' transactions since then, left out.
GROUP_SPAN = timedelta(days=1)


def _groups(
    positions: dict[int, tuple[datetime | None, dict[str, Any] | None]],
) -> tuple[list[tuple[tuple[int, ...], bool]], list[int]]:
    """Which accounts one listing of the user's transactions serves (each group, and whether it goes
    on where an earlier attempt stopped), and which are listed on their own. Together: listings since
    a cursor, never a whole one (a user's whole history for one account's). An unfinished listing of
    the user's goes on with the accounts that saved its position (the same ``next_uri``); an unfinished
    listing of one account's goes on alone. At least two accounts make a new group."""
    resumed: dict[str, list[int]] = {}
    fresh: list[int] = []
    for account_id, (cursor, saved) in positions.items():
        if cursor is None:
            continue
        if saved is not None and saved.get("group") and saved.get("since") is not None and saved.get("next"):
            resumed.setdefault(str(saved["next"]), []).append(account_id)
        elif saved is None:
            fresh.append(account_id)
    if fresh:
        latest = max(c for c, _ in (positions[a] for a in fresh) if c is not None)
        fresh = [a for a in fresh if (positions[a][0] or latest) >= latest - GROUP_SPAN]
    groups = [(tuple(ids), True) for ids in resumed.values()]
    if len(fresh) >= 2:
        groups.append((tuple(fresh), False))
    together = {a for ids, _ in groups for a in ids}
    return groups, [a for a in positions if a not in together]


class Group(NamedTuple):
    """One page of a listing of the user's transactions, as fetched for a group of accounts: each
    account's rows (or why they could not be built), and the ``next_uri`` that follows it."""

    listings: list[Listing]
    pages: dict[int, Page] | Exception
    next: str | None


class _NotResumed(Exception):
    """Bridge refused the page an unfinished listing stopped at."""


class Listed(NamedTuple):
    """One page of an account's listing, as fetched: its rows (or why they could not be built, NotFound:
    the account is gone) and the ``next_uri`` that follows it (None: it is the last)."""

    listing: Listing
    page: Page | Exception
    next: str | None


# Pages ready ahead of the one being written: a held batch's pages and two more, so that the next
# batch is fetched while one is written (with fewer, fetching stalls during each batch's write).
# Memory: these twelve pages, the ten held, the one looked ahead and the one being built, about
# 12,000 rows at 500 a page, whatever the history.
_AHEAD = HELD_ROWS // 500 + 2


def prefetched(items: Iterator[_T]) -> Generator[_T, None, None]:
    """``items`` as they are, produced by a thread of their own while the ones before are consumed:
    Bridge's latency, JSON parsing and row building overlap the database's work instead of adding up.

    Order, contents and errors are unchanged (an error surfaces where the item it prevented would
    have). The thread runs in a copy of the caller's context (the job's log fields); when the consumer
    stops early (an error, a job timeout) the thread stops after at most the request in flight, and
    at most ``_AHEAD`` items wait (besides what the consumer holds), so memory stays flat however
    long the history."""
    ahead: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=_AHEAD)
    stop = threading.Event()

    def offer(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            offer(("error", exc))

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(produce,), name="bridgehook-prefetch", daemon=True
    )
    thread.start()
    try:
        while True:
            kind, value = ahead.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)  # at most one request in flight; a daemon thread if it hangs
