"""Erasing a user: every row of theirs dropped, and a tombstone that keeps them from coming back.

Two paths lead here. The application deletes its customer (``DELETE /v1/users/{id}`` of the API:
Bridge's user first, then ours at once), or Bridge tells us (``user.deleted``, or the sweep finding
a user Bridge no longer knows): the user's rows are then marked deleted at once and erased
``DELETED_USER_RETENTION_DAYS`` later by the reconciliation sweep (0: by the job that marks them).

Erasing drops the user's transactions, accounts, items, Connect outcomes, ledger rows (whose bodies
name the user's items and accounts) and the user's row, in one transaction, each item's under the
item's lock, after the sync that may hold it. What remains is a row of ``erased_users``: Bridge's
uuid and a SHA-256 of the application's id, no bank data. A webhook still in flight for the user
then changes nothing (:meth:`workers.storage.Storage.mark_user_deleted` ignores an erased user; a
sync that slips through writes its rows marked deleted), and the next sweep erases what such a late
job wrote (:func:`leftovers`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

from workers.db import Tx
from workers.storage import Storage

_ITEMS = "SELECT id FROM items WHERE user_uuid = %s"
_ACCOUNTS = f"SELECT id FROM accounts WHERE item_id IN ({_ITEMS})"  # noqa: S608
# Children first, so that no statement looks for rows a previous one dropped.
_DROP = (
    f"DELETE FROM transactions WHERE account_id IN ({_ACCOUNTS})",  # noqa: S608
    f"DELETE FROM accounts WHERE item_id IN ({_ITEMS})",  # noqa: S608
    f"DELETE FROM webhook_events WHERE item_id IN ({_ITEMS}) OR user_uuid = %s",  # noqa: S608
    "DELETE FROM connect_sessions WHERE user_uuid = %s",
    "DELETE FROM user_tokens WHERE user_uuid = %s",
    "DELETE FROM items WHERE user_uuid = %s",
    "DELETE FROM users WHERE uuid = %s",
)


def external_hash(external_user_id: str) -> str:
    return hashlib.sha256(external_user_id.encode()).hexdigest()


def erase(tx: Tx, user_uuid: str, external_user_id: str | None, at: datetime) -> None:
    """Drop every row of the user and leave the tombstone (in the caller's transaction)."""
    for statement in _DROP:
        tx.execute(statement, (user_uuid,) * statement.count("%s"))
    tx.execute(
        "INSERT INTO erased_users (uuid, external_user_id_hash, erased_at) VALUES (%s, %s, %s) "
        "ON CONFLICT (uuid) DO UPDATE SET external_user_id_hash = COALESCE(excluded.external_user_id_hash, "
        "erased_users.external_user_id_hash)",
        (user_uuid, None if external_user_id is None else external_hash(external_user_id), at),
    )


def was_erased(tx: Tx, external_user_id: str) -> bool:
    """Whether we erased a user the application knew by this id."""
    row = tx.execute(
        "SELECT 1 FROM erased_users WHERE external_user_id_hash = %s", (external_hash(external_user_id),)
    ).fetchone()
    return row is not None


def forget_erasure(tx: Tx, external_user_id: str) -> None:
    """The application uses the id again (a new Bridge user): its old tombstone no longer answers for it."""
    tx.execute(
        "UPDATE erased_users SET external_user_id_hash = NULL WHERE external_user_id_hash = %s",
        (external_hash(external_user_id),),
    )


def due(storage: Storage, now: datetime, retention_days: int) -> list[tuple[str, str | None]]:
    """(uuid, external id) of the users marked deleted more than ``retention_days`` ago."""
    with storage.transaction() as tx:
        rows = tx.execute(
            "SELECT uuid, external_user_id FROM users WHERE deleted_at IS NOT NULL AND deleted_at <= %s "
            "ORDER BY deleted_at",
            (now - timedelta(days=retention_days),),
        ).fetchall()
    return [(str(row[0]), row[1]) for row in rows]


def leftovers(storage: Storage) -> list[str]:
    """Erased users of whom a late job wrote a row again (a user's, an item's, or its ledger row)."""
    with storage.transaction() as tx:
        rows = tx.execute(
            "SELECT uuid FROM erased_users e WHERE EXISTS (SELECT 1 FROM users u WHERE u.uuid = e.uuid) "
            "OR EXISTS (SELECT 1 FROM items i WHERE i.user_uuid = e.uuid) "
            "OR EXISTS (SELECT 1 FROM webhook_events w WHERE w.user_uuid = e.uuid) ORDER BY uuid"
        ).fetchall()
    return [str(row[0]) for row in rows]


def is_erased(tx: Tx, user_uuid: str) -> bool:
    return tx.execute("SELECT 1 FROM erased_users WHERE uuid = %s", (user_uuid,)).fetchone() is not None


def erase_user(
    storage: Storage,
    user_uuid: str,
    external_user_id: str | None,
    at: datetime,
    lock: Callable[[int], AbstractContextManager[Any]],
) -> None:
    """Erase the user: each item's rows under ``lock(item_id)`` (the item's lock, after the sync that
    holds it), then the rest and the tombstone. Safe to run twice."""
    for item_id in storage.item_ids_of(user_uuid):
        with lock(item_id), storage.transaction() as tx:
            tx.execute(
                "DELETE FROM transactions WHERE account_id IN (SELECT id FROM accounts WHERE item_id = %s)",
                (item_id,),
            )
            tx.execute("DELETE FROM accounts WHERE item_id = %s", (item_id,))
            tx.execute("DELETE FROM webhook_events WHERE item_id = %s", (item_id,))
            tx.execute("DELETE FROM items WHERE id = %s", (item_id,))
    with storage.transaction() as tx:
        erase(tx, user_uuid, external_user_id, at)
