"""Reconciliation for Powens's users: what their webhooks missed, found by asking Powens.

Part of every sweep (workers.reconcile), for each live Powens user whose token we hold: two calls,
the user's connections and the user's accounts (disabled and deleted ones included), against our rows.
A connection is resynced (workers.powens_jobs.resync_connection, its transactions since its cursors)
when Powens synced it after our last complete sync of it (its ``last_update``), when its state, or one
of its accounts' consent or presence, differs from ours, when it is new to us, or when Powens no longer
lists it (the resync marks it deleted, under its lock). A user Powens refuses (401, 404: deleted at
Powens) gets a deletion of our own, as Bridge's do, but never when Powens refuses every user of a
sweep: that is likelier our configuration (``POWENS_API_URL``) than a mass deletion.

Powens sends ``CONNECTION_SYNCED`` after every sync, its daily background one included, which brings a
connection's new and changed transactions without this; what only a sweep finds is a deletion or a
consent change whose webhook was lost.

Each sweep also publishes the digest of every token it reads, for the receiver's bearer mode
(workers.tokens.republish), so that a Redis that lost them is right again after one sweep.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from service.logs import get_logger
from workers import powens_rows, tokens
from workers.context import WorkerContext
from workers.db import to_datetime
from workers.errors import AuthError, NotFound
from workers.providers import native_id, powens_user_id, stored_id
from workers.replay import Enqueuer

log = get_logger("bridgehook.reconcile")


class PowensSweep:
    def __init__(self, ctx: WorkerContext, enqueuer: Enqueuer) -> None:
        self.ctx = ctx
        self.enqueuer = enqueuer

    def run(self, counts: dict[str, int]) -> tuple[int, list[str]]:
        """One pass over the Powens users, counting the ``deltas`` it enqueues in ``counts``: how many
        users Powens knew, and those it refused (the sweep deletes them here, as Bridge's). A spent
        budget (TransientError) leaves to the caller."""
        known, gone = 0, []
        before = tokens.published(self.ctx.redis)
        held, users = self._users()
        tokens.republish(self.ctx.redis, held, before)  # a Redis rebuilt is right again
        for user_uuid, token in users:
            if self._user(user_uuid, token, counts):
                known += 1
            else:
                gone.append(user_uuid)
        return known, gone

    def _users(self) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """Every token held for a user not deleted (user uuid -> token), for bearer mode; and the
        live users to sweep, with theirs: a token may be stored before its user's first row (``make
        run`` stores the fake's), and is published all the same."""
        storage = self.ctx.storage
        with storage.transaction() as tx:
            rows = tx.execute(
                "SELECT t.user_uuid, t.token, u.uuid IS NOT NULL FROM user_tokens t "
                "LEFT JOIN users u ON u.uuid = t.user_uuid "
                "WHERE t.provider = 'powens' AND u.deleted_at IS NULL ORDER BY t.user_uuid"
            ).fetchall()
        held = {str(uuid): str(storage.codec.decode(token, tokens.COLUMN)) for uuid, token, _ in rows}
        return held, [(str(uuid), held[str(uuid)]) for uuid, _, known in rows if known]

    def _user(self, user_uuid: str, token: str, counts: dict[str, int]) -> bool:
        """False if Powens does not know the user."""
        id_user, powens = powens_user_id(user_uuid), self.ctx.powens
        try:
            connections = {int(c["id"]): c for c in powens.connections(id_user, token)}
            accounts = powens.accounts(id_user, token, all=True)
        except (NotFound, AuthError):
            return False
        ours = self._ours(user_uuid)
        differs = {native_id(i) for i in ours["items"]} - set(connections)  # gone at Powens
        for connection_id, connection in connections.items():
            held = ours["items"].get(stored_id(connection_id))
            if held is None:  # new to us
                differs.add(connection_id)
            if held is None or held["deleted"]:
                continue
            item = powens_rows.item(connection)
            refreshed = to_datetime(item["last_successful_refresh"])
            if item["status"] != held["status"] or (
                refreshed is not None and (held["synced"] is None or refreshed > held["synced"])
            ):
                differs.add(connection_id)
        for account in accounts:
            row, held_account = powens_rows.account(account), ours["accounts"].get(stored_id(account["id"]))
            if _account_differs(row, held_account):
                differs.add(int(account["id_connection"]))
        tag = str(int(datetime.now(UTC).timestamp()))
        for connection_id in sorted(differs):
            item_id = stored_id(connection_id)
            if item_id in ours["items"] and ours["items"][item_id]["deleted"]:
                continue  # deleted stays deleted
            counts["deltas"] += 1
            log.info("reconcile.powens_differs", item_id=item_id)
            self.enqueuer.powens_resync(item_id, user_uuid, f"reconcile-{item_id}-{tag}", reset=False)
        return True

    def _ours(self, user_uuid: str) -> dict[str, dict[int, dict[str, Any]]]:
        with self.ctx.storage.transaction() as tx:
            items = tx.execute(
                "SELECT id, status, last_successful_refresh, deleted_at FROM items WHERE user_uuid = %s",
                (user_uuid,),
            ).fetchall()
            accounts = tx.execute(
                "SELECT a.id, a.data_access, a.deleted_at FROM accounts a JOIN items i ON i.id = a.item_id "
                "WHERE i.user_uuid = %s",
                (user_uuid,),
            ).fetchall()
        return {
            "items": {
                int(i): {"status": s, "synced": to_datetime(r), "deleted": d is not None}
                for i, s, r, d in items
            },
            "accounts": {
                int(a): {"data_access": access, "deleted": d is not None} for a, access, d in accounts
            },
        }


def _account_differs(row: Mapping[str, Any], held: Mapping[str, Any] | None) -> bool:
    """An account Powens lists that we do not hold (unless deleted), or hold with another consent or
    presence."""
    if held is None:
        return bool(row["deleted_at"] is None)
    return bool(
        row["data_access"] != held["data_access"] or (row["deleted_at"] is not None) != held["deleted"]
    )
