"""A Powens connection's data into the same tables as Bridge's, by the same write path.

What differs from Bridge is only what to read (workers.powens, workers.powens_rows): a
``CONNECTION_SYNCED`` carries the connection, its activated accounts and the transactions its sync
found, which are written from the body with no call; what the body does not promise (transactions
updated or deleted since) comes from one listing of the user's transactions updated after the
connection's cursor, ``GET /users/{id}/transactions?last_update=&all``, paged 1,000 at a time. What
is the same is everything that makes the rows right: :class:`workers.storage.Storage`'s upserts with
their guards (an older body never overwrites a newer row: the connection's ``last_update`` guards the
item, an account's and a transaction's ``last_update`` theirs), :class:`workers.writer.Writer`'s pages,
the earliest deletion winning, a deleted user or item staying deleted, the account's cursor moving
only forward (its ``transactions_cursor``), and the item's lock held around it all (workers.jobs).

Ids are stored in Powens's own id space (workers.providers): a connection N is item -N.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from service.logs import get_logger
from workers import powens_rows, tokens
from workers.db import Tx, to_datetime
from workers.erasure import is_erased
from workers.powens import PowensClient
from workers.providers import powens_id, powens_user
from workers.storage import Storage, parse_ts
from workers.writer import Writer

log = get_logger("bridgehook.powens")


class PowensSync:
    """One connection's sync, under its item's lock (the caller holds it)."""

    def __init__(
        self,
        client: PowensClient,
        storage: Storage,
        *,
        overlap: timedelta,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.storage = storage
        self.writer = Writer(storage.db, storage.codec)
        self.overlap = overlap
        self.heartbeat = heartbeat

    def connection_synced(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Write what the body carries, then list what it does not (when the connection is usable)."""
        id_user, connection = int(body["user"]["id"]), body["connection"]
        item = powens_rows.item(connection)
        accounts = [powens_rows.account(a) for a in connection.get("accounts") or ()]
        with self.storage.transaction(durable=False) as tx:
            skipped = self._write_item(tx, powens_user(id_user), item)
            if skipped is None:
                written = self._write_accounts(tx, accounts, connection.get("accounts") or ())
        if skipped is not None:
            return {"skipped": skipped}
        summary: dict[str, Any] = {"item_id": item["id"], "accounts": len(accounts), "transactions": written}
        if item.get("status") != 0:  # nothing new to read until the user or Powens acts (workers.actions)
            summary["listed"] = "not_usable"
            return summary
        summary["listed"] = self.list_changes(id_user, item["id"])
        return summary

    def account_changed(self, account: Mapping[str, Any], *, list_after: bool) -> dict[str, Any]:
        """ACCOUNT_ENABLED (``list_after``: its transactions, which consent makes readable) or
        ACCOUNT_DISABLED (Powens deletes a disabled account's transactions: so do we, with no call)."""
        row = powens_rows.account(account)
        id_user, item_id = int(account["id_user"]), powens_id(account["id_connection"])
        with self.storage.transaction(durable=False) as tx:
            self.storage.upsert_user(tx, powens_user(id_user))
            if self._deleted(tx, powens_user(id_user), item_id):
                return {"skipped": "deleted"}
            self.storage.upsert_accounts(tx, [row])
            if row.get("data_access") == "disabled":
                at = to_datetime(powens_rows.moment(account.get("disabled"))) or to_datetime(
                    row["updated_at"]
                )
                tx.execute(
                    "UPDATE transactions SET deleted_at = %s WHERE account_id = %s "
                    "AND (deleted_at IS NULL OR deleted_at > %s)",
                    (at, row["id"], at),
                )
        if not list_after:
            return {"account_id": row["id"], "disabled": True}
        return {"account_id": row["id"], "listed": self.list_changes(id_user, item_id)}

    def list_changes(self, id_user: int, item_id: int) -> int:
        """The user's transactions updated after the earliest cursor of the item's accounts (all of
        them for an account never listed), deleted ones included; those of the item's accounts are
        written, page by page. Then every such account's cursor moves to the latest ``last_update``
        seen: the listing showed everything updated up to it, the user's other items' too. Returns
        the number of rows written."""
        with self.storage.transaction() as tx:
            rows = tx.execute(
                "SELECT id, transactions_cursor FROM accounts WHERE item_id = %s AND deleted_at IS NULL "
                "AND (data_access IS NULL OR data_access <> 'disabled')",
                (item_id,),
            ).fetchall()
            token = tokens.load(tx, self.storage.codec, powens_user(id_user))
        if not rows:
            return 0
        cursors = [to_datetime(cursor) for _, cursor in rows]
        since = None if None in cursors else min(c for c in cursors if c is not None) - self.overlap
        mine = {int(account_id) for account_id, _ in rows}
        newest: datetime | None = None
        written = 0
        for listed in self.client.transactions(id_user, token, last_update=since):
            self.heartbeat()
            read = [powens_rows.transaction(t) for t in listed]
            newest = max(filter(None, [newest, *(parse_ts(r["updated_at"]) for r in read)]), default=None)
            ours = self.writer.page([r for r in read if r["account_id"] in mine])
            with self.storage.transaction(durable=False) as tx:
                self.writer.write(tx, ours)
            written += len(ours.rows)
        if newest is not None:
            with self.storage.transaction(durable=False) as tx:
                for account_id in sorted(mine):
                    self.writer.advance_cursor(tx, account_id, newest)
        log.info("powens.listed", item_id=item_id, since=since and since.isoformat(), written=written)
        return written

    def _write_item(self, tx: Tx, user_uuid: str, item: dict[str, Any]) -> str | None:
        """The user and the item, as workers.sync writes Bridge's: why the sync stops, or None."""
        self.storage.upsert_user(tx, user_uuid)
        self.storage.upsert_item(tx, user_uuid, item)
        if (deleted := self.storage.user_deleted_at(tx, user_uuid)) is not None:
            self.storage.mark_item_deleted(tx, item["id"], deleted)
            return "user_deleted"
        return "item_deleted" if self.storage.item_deleted_at(tx, item["id"]) is not None else None

    def _deleted(self, tx: Tx, user_uuid: str, item_id: int) -> bool:
        return (
            is_erased(tx, user_uuid)
            or self.storage.user_deleted_at(tx, user_uuid) is not None
            or self.storage.item_deleted_at(tx, item_id) is not None
        )

    def _write_accounts(
        self, tx: Tx, accounts: Sequence[dict[str, Any]], bodies: Sequence[Mapping[str, Any]]
    ) -> int:
        """The body's accounts, and the transactions it carries for those not marked deleted."""
        self.storage.upsert_accounts(tx, accounts)
        for row, body in zip(accounts, bodies, strict=True):
            if body.get("deleted"):
                at = to_datetime(powens_rows.moment(body["deleted"]))
                if at is not None:
                    self.storage.mark_account_deleted(tx, row["id"], at)
        gone = self.storage.deleted_accounts(tx, [a["id"] for a in accounts])
        carried = [
            powens_rows.transaction(t)
            for row, body in zip(accounts, bodies, strict=True)
            if row["id"] not in gone
            for t in body.get("transactions") or ()
        ]
        page = self.writer.page(carried)
        self.writer.write(tx, page)
        return len(page.rows)
