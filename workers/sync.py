"""Delta logic: what to fetch from Bridge for an item or an account, and in which transactions.

Transactions stream page by page (never a whole history in memory). Each page is written
in its own transaction; the account's cursor, the highest ``updated_at`` written, commits
in the same transaction as the **last** page, so a crash anywhere leaves the cursor where
it was and the next sync simply rewrites (idempotently) what it had already written. The
next sync asks Bridge for transactions updated ``since`` the cursor minus an overlap that
absorbs clock skew and updates made while we paginated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from service.logs import get_logger
from workers.bridge import BridgeClient, NotFound, TransientError
from workers.storage import TEMPORARY_STATUSES, USER_ACTION_STATUSES, Storage, parse_ts

log = get_logger("bridgehook.sync")


class ItemUnavailable(TransientError):
    """The bank is temporarily unavailable for this item (1003, -2, -3): sync it later."""


@dataclass
class SyncResult:
    item_id: int
    status: int | None = None
    skipped: str | None = None  # why data was not fetched, if it was not
    accounts: int = 0
    transactions: int = 0
    account_ids: list[int] = field(default_factory=list)

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
        self.overlap = overlap
        self.heartbeat = heartbeat  # called between pages: keeps the item's lock alive

    def sync_item(self, user_uuid: str, item_id: int, *, full: bool = False) -> SyncResult:
        """Item, then its accounts, then each enabled account's transactions (all, or since the cursor)."""
        result = SyncResult(item_id)
        item = self.client.get_item(user_uuid, item_id)
        user = self.client.user(user_uuid)
        with self.storage.transaction() as tx:
            self.storage.upsert_user(tx, user_uuid, user.get("external_user_id"))
            self.storage.upsert_item(tx, user_uuid, item)
        result.status = item.get("status")
        if not self._usable(item, result):
            return result
        enabled: list[int] = []
        for page in self.client.account_pages(user_uuid, item_id):
            with self.storage.transaction() as tx:
                self.storage.upsert_accounts(tx, page)
            result.accounts += len(page)
            result.account_ids += [a["id"] for a in page]
            enabled += [a["id"] for a in page if a.get("data_access", "enabled") != "disabled"]
            self.heartbeat()
        for account_id in enabled:
            result.transactions += self.sync_transactions(user_uuid, account_id, full=full)
        with self.storage.transaction() as tx:
            self.storage.item_synced(tx, item_id)
        return result

    def sync_account(self, user_uuid: str, item_id: int, account_id: int) -> SyncResult:
        """One account and its transactions since its cursor (all of them for a new account)."""
        result = SyncResult(item_id)
        item = self.client.get_item(user_uuid, item_id)
        with self.storage.transaction() as tx:
            self.storage.upsert_user(tx, user_uuid)
            self.storage.upsert_item(tx, user_uuid, item)
        result.status = item.get("status")
        if not self._usable(item, result):
            return result
        try:
            account = self.client.get_account(user_uuid, account_id)
        except NotFound:
            result.skipped = "account_not_found"
            return result
        with self.storage.transaction() as tx:
            self.storage.upsert_accounts(tx, [account])
        result.accounts, result.account_ids = 1, [account_id]
        if account.get("data_access", "enabled") == "disabled":
            result.skipped = "data_access_disabled"
            return result
        result.transactions = self.sync_transactions(user_uuid, account_id, full=False)
        return result

    def sync_transactions(self, user_uuid: str, account_id: int, *, full: bool) -> int:
        cursor = None if full else self.storage.cursor(account_id)
        since = cursor - self.overlap if cursor is not None else None
        newest: datetime | None = cursor
        written = 0
        seen_future: set[int] = set()
        pages = self.client.transaction_pages(user_uuid, account_id, since)
        for page, last in _with_last(pages):
            for t in page:
                updated = parse_ts(t.get("updated_at"))
                if updated is not None and (newest is None or updated > newest):
                    newest = updated
                if t.get("future") and not t.get("deleted"):
                    seen_future.add(t["id"])
            with self.storage.transaction() as tx:
                self.storage.upsert_transactions(tx, page)
                if last and since is None and newest is not None:
                    # A complete listing: future transactions it no longer shows are gone.
                    self.storage.vanish_future(tx, account_id, seen_future, newest)
                if last and newest is not None:
                    self.storage.advance_cursor(tx, account_id, newest)
            written += len(page)
            self.heartbeat()
        log.info("sync.transactions", account_id=account_id, written=written, full=since is None)
        return written

    def _usable(self, item: dict[str, Any], result: SyncResult) -> bool:
        status = item.get("status")
        if status in USER_ACTION_STATUSES:
            result.skipped = "needs_user_action"
            log.info("sync.item_needs_user_action", item_id=result.item_id, status=status)
            return False
        if status in TEMPORARY_STATUSES:
            raise ItemUnavailable(f"item {result.item_id} is temporarily unavailable (status {status})")
        return True


def _with_last(pages: Iterator[list[dict[str, Any]]]) -> Iterator[tuple[list[dict[str, Any]], bool]]:
    """Each page with a flag telling whether it is the last one (one page of look-ahead)."""
    previous: list[dict[str, Any]] | None = None
    for page in pages:
        if previous is not None:
            yield previous, False
        previous = page
    yield (previous if previous is not None else []), True
