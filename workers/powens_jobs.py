"""RQ job functions, one per processed Powens event, importable by dotted path.

The receiver enqueues ``workers.powens_jobs.<name>(event)`` (service/powens_events.py) with an
envelope shaped like a Bridge event: ``{"type", "provider": "powens", "id_webhook_data", "content":
<Powens's body>, "timestamp": <receipt, ms>}``, the body sealed as ``"sealed"`` instead of
``"content"`` where the receiver seals (workers.sealed opens it). Each job runs as Bridge's do
(workers.jobs): the same ledger row, the same retries and budget deferrals, the same dead letters,
and the item's lock (item -N for connection N, see workers.providers) around what it writes, so
that a Powens event and a replay of it, in any order, leave the rows that Powens holds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from workers.context import WorkerContext, current
from workers.errors import PermanentError
from workers.jobs import Event, _run, delete_user, event_time, item_lock
from workers.powens_sync import PowensSync, check_owner
from workers.providers import native_id, powens_user, stored_id
from workers.sealed import opened
from workers.sync import Syncer

Job = Callable[[Event], dict[str, Any]]


def _opens(job: Job) -> Job:
    """The job reads the event with its body opened, when the receiver sealed it (workers.sealed);
    one that cannot be opened fails as any job does (the ledger, a dead letter), never retried."""

    @functools.wraps(job)
    def run(event: Event) -> dict[str, Any]:
        try:
            event = opened(event, current().opener)
        except PermanentError as exc:
            return _run(event, functools.partial(_refuse, exc), locks_itself=True)
        return job(event)

    return run


def _refuse(exc: PermanentError, ctx: WorkerContext, syncer: Syncer) -> dict[str, Any]:
    raise exc


def _under_lock(event: Event, item_id: int, work: Callable[[PowensSync], dict[str, Any]]) -> dict[str, Any]:
    def run(ctx: WorkerContext, _: Syncer) -> dict[str, Any]:
        with item_lock(ctx, item_id) as heartbeat:
            return work(ctx.powens_sync(heartbeat))

    return _run(event, run, locks_itself=True)


@_opens
def connection_synced(event: Event) -> dict[str, Any]:
    """The connection, its activated accounts and new transactions, from the body; then the rest."""
    body = event["content"]
    return _under_lock(event, stored_id(body["connection"]["id"]), lambda s: s.connection_synced(body))


@_opens
def account_enabled(event: Event) -> dict[str, Any]:
    """The user consented: the account is kept as enabled and its transactions are listed."""
    body = event["content"]
    return _under_lock(
        event, stored_id(body["id_connection"]), lambda s: s.account_changed(body, list_after=True)
    )


@_opens
def account_disabled(event: Event) -> dict[str, Any]:
    """Consent withdrawn: the account is kept, flagged ``data_access = disabled``, and its
    transactions are marked deleted, as Powens deletes them."""
    body = event["content"]
    return _under_lock(
        event, stored_id(body["id_connection"]), lambda s: s.account_changed(body, list_after=False)
    )


@_opens
def account_found(event: Event) -> dict[str, Any]:
    """An account found at the bank: kept, disabled until the user consents (then its transactions
    are listed, as for ACCOUNT_ENABLED)."""
    body = event["content"]
    return _under_lock(
        event,
        stored_id(body["id_connection"]),
        lambda s: s.account_changed(body, list_after=not body.get("disabled")),
    )


@_opens
def connection_deleted(event: Event) -> dict[str, Any]:
    """Bridge's ``item.deleted`` rules: the item and its accounts are marked deleted (the earliest
    time wins), and stay so whatever a late event says."""
    c = event["content"]
    item_id, at = stored_id(c["id"]), event_time(event)

    def work(ctx: WorkerContext, _: Syncer) -> dict[str, Any]:
        with item_lock(ctx, item_id), ctx.storage.transaction() as tx:
            if c.get("id_user") is not None:  # the user's, as its body says (see PowensSync._check_owner)
                check_owner(tx, int(c["id_user"]), item_id, [], [])
            ctx.storage.mark_item_deleted(tx, item_id, at)
        return {"deleted_at": at.isoformat()}

    return _run(event, work, locks_itself=True)


@_opens
def user_deleted(event: Event) -> dict[str, Any]:
    """Bridge's ``user.deleted`` rules (workers.jobs.delete_user), and the user's token is dropped."""
    return delete_user(event, powens_user(event["content"]["id"]))


def resync_connection(event: Event) -> dict[str, Any]:
    """The connection, its accounts and its transactions as Powens lists them now (``reset``: all of
    its transactions, cursors replaced): `bridgehook resync`, or the sweep after a missed webhook."""
    c = event["content"]
    id_user, connection_id = int(c["id_user"]), int(c["id_connection"])
    return _under_lock(
        event,
        stored_id(connection_id),
        lambda s: s.resync(id_user, connection_id, reset=bool(c.get("reset"))),
    )


def resync_user(event: Event) -> dict[str, Any]:
    """Every connection of the user, Powens's and ours (a connection only we still hold is marked
    deleted), but those in ``skip``: `bridgehook resync --user powens-<id>`. Their locks are all held
    at once (taken in one order, the connections' ids ascending), so that the user's connections,
    accounts and transactions are each listed once for all of them (PowensSync.resync_all)."""
    c = event["content"]
    id_user, skip = int(c["id_user"]), {int(i) for i in c.get("skip", ())}

    def work(ctx: WorkerContext, _: Syncer) -> dict[str, Any]:
        connections = ctx.powens_sync().connections(id_user)  # once, for all of them
        listed = {int(c["id"]) for c in connections}
        held = {native_id(i) for i in ctx.storage.item_ids_of(powens_user(id_user))}
        chosen = [i for i in sorted(listed | held) if stored_id(i) not in skip]
        with ExitStack() as locks:
            beats = [locks.enter_context(item_lock(ctx, stored_id(i))) for i in chosen]

            def heartbeat() -> None:
                for beat in beats:
                    beat()

            ctx.powens_sync(heartbeat).resync_all(id_user, chosen, reset=True, connections=connections)
        return {"items": [stored_id(i) for i in chosen]}

    return _run(event, work, locks_itself=True)
