"""Delta logic: what to fetch from Bridge for an item or an account, and in which transactions.

Transactions stream page by page (never a whole history in memory). Each page is written
in its own transaction (pages of new ids, a few together); the account's cursor, the highest
``updated_at`` written, commits in the same transaction as the **last** page, so a crash anywhere
leaves the cursor where it was and the next sync simply rewrites (idempotently) what it had already
written. The next sync asks Bridge for transactions updated ``since`` the cursor minus an overlap that
absorbs clock skew and updates made while we paginated.

Which pages are read, and in which order (the deltas of an item's accounts as one listing of the user's
transactions, split by account), is :mod:`workers.listings`'s business; they are fetched ahead, in a
thread, while this module writes them page after page. How a page is written (COPY, merge or upsert,
several pages to a transaction) is :mod:`workers.writer`'s business: this module decides what to sync,
and in which transactions.

Every transaction here commits asynchronously on PostgreSQL (``durable=False``, see
:mod:`workers.db`): the job that runs a sync ends with a synchronous commit of its ledger row, which
makes all of them durable at once instead of waiting for the disk once per page. A server crash
before that loses, in commit order, only what the job's retry rewrites: the cursor still never
survives without the rows before it.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from service.logs import get_logger
from workers.bridge import BridgeClient
from workers.db import Tx
from workers.erasure import is_erased
from workers.errors import BridgeError, NotFound, TransientError
from workers.listings import Group, Lister, prefetched
from workers.storage import TEMPORARY_STATUSES, USER_ACTION_STATUSES, Storage, parse_ts
from workers.writer import Listing, Writer

log = get_logger("bridgehook.sync")


@dataclass
class Progress:
    """What a job's attempts have done, carried from one attempt to the next (workers.jobs keeps it in
    the job's meta): whether an attempt stopped by a spent budget moved forward at all (pages written,
    listings ended), and which accounts (or, for a user's resync, items) a full sync has already listed
    whole, so that its next attempt goes on with the others instead of listing those again."""

    pages: int = 0
    listed: set[int] = field(default_factory=set)
    items: set[int] = field(default_factory=set)
    reads: dict[int, ItemRead] = field(default_factory=dict)  # by item id
    user_items: ItemIds | None = None  # a user's resync: the items Bridge listed

    def read(self, item_id: int) -> ItemRead | None:
        """What an earlier attempt read of the item and its accounts, if recent enough to reuse."""
        read = self.reads.get(item_id)
        return read if read is not None and time.time() - read.at < REUSE_READ else None

    def user_item_ids(self) -> list[int] | None:
        """The user's items as an earlier attempt listed them, if recent enough to reuse."""
        listed = self.user_items
        return listed.ids if listed is not None and time.time() - listed.at < REUSE_READ else None


# An attempt stopped (a spent budget, Bridge down) after it read and wrote an item and its accounts
# leaves what it read to the job's next attempts for this long: they go on with the transactions
# instead of spending the user's calls again on the item's status and accounts read seconds before
# (two or three of each attempt's calls, which jobs sharing a small budget would otherwise spend on
# nothing else). What changes at Bridge meanwhile comes with its own webhook, and a sync that reused
# a read serves no earlier event (see SyncResult.serves_earlier_events).
REUSE_READ = 300.0


@dataclass
class ItemRead:
    at: float  # time.time() of the read
    status: int | None
    refresh: str | None  # the item's last_successful_refresh
    accounts: list[int]  # every account Bridge listed for the item
    enabled: list[int]  # those whose data access is enabled


@dataclass
class ItemIds:
    at: float
    ids: list[int]


# The running job's Progress (None outside a job): set by workers.jobs around each attempt.
PROGRESS: contextvars.ContextVar[Progress | None] = contextvars.ContextVar(
    "bridgehook_progress", default=None
)


class ItemUnavailable(TransientError):
    """The bank is temporarily unavailable for this item (1003, -2, -3): sync it later."""


@dataclass
class SyncResult:
    item_id: int
    status: int | None = None
    skipped: str | None = None  # why data was not fetched, if it was not
    # Whether some account was listed whole (no cursor yet, or a full sync) rather than since its
    # cursor: a whole listing leaves deleted transactions out, so it tells nothing of deletions. Not
    # counted: the listing of an account without a cursor that sets none (it showed no transaction
    # with an ``updated_at``: see workers.writer). The account still has no cursor, so whichever sync
    # lists it next lists it whole as well: this listing stands for any of them. Nor, but in a full
    # sync, the first listing of an account (no transaction of it stored when it began, from page 1):
    # there was nothing of it to delete, so what it shows is all a delta would have told.
    whole_listing: bool = False
    accounts: int = 0
    transactions: int = 0  # rows written (a resync writes those changed since the cursor twice)
    account_ids: list[int] = field(default_factory=list)
    accounts_gone: list[int] = field(default_factory=list)  # Bridge answered 404: marked deleted
    # Whether some listing went on from where an earlier attempt stopped (a spent budget, a crash):
    # its first pages were read before this sync began.
    resumed: bool = False

    @property
    def serves_earlier_events(self) -> bool:
        """Whether the events received before this sync began need no sync of their own (see
        workers.watermark): only if it fetched all it meant to (not an item needing the user, an
        account gone…) and listed every account since its cursor (a whole listing leaves deleted
        transactions out: it cannot stand for a delta that would have shown them). Nor one that met an
        account gone meanwhile: it stopped short of that account. Nor one that resumed a listing: what
        it read before it began cannot stand for what changed since."""
        return self.skipped is None and not (self.whole_listing or self.accounts_gone or self.resumed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id, "status": self.status, "skipped": self.skipped,
            "accounts": self.accounts, "transactions": self.transactions,
        }  # fmt: skip


class Syncer:
    def __init__(
        self,
        client: BridgeClient,
        storage: Storage,
        *,
        overlap: timedelta = timedelta(minutes=5),
        heartbeat: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.storage = storage
        self.writer = Writer(storage.db, storage.codec)
        self.lister = Lister(client, self.writer, overlap)  # what to read, in the prefetching thread
        self.heartbeat = heartbeat  # raises if the item's lock was lost: called between pages
        self.whole_listings = 0  # accounts listed whole by this syncer, as SyncResult counts them
        self.accounts_gone: list[int] = []  # accounts Bridge answered 404 for, marked deleted
        self.resumed_listings = 0  # listings this syncer took up where an earlier attempt stopped
        self._group: list[Listing] | None = None  # the listings of the user's listing being written

    def sync_item(
        self, user_uuid: str, item_id: int, *, full: bool = False, resync: bool = False
    ) -> SyncResult:
        """Item, then its accounts, then each enabled account's transactions (all, or since the cursor).

        ``full``: each account is listed whole. A whole listing leaves deleted transactions out, so
        an account that has a cursor is first listed since it: what Bridge deleted since then (a
        deletion announced by a webhook we missed, or by none) is marked before the whole listing
        moves the cursor past it. ``resync``: a full sync that also replaces each enabled account's
        cursor with what its whole listing saw (one may be wrong); a cursor later than now is wrong
        for sure, and not listed since. Accounts Bridge no longer lists are marked deleted, and
        accounts or items we marked deleted stay so: nothing is written under them."""
        result = SyncResult(item_id)
        progress = PROGRESS.get()
        read = progress.read(item_id) if progress is not None else None
        if read is not None:  # an earlier attempt's, reused (see REUSE_READ)
            result.resumed = True
            result.status, result.account_ids = read.status, list(read.accounts)
            result.accounts = len(read.accounts)
            with self.storage.transaction(durable=False) as tx:
                gone = self._gone(tx, user_uuid, item_id)
            if gone is not None:
                self._skip(result, gone)
                return result
        else:
            read = self._read_item(user_uuid, item_id, result)
            if read is None:
                return result
            if progress is not None:
                progress.reads[item_id] = read
        with self.storage.transaction(durable=False) as tx:
            deleted = self.storage.deleted_accounts(tx, read.enabled)
        enabled = [a for a in read.enabled if a not in deleted]
        whole = full or resync
        if whole and progress is not None and progress.listed:
            enabled = [a for a in enabled if a not in progress.listed]  # listed whole by an earlier attempt
        if whole:
            now = datetime.now(UTC)
            # (Not an account whose whole listing an earlier attempt began: that attempt listed it since
            # its cursor first, and the cursor has not moved since.)
            since_cursor = []
            for account_id in enabled:
                cursor, saved = self.writer.position(account_id)
                if cursor is not None and cursor <= now and (saved is None or saved.get("since") is not None):
                    since_cursor.append(account_id)
            if since_cursor:
                self._sync_transactions_into(result, user_uuid, *since_cursor, full=False)
                enabled = [a for a in enabled if a not in result.accounts_gone]
            self._beat()
        self._sync_transactions_into(result, user_uuid, *enabled, full=whole, reset=resync)
        with self.storage.transaction(durable=False) as tx:
            self.storage.item_synced(tx, item_id, parse_ts(read.refresh))
        return result

    def _read_item(self, user_uuid: str, item_id: int, result: SyncResult) -> ItemRead | None:
        """The item and its accounts, read from Bridge and written (accounts Bridge no longer lists
        marked deleted); None if the sync stops there (the item gone, deleted, or not usable)."""
        item = self._item(user_uuid, item_id, result)
        if item is None:
            return None
        user = self.client.user(user_uuid)
        if not self._write_item(user_uuid, item, result, user.get("external_user_id")):
            return None
        enabled: list[int] = []
        for page in self.client.account_pages(user_uuid, item_id):
            with self.storage.transaction(durable=False) as tx:
                self.storage.upsert_accounts(tx, page)
            result.accounts += len(page)
            result.account_ids += [a["id"] for a in page]
            enabled += [a["id"] for a in page if a.get("data_access", "enabled") != "disabled"]
            self._beat()
        with self.storage.transaction(durable=False) as tx:
            if gone := self.storage.vanish_accounts(tx, item_id, result.account_ids, datetime.now(UTC)):
                log.info("sync.accounts_vanished", count=len(gone))
        refresh = item.get("last_successful_refresh")
        return ItemRead(time.time(), item.get("status"), refresh, list(result.account_ids), enabled)

    def sync_account(self, user_uuid: str, item_id: int, account_id: int) -> SyncResult:
        """One account and its transactions since its cursor (all of them for a new account)."""
        result = SyncResult(item_id)
        item = self._item(user_uuid, item_id, result)
        if item is None or not self._write_item(user_uuid, item, result):
            return result
        try:
            account = self.client.get_account(user_uuid, account_id)
        except NotFound:
            self._account_gone(account_id)
            result.accounts_gone.append(account_id)
            result.skipped = "account_not_found"
            return result
        with self.storage.transaction(durable=False) as tx:
            if self.storage.deleted_accounts(tx, [account_id]):
                result.skipped = "account_deleted"
                return result
            self.storage.upsert_accounts(tx, [account])
        result.accounts, result.account_ids = 1, [account_id]
        if account.get("data_access", "enabled") == "disabled":
            result.skipped = "data_access_disabled"
            return result
        self._sync_transactions_into(result, user_uuid, account_id, full=False)
        return result

    def _item(self, user_uuid: str, item_id: int, result: SyncResult) -> dict[str, Any] | None:
        """The item as Bridge has it, or None when Bridge answers 404: the item is gone, and marked
        so with its accounts (a reconciliation sweep would otherwise resync it forever)."""
        try:
            return self.client.get_item(user_uuid, item_id)
        except NotFound:
            with self.storage.transaction(durable=False) as tx:
                self.storage.mark_item_deleted(tx, item_id, datetime.now(UTC))
            result.skipped = "item_not_found"
            log.info("sync.item_gone", item_id=item_id)
            return None

    def _account_gone(self, account_id: int) -> None:
        """Bridge answered 404 for the account: it is gone, and marked so."""
        with self.storage.transaction(durable=False) as tx:
            self.storage.mark_account_deleted(tx, account_id, datetime.now(UTC))
        self.accounts_gone.append(account_id)
        log.info("sync.account_gone", account_id=account_id)

    def _sync_transactions_into(
        self, result: SyncResult, user_uuid: str, *account_ids: int, full: bool, reset: bool = False
    ) -> None:
        """:meth:`sync_transactions`, counted in ``result``, which learns if an account was listed whole
        and which accounts were gone."""
        whole, gone, resumed = self.whole_listings, len(self.accounts_gone), self.resumed_listings
        result.transactions += self.sync_transactions(user_uuid, *account_ids, full=full, reset=reset)
        result.whole_listing |= self.whole_listings > whole
        result.accounts_gone += self.accounts_gone[gone:]
        result.resumed |= self.resumed_listings > resumed

    def sync_transactions(self, user_uuid: str, *account_ids: int, full: bool, reset: bool = False) -> int:
        """Each account's transactions, one account after the other: all of them (``full``, or no
        cursor yet), else those updated since its cursor minus the overlap. Returns the count written.
        ``reset`` (with ``full``): each account's cursor becomes what its whole listing saw, even if
        earlier than the one it had. An account Bridge answers 404 for is marked deleted, and the
        others are synced all the same.

        Listings resume: the writer saves where each listing stands with its pages (see
        :mod:`workers.writer`), and an attempt that stopped (a spent request budget, a crash) is
        followed by one that goes on from there instead of page 1, as long as it lists the same way
        (whole, or since the cursor). A resumed listing read its first pages before the pause, so the
        cursor it sets is no later than when it began: the next delta lists what changed meanwhile.

        Fetching (HTTP, JSON, rows) runs ahead in a thread, across accounts too; writing stays here,
        page after page in order, exactly as if it all ran in this thread."""
        written = 0
        progress = PROGRESS.get()
        listing: Listing | None = None
        fetched = prefetched(self.lister.pages(user_uuid, account_ids, full, reset))
        try:
            for listed in fetched:
                if isinstance(listed, Group):
                    written += self._write_group(listed, progress)
                    continue
                if listed.listing is not listing:
                    listing = listed.listing
                    if listing.resumed:
                        self.resumed_listings += 1
                        log.info("sync.listing_resumed", account_id=listing.account_id)
                if isinstance(listed.page, NotFound):  # the account is gone: what was read of it is kept
                    self._beat()
                    self.writer.flush(listing)
                    self._account_gone(listing.account_id)
                    continue
                if isinstance(listed.page, Exception):
                    raise listed.page  # the page could not be read into rows: fail where writing it would
                page, last = listed.page, listed.next is None
                self.writer.add(listing, page, listed.next)
                written += len(page.rows)
                # Progress a later attempt keeps: a page whose position is saved with it (it resumes
                # after it, rows or none), or a whole listing that set a cursor. Not a delta's last page,
                # nor a whole listing of an account with nothing in it: the next attempt lists them again.
                first_cursor = last and listing.whole and listing.newest is not None
                if progress is not None and (not last or first_cursor):
                    progress.pages += 1
                self._beat()
                if last:  # a whole listing counts as one when it sets a cursor (see SyncResult.whole_listing)
                    self.whole_listings += listing.whole and (
                        full or (listing.newest is not None and not listing.first)
                    )
                    if progress is not None and full:
                        progress.listed.add(listing.account_id)
                    log.info("sync.transactions", account_id=listing.account_id, written=listing.written,
                             full=listing.whole)  # fmt: skip
        except BridgeError:
            # Fetching stopped (a spent request budget, Bridge down): the pages read and held are
            # written, with where the listing stands, so that the next attempt goes on from there
            # (if the item's lock is still ours).
            self._beat()
            if listing is not None:
                self.writer.flush(listing)
            raise
        finally:
            fetched.close()  # stops the prefetching thread, whatever happened
        return written

    def _write_group(self, listed: Group, progress: Progress | None) -> int:
        """One page of a listing of the user's transactions, written for the group's accounts."""
        if isinstance(listed.pages, Exception):
            raise listed.pages  # the page could not be read into rows: fail where writing it would
        if listed.listings is not self._group:  # a group's first page
            self._group = listed.listings
            if listed.listings[0].resumed:
                self.resumed_listings += 1
                log.info("sync.listing_resumed", accounts=len(listed.listings))
        self.writer.add_group(listed.listings, listed.pages, listed.next)
        rows = sum(len(page.rows) for page in listed.pages.values())
        if progress is not None and listed.next is not None:
            progress.pages += 1
        self._beat()
        if listed.next is None:
            log.info("sync.transactions", accounts=len(listed.listings), written=sum(
                lst.written for lst in listed.listings), full=False)  # fmt: skip
        return rows

    def _beat(self) -> None:
        """Between pages: stop if the item's lock was lost (the lease itself is renewed by a thread,
        see workers.jobs.item_lock; this check costs no round trip)."""
        self.heartbeat()

    def _write_item(
        self, user_uuid: str, item: dict[str, Any], result: SyncResult, external_user_id: str | None = None
    ) -> bool:
        """The user and the item, in one transaction; whether the sync goes on to the accounts. Not
        for a user marked deleted: the item is marked too, and nothing more is written (a late
        event, or Bridge still answering for a moment). Nor for an item marked deleted (item.deleted
        handled first): deleted stays deleted. The upsert locks the user's row, so this transaction
        and user.deleted's first one happen one after the other (see workers.jobs.user_deleted)."""
        with self.storage.transaction(durable=False) as tx:
            self.storage.upsert_user(tx, user_uuid, external_user_id)
            self.storage.upsert_item(tx, user_uuid, item)
            gone = self._gone(tx, user_uuid, result.item_id)
        result.status = item.get("status")
        if gone is not None:
            self._skip(result, gone)
            return False
        return self._usable(item, result)

    def _gone(self, tx: Tx, user_uuid: str, item_id: int) -> str | None:
        """Why nothing more is written for the item ("user_deleted", "item_deleted"), if we marked
        it or its user deleted (the item is marked with its user), or erased the user: its rows are
        gone, which only a sync reusing an earlier attempt's read (it writes no item first) meets."""
        if (deleted := self.storage.user_deleted_at(tx, user_uuid)) is not None:
            self.storage.mark_item_deleted(tx, item_id, deleted)
            return "user_deleted"
        if is_erased(tx, user_uuid):
            return "user_deleted"
        return "item_deleted" if self.storage.item_deleted_at(tx, item_id) is not None else None

    @staticmethod
    def _skip(result: SyncResult, why: str) -> None:
        result.skipped = why
        log.info(f"sync.{why}", item_id=result.item_id)

    def _usable(self, item: dict[str, Any], result: SyncResult) -> bool:
        status = item.get("status")
        if status in USER_ACTION_STATUSES:
            result.skipped = "needs_user_action"
            log.info("sync.item_needs_user_action", item_id=result.item_id, status=status)
            return False
        if status in TEMPORARY_STATUSES:
            raise ItemUnavailable(f"item {result.item_id} is temporarily unavailable (status {status})")
        return True
