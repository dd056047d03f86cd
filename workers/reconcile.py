"""Reconciliation: what webhooks miss, found by asking Bridge and by looking at our own rows.

One sweep (an RQ job the scheduler enqueues every ``RECONCILE_INTERVAL_SECONDS``):

- lists each user's items at Bridge (one paginated call per user) and records what changed.
  Status ``1100`` is never announced by webhook, so this is how it is found; an item in 1100
  is polled by every sweep until it leaves it, and synced when it does;
- compares each item's ``last_successful_refresh`` at Bridge with ours and enqueues the
  delta when Bridge refreshed without a webhook reaching us (and a full resync for an item
  we have never seen);
- finds what Bridge deleted without a webhook reaching us: an item we hold that Bridge no longer
  lists gets a resync (its 404 marks it gone, under the item's lock), a user Bridge answers 404
  for gets a ``user.deleted`` of our own;
- erases the users Bridge deleted more than ``DELETED_USER_RETENTION_DAYS`` ago (workers.erasure);
- sweeps Powens's users the same way (workers.powens_reconcile), when Powens is configured;
- warns about items stuck in ``1003`` for more than 24 h (Bridge's checklist: contact their
  support) and items whose last sync is older than ``RECONCILE_STALE_SECONDS``, and resyncs them.

It stops early, without failing, when Bridge's request budget runs out; the next sweep
starts again from the first user. Each sweep, enqueued by the scheduler or by `bridgehook
reconcile`, leaves when it ran and what it found in Redis (:data:`LAST_SWEEP_KEY`) for
`bridgehook status`: a sweep that never ran, or stopped running, is data nobody looks for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from service.logs import get_logger
from workers.actions import STUCK_AFTER
from workers.context import WorkerContext
from workers.db import to_datetime
from workers.erasure import due, erase_user, leftovers
from workers.errors import NotFound, TransientError
from workers.jobs import item_lock
from workers.powens_reconcile import PowensSweep
from workers.providers import provider_of_user
from workers.replay import Enqueuer
from workers.storage import TEMPORARY_STATUSES, USER_ACTION_STATUSES, Storage, parse_ts

log = get_logger("bridgehook.reconcile")

LAST_SWEEP_KEY = "bridgehook:reconcile:last"  # JSON: the last sweep's times, outcome and counts


def _live_items(storage: Storage, where: str, before: datetime) -> list[tuple[int, str]]:
    """(item id, user uuid) of live items matching ``where`` (a constant condition on ``%s`` = before)."""
    sql = f"SELECT id, user_uuid FROM items WHERE deleted_at IS NULL AND {where} ORDER BY id"  # noqa: S608
    with storage.transaction() as tx:
        return [(row[0], row[1]) for row in tx.execute(sql, (before,)).fetchall()]


def stuck_items(storage: Storage, now: datetime) -> list[tuple[int, str]]:
    return _live_items(storage, "status = 1003 AND status_changed_at < %s", now - STUCK_AFTER)


def stale_items(storage: Storage, now: datetime, age: timedelta) -> list[tuple[int, str]]:
    return _live_items(storage, "status = 0 AND (last_synced_at IS NULL OR last_synced_at < %s)", now - age)


def last_sweep(connection: redis.Redis) -> dict[str, Any] | None:
    """What the last sweep recorded (see Reconciler.run), or None when none ever finished."""
    raw = connection.get(LAST_SWEEP_KEY)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Reconciler:
    def __init__(
        self,
        ctx: WorkerContext,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        trigger: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.enqueuer = Enqueuer(ctx.redis, ctx.settings)
        self.now = now
        self.trigger = trigger  # "scheduled" or "manual", as recorded for status

    def run(self) -> dict[str, Any]:
        """One sweep; its counts, also recorded for `bridgehook status` (a failed sweep too, then raised)."""
        started = self.now()
        try:
            counts = self._sweep()
        except Exception as exc:
            self._record(started, "failed", {}, f"{type(exc).__name__}: {exc}"[:300])
            raise
        self._record(started, "partial" if counts["partial"] else "done", counts)
        return counts

    def _record(
        self, started: datetime, outcome: str, counts: dict[str, int], error: str | None = None
    ) -> None:
        summary = {"started_at": started.isoformat(), "finished_at": self.now().isoformat(),
                   "trigger": self.trigger, "outcome": outcome, "counts": counts, "error": error}  # fmt: skip
        try:
            self.ctx.redis.set(LAST_SWEEP_KEY, json.dumps(summary))
        except redis.RedisError as exc:  # the sweep's work is done; only status misses it
            log.warning("reconcile.not_recorded", error=str(exc))

    def _sweep(self) -> dict[str, Any]:
        counts = {"users": 0, "changed": 0, "deltas": 0, "new_items": 0, "gone": 0, "stuck": 0, "stale": 0,
                  "partial": 0}  # fmt: skip
        gone: list[str] = []
        try:
            for user_uuid in self._users():
                if self._user(user_uuid, counts):
                    counts["users"] += 1
                else:
                    gone.append(user_uuid)
        except TransientError as exc:
            self._partial(exc, counts)
        self._users_gone(gone, counts["users"], "BRIDGE_API_URL", counts)
        if self.ctx.settings.powens_api_url:
            try:
                known, gone = PowensSweep(self.ctx, self.enqueuer).run(counts)
            except TransientError as exc:
                self._partial(exc, counts)
            else:
                counts["users"] += known
                self._users_gone(gone, known, "POWENS_API_URL", counts)
        now = self.now()
        for item_id, user_uuid in stuck_items(self.ctx.storage, now):
            log.warning("reconcile.item_stuck_1003", item_id=item_id, hint="contact Bridge support")
            self.enqueuer.resync_item(item_id, user_uuid)
            counts["stuck"] += 1
        stale_after = timedelta(seconds=self.ctx.settings.reconcile_stale_seconds)
        for item_id, user_uuid in stale_items(self.ctx.storage, now, stale_after):
            log.warning("reconcile.item_stale", item_id=item_id, stale_after=str(stale_after))
            self.enqueuer.resync_item(item_id, user_uuid)
            counts["stale"] += 1
        counts["erased"] = self._erase(now)
        log.info("reconcile.done", **counts)
        return counts

    @staticmethod
    def _partial(exc: TransientError, counts: dict[str, int]) -> None:
        counts["partial"] = 1
        log.warning("reconcile.partial", error=str(exc), users_done=counts["users"])

    def _erase(self, now: datetime) -> int:
        """Users Bridge deleted more than DELETED_USER_RETENTION_DAYS ago, and erased users a late job
        wrote a row of again: erased (workers.erasure), each item under its lock."""
        storage, days = self.ctx.storage, self.ctx.settings.deleted_user_retention_days
        todo = dict(due(storage, now, days)) | dict.fromkeys(leftovers(storage))
        for user_uuid, external in todo.items():
            erase_user(storage, user_uuid, external, now, lambda item_id: item_lock(self.ctx, item_id))
            if provider_of_user(user_uuid) == "bridge":  # (a Powens user's token goes with its rows)
                self.ctx.client.forget_token(user_uuid)
            log.info("reconcile.user_erased", user_uuid=user_uuid)
        return len(todo)

    def _users(self) -> list[str]:
        with self.ctx.storage.transaction() as tx:
            rows = tx.execute(
                "SELECT DISTINCT user_uuid FROM items WHERE deleted_at IS NULL AND provider = 'bridge' "
                "ORDER BY user_uuid"
            ).fetchall()
        return [row[0] for row in rows]

    def _users_gone(self, gone: list[str], known: int, setting: str, counts: dict[str, int]) -> None:
        """A deletion of our own for each user the provider no longer knows; not when it knew none of
        several users in the sweep: then the likelier cause is ours (a wrong ``setting``, the API's
        URL, or credentials), and a deletion is never undone."""
        if len(gone) > 1 and not known:
            log.warning("reconcile.every_user_unknown", users=len(gone), hint=f"check {setting}")
            return
        for user_uuid in gone:
            log.info("reconcile.user_gone", user_uuid=user_uuid)
            counts["gone"] += 1
            self.enqueuer.user_gone(user_uuid)

    def _user(self, user_uuid: str, counts: dict[str, int]) -> bool:
        """One user's items at Bridge against ours; False if Bridge does not know the user."""
        with self.ctx.storage.transaction() as tx:
            rows = tx.execute(
                "SELECT id, status, last_successful_refresh, deleted_at FROM items WHERE user_uuid = %s",
                (user_uuid,),
            ).fetchall()
        ours = {row[0]: (row[1], to_datetime(row[2])) for row in rows if row[3] is None}
        deleted = {row[0] for row in rows if row[3] is not None}
        try:
            pages = list(self.ctx.client.item_pages(user_uuid))
        except NotFound:
            return False
        listed = {int(item["id"]) for page in pages for item in page}
        for item_id in sorted(ours.keys() - listed):  # gone at Bridge
            log.info("reconcile.item_gone", item_id=item_id)
            counts["gone"] += 1
            self.enqueuer.resync_item(item_id, user_uuid)
        for item in (i for page in pages for i in page):
            item_id, status = int(item["id"]), item.get("status")
            known = ours.get(item_id)
            if item_id in deleted:  # deleted stays deleted, whatever Bridge still lists
                continue
            if known is None:
                counts["new_items"] += 1
                self.enqueuer.resync_item(item_id, user_uuid)
                continue
            old_status, old_refresh = known
            if status != old_status:
                counts["changed"] += 1
                log.info("reconcile.status_changed", item_id=item_id, old=old_status, new=status)
                with self.ctx.storage.transaction() as tx:
                    self.ctx.storage.upsert_item(tx, user_uuid, item)
            refresh = parse_ts(item.get("last_successful_refresh"))
            usable = status not in USER_ACTION_STATUSES and status not in TEMPORARY_STATUSES
            left_user_action = old_status in USER_ACTION_STATUSES and usable
            if usable and (
                left_user_action or (refresh is not None and (old_refresh is None or refresh > old_refresh))
            ):
                counts["deltas"] += 1
                tag = str(int(refresh.timestamp() * 1000)) if refresh else "none"
                self.enqueuer.delta(item_id, user_uuid, tag)
        return True
