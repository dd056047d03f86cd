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

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Any

from service.logs import get_logger
from workers import powens_rows, tokens
from workers.db import Tx, to_datetime
from workers.erasure import is_erased
from workers.errors import AuthError, NotFound, PermanentError
from workers.powens import PAGE_LIMIT, PowensClient
from workers.providers import native_id, powens_user, powens_user_id, stored_id
from workers.storage import Storage, parse_ts
from workers.writer import Writer

log = get_logger("bridgehook.powens")


@contextmanager
def refused_token(id_user: int) -> Iterator[None]:
    """Powens refuses a user's permanent token only once the user is deleted there (or the token
    revoked): the user is gone, as a 404 says at Bridge (the job ends, not found; the sweep, or
    USER_DELETED, deletes the user here)."""
    try:
        yield
    except AuthError as exc:
        raise NotFound(
            f"Powens refuses {powens_user(id_user)}'s token ({exc.status}): deleted at Powens"
        ) from exc


def check_owner(
    tx: Tx,
    id_user: int,
    item_id: int,
    accounts: Sequence[Mapping[str, Any]],
    bodies: Sequence[Mapping[str, Any]],
) -> None:
    """A body speaks for one user's connection: the connection, its accounts and their transactions
    are that user's, or none of it is written (a PermanentError: a dead letter to look at). Powens's
    own bodies always are; this holds a body to it where the webhook's authentication proves only
    who the user is (the bearer mode, service/bearer.py), so one user's token cannot touch another's
    rows: nor a transaction we hold under another connection's account, looked for by one query per
    page of the body's transactions (Powens's page, 1,000), not one per row."""
    held_by = owner(tx, item_id)
    if held_by is not None and held_by != id_user:
        raise PermanentError(f"connection {native_id(item_id)} is not user {id_user}'s")
    for row, body in zip(accounts, bodies, strict=True):
        held = tx.execute("SELECT item_id FROM accounts WHERE id = %s", (row["id"],)).fetchone()
        if row["item_id"] != item_id or (held is not None and int(held[0]) != item_id):
            raise PermanentError(f"account {native_id(row['id'])} is not connection {native_id(item_id)}'s")
        if any(
            stored_id(t.get("id_account", body["id"])) != row["id"] for t in body.get("transactions") or ()
        ):
            raise PermanentError(f"a transaction under account {native_id(row['id'])} names another account")
    ids = [stored_id(t["id"]) for body in bodies for t in body.get("transactions") or ()]
    for start in range(0, len(ids), PAGE_LIMIT):
        some = ids[start : start + PAGE_LIMIT]
        marks = ", ".join(["%s"] * len(some))
        sql = (
            "SELECT t.id FROM transactions t JOIN accounts a ON a.id = t.account_id "  # noqa: S608
            f"WHERE a.item_id <> %s AND t.id IN ({marks}) LIMIT 1"
        )
        if (stray := tx.execute(sql, (item_id, *some)).fetchone()) is not None:
            raise PermanentError(
                f"transaction {native_id(stray[0])} is not connection {native_id(item_id)}'s"
            )


def owner(tx: Tx, item_id: int) -> int | None:
    """The Powens user of a connection we hold (an account's body may not name it)."""
    row = tx.execute("SELECT user_uuid FROM items WHERE id = %s", (item_id,)).fetchone()
    return None if row is None else powens_user_id(str(row[0]))


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
        """Write what the body carries, then list what it does not (when the connection is usable).
        The body holds the activated accounts only: the others of a connection new to us, and an
        account we hold as enabled that it leaves out (disabled or deleted since), are what one
        listing of the user's accounts tells."""
        id_user, connection = int(body["user"]["id"]), body["connection"]
        item = powens_rows.item(connection)
        bodies = list(connection.get("accounts") or ())
        accounts = [powens_rows.account(a) for a in bodies]
        with self.storage.transaction(durable=False) as tx:
            check_owner(tx, id_user, item["id"], accounts, bodies)
            skipped = self._write_item(tx, powens_user(id_user), item)
            if skipped is None:
                new = self._never_synced(tx, item["id"])
                written = self._write_accounts(tx, accounts, bodies)
                left_out = {a for a, _ in self._consented(tx, item["id"])} - {a["id"] for a in accounts}
        if skipped is not None:
            return {"skipped": skipped}
        summary: dict[str, Any] = {"item_id": item["id"], "accounts": len(accounts), "transactions": written}
        if new or left_out:
            self._read_accounts(id_user, [item["id"]])
        return summary | {"listed": self._list_if_usable(id_user, [item])[item["id"]]}

    def resync(
        self,
        id_user: int,
        connection_id: int,
        *,
        reset: bool,
        connections: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The connection and its accounts as Powens lists them now, then its transactions: those updated
        since its cursors, or (``reset``: ``bridgehook resync``) all of them, the cursors replaced. What
        the reconciliation sweep enqueues when a webhook went missing (workers.powens_reconcile).
        ``connections``: the user's, as :meth:`connections` read them already."""
        done = self.resync_all(id_user, [connection_id], reset=reset, connections=connections)
        return done[stored_id(connection_id)]

    def resync_all(
        self,
        id_user: int,
        connection_ids: Sequence[int],
        *,
        reset: bool,
        connections: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """:meth:`resync` of several of the user's connections at once (the caller holds the lock of
        each): Powens lists connections, accounts and transactions per user, not per connection, so each
        listing is read once for all of them. What each came to, by item id (``listed``: the rows the
        one transactions listing wrote for it)."""
        done: dict[int, dict[str, Any]] = {}
        with self.storage.transaction() as tx:
            for connection_id in connection_ids:
                if self._deleted(tx, powens_user(id_user), stored_id(connection_id)):  # deleted stays deleted
                    done[stored_id(connection_id)] = {"skipped": "deleted"}
        live = [c for c in connection_ids if stored_id(c) not in done]
        if not live:
            return done
        token = self.token_of(id_user)
        if connections is None:
            connections = self.connections(id_user, token)
        listed = {int(c["id"]): c for c in connections}
        items = []
        with self.storage.transaction(durable=False) as tx:
            for connection_id in live:
                item_id = stored_id(connection_id)
                # Not listed: deleted at Powens, and its CONNECTION_DELETED never reached us.
                if connection_id not in listed:
                    self.storage.mark_item_deleted(tx, item_id, datetime.now(UTC))
                    done[item_id] = {"item_id": item_id, "gone": True}
                    continue
                item = powens_rows.item(listed[connection_id])
                if (skipped := self._write_item(tx, powens_user(id_user), item)) is not None:
                    done[item_id] = {"skipped": skipped}
                else:
                    items.append(item)
        if not items:
            return done
        accounts = self._read_accounts(id_user, [item["id"] for item in items], token)
        if reset:
            with self.storage.transaction(durable=False) as tx:
                for item in items:
                    tx.execute(
                        "UPDATE accounts SET transactions_cursor = NULL WHERE item_id = %s", (item["id"],)
                    )
        outcome = self._list_if_usable(id_user, items, token)
        for item in items:
            item_id = item["id"]
            done[item_id] = {"item_id": item_id, "accounts": accounts[item_id], "listed": outcome[item_id]}
        return done

    def connections(self, id_user: int, token: str | None = None) -> list[dict[str, Any]]:
        """The user's connections at Powens (a refused token: the user is gone, see :func:`refused_token`)."""
        with refused_token(id_user):
            return self.client.connections(id_user, token or self.token_of(id_user))

    def account_changed(self, account: Mapping[str, Any], *, list_after: bool) -> dict[str, Any]:
        """ACCOUNT_ENABLED (``list_after``: its transactions, which consent makes readable) or
        ACCOUNT_DISABLED (Powens deletes a disabled account's transactions: so do we, with no call)."""
        row, item_id = powens_rows.account(account), stored_id(account["id_connection"])
        with self.storage.transaction(durable=False) as tx:
            id_user = account.get("id_user") or owner(tx, item_id)
            if id_user is not None:
                check_owner(tx, int(id_user), item_id, [row], [account])
            if self._deleted(tx, None if id_user is None else powens_user(id_user), item_id):
                return {"skipped": "deleted"}
            self._write_accounts(tx, [row], [account])
        if not list_after or id_user is None:  # (whose it is: the connection's next sync will say)
            return {"account_id": row["id"], "listed": 0}
        return {"account_id": row["id"], "listed": self.list_changes(int(id_user), [item_id])[item_id]}

    def list_changes(self, id_user: int, item_ids: Sequence[int], token: str | None = None) -> dict[int, int]:
        """The user's transactions updated after the earliest cursor of the items' accounts (all of
        them for an account never listed), deleted ones included; those of the items' accounts are
        written, page by page (the caller holds each item's lock). Then every such account's cursor
        moves to the latest ``last_update`` seen: the listing showed everything updated up to it, the
        user's other items' too. Returns the number of rows written for each item."""
        token = token or self.token_of(id_user)
        with self.storage.transaction() as tx:
            rows = [(item_id, *row) for item_id in item_ids for row in self._consented(tx, item_id)]
        written = dict.fromkeys(item_ids, 0)
        if not rows:
            return written
        cursors = [cursor for _, _, cursor in rows]
        since = None if None in cursors else min(c for c in cursors if c is not None) - self.overlap
        mine = {account_id: item_id for item_id, account_id, _ in rows}
        newest: datetime | None = None
        with refused_token(id_user):
            pages = self.client.transactions(id_user, token, last_update=since)
            first = next(pages, None)  # (a generator: its first request goes here)
        for listed in chain([first] if first is not None else [], pages):
            self.heartbeat()
            read = [powens_rows.transaction(t) for t in listed]
            newest = max(filter(None, [newest, *(parse_ts(r["updated_at"]) for r in read)]), default=None)
            chosen = [r for r in read if r["account_id"] in mine]
            with self.storage.transaction(durable=False) as tx:
                self.writer.write(tx, self.writer.page(chosen))
            for r in chosen:
                written[mine[r["account_id"]]] += 1
        if newest is not None:
            with self.storage.transaction(durable=False) as tx:
                for account_id in sorted(mine):
                    self.writer.advance_cursor(tx, account_id, newest)
        log.info("powens.listed", item_ids=list(item_ids), since=since and since.isoformat(),
                 written=sum(written.values()))  # fmt: skip
        return written

    def _list_if_usable(
        self, id_user: int, items: Sequence[Mapping[str, Any]], token: str | None = None
    ) -> dict[int, int | str]:
        """List the items' changes (one listing for all), but not those of a connection that waits for
        the user or for Powens (nothing new to read until then: workers.actions); then each item is
        synced as of its ``last_update``, which the reconciliation sweep compares with Powens's. A
        connection not usable is synced too, as of no refresh (it read none): its sync ended, so its
        next bodies read no accounts again (:meth:`_never_synced`) until one leaves an account out.
        What each came to, by item id: the rows listed, or ``not_usable``."""
        usable = [item for item in items if item.get("status") == 0]
        listed = self.list_changes(id_user, [item["id"] for item in usable], token) if usable else {}
        with self.storage.transaction(durable=False) as tx:
            for item in items:
                refresh = parse_ts(item.get("last_successful_refresh")) if item["id"] in listed else None
                self.storage.item_synced(tx, item["id"], refresh)
        return {item["id"]: listed.get(item["id"], "not_usable") for item in items}

    def _read_accounts(
        self, id_user: int, item_ids: Sequence[int], token: str | None = None
    ) -> dict[int, int]:
        """The items' accounts as Powens lists them now (one listing of the user's), disabled and
        deleted ones included; those we hold that it no longer lists at all are marked deleted.
        Returns how many it lists for each item."""
        token = token or self.token_of(id_user)
        with refused_token(id_user):
            everyone = self.client.accounts(id_user, token, all=True)
        counts = {}
        with self.storage.transaction(durable=False) as tx:
            for item_id in item_ids:
                bodies = [a for a in everyone if stored_id(a["id_connection"]) == item_id]
                rows = [powens_rows.account(a) for a in bodies]
                self._write_accounts(tx, rows, bodies)
                self.storage.vanish_accounts(tx, item_id, [a["id"] for a in rows], datetime.now(UTC))
                counts[item_id] = len(rows)
        return counts

    def token_of(self, id_user: int) -> str:
        with self.storage.transaction() as tx:
            return tokens.load(tx, self.storage.codec, powens_user(id_user))

    @staticmethod
    def _never_synced(tx: Tx, item_id: int) -> bool:
        """New to us, or every attempt so far failed before the end: its body's accounts may be stored,
        not those awaiting consent (a sync that ends records when: Storage.item_synced, a connection not
        usable's too, whose sync ends once its accounts are read)."""
        row = tx.execute("SELECT last_synced_at FROM items WHERE id = %s", (item_id,)).fetchone()
        return row is None or row[0] is None

    @staticmethod
    def _disabled(tx: Tx, account_ids: Sequence[int]) -> set[int]:
        if not account_ids:
            return set()
        marks = ", ".join(["%s"] * len(account_ids))
        sql = f"SELECT id FROM accounts WHERE data_access = 'disabled' AND id IN ({marks})"  # noqa: S608
        return {int(row[0]) for row in tx.execute(sql, tuple(account_ids)).fetchall()}

    @staticmethod
    def _consented(tx: Tx, item_id: int) -> list[tuple[int, datetime | None]]:
        """The item's live accounts we hold with the user's consent, each with its cursor."""
        rows = tx.execute(
            "SELECT id, transactions_cursor FROM accounts WHERE item_id = %s AND deleted_at IS NULL "
            "AND (data_access IS NULL OR data_access <> 'disabled')",
            (item_id,),
        ).fetchall()
        return [(int(account_id), to_datetime(cursor)) for account_id, cursor in rows]

    def _write_item(self, tx: Tx, user_uuid: str, item: dict[str, Any]) -> str | None:
        """The user and the item, as workers.sync writes Bridge's: why the sync stops, or None."""
        self.storage.upsert_user(tx, user_uuid)
        self.storage.upsert_item(tx, user_uuid, item)
        if (deleted := self.storage.user_deleted_at(tx, user_uuid)) is not None:
            self.storage.mark_item_deleted(tx, item["id"], deleted)
            return "user_deleted"
        return "item_deleted" if self.storage.item_deleted_at(tx, item["id"]) is not None else None

    def _deleted(self, tx: Tx, user_uuid: str | None, item_id: int) -> bool:
        if user_uuid is not None and (
            is_erased(tx, user_uuid) or self.storage.user_deleted_at(tx, user_uuid) is not None
        ):
            return True
        return self.storage.item_deleted_at(tx, item_id) is not None

    def _write_accounts(
        self, tx: Tx, accounts: Sequence[dict[str, Any]], bodies: Sequence[Mapping[str, Any]]
    ) -> int:
        """Accounts as read (with their raw ``bodies``), and the transactions a body carries for those
        not marked deleted. A deleted account is marked so (Powens no longer finds it at the bank); a
        disabled one's transactions are marked deleted as of its ``disabled`` time, as Powens deletes
        them, but those updated after it (a consent given again since, whichever event comes last)."""
        self.storage.upsert_accounts(tx, accounts)
        for row, body in zip(accounts, bodies, strict=True):
            if row["deleted_at"] is not None:
                self.storage.mark_account_deleted(tx, row["id"], row["deleted_at"])
            if row.get("data_access") == "disabled":
                # As Powens does: deleted then, so a body older than that cannot bring them back.
                at = powens_rows.read_time(body.get("disabled")) or parse_ts(row["updated_at"])
                tx.execute(
                    "UPDATE transactions SET deleted_at = %s, bridge_updated_at = %s WHERE account_id = %s "
                    "AND deleted_at IS NULL AND (bridge_updated_at IS NULL OR bridge_updated_at <= %s)",
                    (at, at, row["id"], at),
                )
        # Not for an account deleted, or disabled as we hold it (a body older than its disabling: its
        # transactions are deleted at Powens by now).
        gone = self.storage.deleted_accounts(tx, [a["id"] for a in accounts]) | self._disabled(
            tx, [a["id"] for a in accounts]
        )
        carried = [
            powens_rows.transaction(t)
            for row, body in zip(accounts, bodies, strict=True)
            if row["id"] not in gone
            for t in body.get("transactions") or ()
        ]
        page = self.writer.page(carried)
        self.writer.write(tx, page)
        return len(page.rows)
