"""RQ job functions, one per processed Bridge event, importable by dotted path.

The receiver enqueues ``workers.jobs.<name>(event)`` with the event dict (JSON serializer,
job id = SHA-256 of the raw body). Every job records itself in ``webhook_events``, holds the
item's lock while it writes (two jobs for one item never write concurrently; different
items run in parallel), and fetches current state from Bridge, so that replays in any
order converge on the same rows. Transient failures raise, and RQ's ``Retry`` schedule
takes over (never sooner than the error's ``retry_after``); a permanent one skips the remaining
retries and lands in the failed-job registry (our dead-letter queue) at once. A spent request
budget (:class:`~workers.errors.BudgetExhausted`) is no failure: the job is scheduled again for
when the budget frees, through the same schedule, and keeps all its retries, so no job that moves
forward is dead-lettered by a budget (see MAX_IDLE_DEFERRALS for one that does not).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import structlog
from redis.exceptions import LockError
from rq import get_current_job

from service.logs import get_logger
from workers import tokens, watermark
from workers.context import WorkerContext, current
from workers.erasure import erase_user, is_erased
from workers.errors import BudgetExhausted, NotFound, PermanentError, TransientError
from workers.metrics import JOBS, SYNC_LAG
from workers.providers import provider_of_user
from workers.sync import PROGRESS, ItemIds, ItemRead, Progress, Syncer, SyncResult

log = get_logger("bridgehook.jobs")

Event = dict[str, Any]


class ItemBusy(Exception):
    """Another job held the item's lock for longer than we could wait; retry later."""


STEP_ASIDE_SECONDS = 1.0
STEP_ASIDE_MAX_SECONDS = 16.0


class ItemLocked(TransientError):
    """Another job holds the item's lock: a sync steps aside instead of holding its worker idle (the
    worker takes the next job, another item's), and runs again shortly, keeping its retries. A sync
    that was running then is likely to have served it by that time (see workers.watermark).

    ``backoff``: the lock was taken. Each step aside in a row waits twice as long as the one before,
    up to :data:`STEP_ASIDE_MAX_SECONDS`: the holder may have died with its lease (a worker killed,
    Redis restarted), which lapses only after ``ITEM_LOCK_SECONDS``. Stepping aside spends no retry
    and is no attempt, however long the lock stays taken: the lease bounds it."""

    def __init__(self, message: str, *, retry_after: float, backoff: bool = False) -> None:
        super().__init__(message, retry_after=retry_after)
        self.backoff = backoff


def _coalesce(ctx: WorkerContext, meta: dict[str, Any], scope: str) -> None:
    """Step aside (:class:`ItemLocked`) until ``SYNC_COALESCE_SECONDS`` after the event's receipt (twice
    that for an account's event). Bridge sends a refresh's ``item.refreshed`` and then an
    ``item.account.updated`` per account, milliseconds apart: a sync that begins before they are all
    in cannot serve the later ones (see workers.watermark), which then cost a sync each. Waiting lets
    the ``item.refreshed`` sync begin once they are in, and the account events, later still, find
    themselves served. An event replayed, or older than that (a backlog), runs at once."""
    received, delay = meta.get("received_at"), ctx.settings.sync_coalesce_seconds
    if not delay or not received or meta.get("replayed"):
        return
    wait = delay * (2 if scope == "account" else 1) - (time.time() - int(received) / 1000)
    if wait > 0:
        raise ItemLocked(f"waiting {wait:.1f}s for the refresh's other events", retry_after=wait)


def event_time(event: Event) -> datetime:
    """When Bridge sent the event (milliseconds since the epoch; seconds in TEST_EVENT)."""
    ts = int(event.get("timestamp") or 0)
    return datetime.fromtimestamp(ts / 1000 if ts > 100_000_000_000 else ts, tz=UTC)


@contextmanager
def item_lock(ctx: WorkerContext, item_id: int, *, wait: bool = True) -> Iterator[Callable[[], None]]:
    """Hold ``item_id``'s lock for the block: a lease renewed by a thread every third of it, so that
    a slow Bridge call cannot outlast it while the job is alive (and a killed job's lease lapses).
    The yielded heartbeat costs no round trip: it raises if a renewal found the lock lost, so the
    job stops before writing beside another holder."""
    lease = ctx.settings.item_lock_seconds
    lock = ctx.redis.lock(f"bridgehook:lock:item:{item_id}", timeout=lease, blocking_timeout=lease + 5,
                          thread_local=False)  # fmt: skip
    if not wait and not lock.acquire(blocking=False):
        raise ItemLocked(
            f"item {item_id} is locked by another job", retry_after=STEP_ASIDE_SECONDS, backoff=True
        )
    if wait and not lock.acquire():
        raise ItemBusy(f"item {item_id} stayed locked for {lease + 5}s")
    lost: list[Exception] = []
    done = threading.Event()

    def renew() -> None:
        while not done.wait(lease / 3):
            try:
                lock.reacquire()
            except (LockError, redis.RedisError) as exc:
                lost.append(exc)
                return

    def heartbeat() -> None:
        if lost:
            raise lost[0]

    renewer = threading.Thread(target=renew, name=f"lease-item-{item_id}", daemon=True)
    renewer.start()
    try:
        yield heartbeat
    finally:
        done.set()
        renewer.join()
        try:
            lock.release()
        except (LockError, redis.RedisError) as exc:  # the lease lapses by itself
            log.warning("job.lock_lost", item_id=item_id, error=str(exc))


def _run(
    event: Event,
    work: Callable[[WorkerContext, Syncer], SyncResult | dict[str, Any]],
    scope: str | None = None,
    *,
    locks_itself: bool = False,
) -> dict[str, Any]:
    """Run ``work`` for the event under its item's lock, with the ledger around it. ``scope``: what the
    work syncs, when it syncs from Bridge ("item" or "account"): an earlier sync of the whole item (or,
    for an account's event, of that account) may have served the event already (see
    workers.watermark), and the job's own sync serves the events of its scope received before it began.
    ``locks_itself``: the work takes the item locks it needs (a user's items), whatever item id the
    event carries: holding one here would make it wait for itself."""
    job = get_current_job()
    _restore_schedule(job)
    progress = _progress(job)
    progress_token = PROGRESS.set(progress)
    body = json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)
    event_id = job.id if job is not None else hashlib.sha256(body.encode()).hexdigest()
    content = event.get("content") or {}
    structlog.contextvars.bind_contextvars(job_id=event_id, event_type=event.get("type"),
                                           item_id=content.get("item_id"))  # fmt: skip
    ctx = current()
    provider = "powens" if event.get("provider") == "powens" else "bridge"
    meta = job.meta if job is not None else {}
    item_id = None if locks_itself else content.get("item_id")
    account = content.get("account_id") if scope == "account" else None
    account_id = None if account is None else int(account)
    seq = meta.get("received_seq") if scope is not None and item_id is not None else None
    through: watermark.Mark | None = None  # what this job's sync serves, once committed

    def is_served() -> bool:
        if seq is None or item_id is None:
            return False
        return watermark.served(ctx.redis, int(seq), int(item_id), account_id)

    try:
        # When the receiver took the event (its meta): a retry, a deferral or a step aside is queued
        # again, and RQ's enqueued_at is then that time, not the event's.
        if meta.get("received_at"):
            received = datetime.fromtimestamp(int(meta["received_at"]) / 1000, tz=UTC)
        else:
            received = job.enqueued_at if job is not None and job.enqueued_at else datetime.now(UTC)
        outcome: SyncResult | dict[str, Any]
        if is_served():  # nothing left to do: the ledger row goes in done, one synchronous commit
            ctx.ledger.started(event_id, event, body, received, done=True)
            outcome = {"skipped": "served"}
        else:
            finished = False
            try:
                with ExitStack() as held:
                    # Stepping aside (the refresh's other events not in yet, or the item locked by
                    # another sync: ItemLocked) comes before the ledger: it is not an attempt.
                    if scope is not None:
                        _coalesce(ctx, meta, scope)
                    lock = None if item_id is None else item_lock(ctx, int(item_id), wait=scope is None)
                    heartbeat = held.enter_context(lock) if lock is not None and scope is not None else None
                    # Asynchronous commit: Ledger.done or Ledger.failed, synchronous, end every run and
                    # flush it.
                    ctx.ledger.started(event_id, event, body, received, durable=False)
                    if lock is not None and heartbeat is None:  # not a sync: it waits for the lock
                        heartbeat = held.enter_context(lock)
                    if item_id is None:
                        outcome = work(ctx, ctx.syncer())
                    elif is_served():  # by the sync that held the lock when this job stepped aside
                        outcome = {"skipped": "served"}
                    else:
                        through = None if scope is None else watermark.received_so_far(ctx.redis)
                        outcome = work(ctx, ctx.syncer(heartbeat))
                        ctx.ledger.done(event_id)  # synchronous: the sync's rows are durable
                        finished = True
                        # Only now (the rows are durable), and before the lock goes: a job
                        # stepping aside for the lock finds the record as it takes it.
                        serves = isinstance(outcome, SyncResult) and outcome.serves_earlier_events
                        if serves and through is not None:
                            _record_watermark(ctx, through, int(item_id), account_id)
            except NotFound as exc:
                # Gone at Bridge: nothing left to fetch. Not an error, and not worth a retry.
                log.info("job.not_found", error=str(exc))
                outcome = {"skipped": "not_found"}
            except Exception as exc:
                if not finished:
                    _failed(ctx, job, event_id, exc, progress)
                    if not isinstance(exc, ItemLocked):  # stepping aside is no failure
                        JOBS.labels(provider, event.get("type"), "failed").inc()
                    raise
                # Done and durable already (a job timeout, Redis gone as the lock was released):
                # the ledger and RQ must not call it failed, nor run it again.
                log.warning("job.error_after_done", error=f"{type(exc).__name__}: {exc}")
            if not finished:
                ctx.ledger.done(event_id)
        summary = outcome.as_dict() if isinstance(outcome, SyncResult) else outcome
        JOBS.labels(
            provider, event.get("type"), "served" if summary.get("skipped") == "served" else "done"
        ).inc()
        if meta.get("received_at") and not meta.get("replayed"):
            SYNC_LAG.labels(provider).observe(max(0.0, time.time() - int(meta["received_at"]) / 1000))
        log.info("job.done", **summary)
        return summary
    finally:
        PROGRESS.reset(progress_token)
        structlog.contextvars.clear_contextvars()


def _record_watermark(
    ctx: WorkerContext, through: watermark.Mark, item_id: int, account_id: int | None
) -> None:
    try:
        watermark.record(ctx.redis, through, item_id, account_id)
    except redis.RedisError as exc:  # the sync is done; without the record later events sync again
        log.warning("job.watermark_not_recorded", error=str(exc))


_RETRY_INTERVALS = "retry_intervals"  # meta: the job's own schedule, while a deferral replaces it


def _schedule_after(job: Any, wait: float, *, free: bool) -> None:
    """Make RQ's retry of ``job`` (which follows this failure) wait at least ``wait`` seconds; with
    ``free``, without spending one of its retries. RQ takes the retry's interval from the job's
    schedule by the number of retries left: for this one retry the schedule is ``[wait]`` (the one
    it had is kept in the meta, and back at the job's next start)."""
    left = job.retries_left or 0
    if free:
        left += 1  # RQ's retry takes it back
    if not left:
        return
    intervals = list(job.retry_intervals or [0])
    due = intervals[max(len(intervals) - left, 0)] if not free else 0
    job.retries_left = left
    job.meta[_RETRY_INTERVALS] = job.retry_intervals
    job.retry_intervals = [max(math.ceil(wait), int(due), 1)]


def _restore_schedule(job: Any) -> None:
    """A job deferred by a budget runs with the retry schedule it had before (see _schedule_after)."""
    if job is not None and _RETRY_INTERVALS in job.meta:
        job.retry_intervals = job.meta.pop(_RETRY_INTERVALS)
        job.save_meta()


def _progress(job: Any) -> Progress:
    """What the job's earlier attempts did (see workers.sync.Progress); nothing yet for a first one."""
    meta = job.meta if job is not None else {}
    users = meta.get("user_items")
    return Progress(
        listed=set(meta.get("listed", ())),
        items=set(meta.get("items_done", ())),
        reads={int(item_id): ItemRead(**read) for item_id, read in (meta.get("reads") or {}).items()},
        user_items=ItemIds(**users) if users else None,
    )


def _kept(progress: Progress) -> dict[str, Any]:
    """``progress`` as the job's meta keeps it (JSON), for the next attempt's :func:`_progress`."""
    return {
        "listed": sorted(progress.listed),
        "items_done": sorted(progress.items),
        "reads": {str(item_id): asdict(read) for item_id, read in progress.reads.items()},
        "user_items": asdict(progress.user_items) if progress.user_items else None,
    }


# Attempts in a row that a spent budget stopped before they kept anything for the next (a page written
# with its listing's position, an account or item listed: see workers.sync.Progress): past this many
# the job spends its retries as for any other transient error (a loop that never moves forward ends in
# the dead letters instead of deferring for ever). Any such progress starts the count again.
MAX_IDLE_DEFERRALS = 20
_PROGRESS_KEYS = ("listed", "items_done", "reads", "user_items", "idle_deferrals")  # read by _progress


def _failed(
    ctx: WorkerContext, job: Any, event_id: str, exc: Exception, progress: Progress | None = None
) -> None:
    if isinstance(exc, PermanentError) and job is not None:
        job.retries_left = 0  # retrying a request Bridge calls wrong cannot help
    budget = isinstance(exc, BudgetExhausted | ItemLocked)
    if job is not None and progress is not None:  # what this attempt did, for the next one to go on from
        kept, before = _kept(progress), job.meta
        # Progress: a page kept, an account or item listed whole, a read first made (a read made
        # again once REUSE_READ has passed is not: else a job that only ever got that far would
        # never meet the loop guard).
        moved = (
            progress.pages > 0
            or kept["listed"] != before.get("listed", [])
            or kept["items_done"] != before.get("items_done", [])
            or bool(kept["reads"].keys() - (before.get("reads") or {}).keys())
            or (kept["user_items"] is not None and before.get("user_items") is None)
        )
        spent = isinstance(exc, BudgetExhausted)  # a budget that never frees would defer it forever
        idle = 0 if moved else int(job.meta.get("idle_deferrals", 0)) + spent
        job.meta.update(kept, idle_deferrals=idle)
        if isinstance(exc, ItemLocked) and exc.backoff:
            in_a_row = int(job.meta.get("stepped_aside", 0))
            exc.retry_after = min(STEP_ASIDE_SECONDS * 2**in_a_row, STEP_ASIDE_MAX_SECONDS)
            job.meta["stepped_aside"] = in_a_row + 1
        if spent and idle > MAX_IDLE_DEFERRALS:
            log.warning("job.deferred_without_progress", deferrals=idle)
            budget = False
    if job is not None and isinstance(exc, TransientError) and (budget or exc.retry_after):
        _schedule_after(job, exc.retry_after or 0.0, free=budget)
    final = job is None or not job.retries_left
    if final and job is not None:  # a dead letter replayed later starts afresh, as a new event would
        for key in _PROGRESS_KEYS:
            job.meta.pop(key, None)
    error = f"{type(exc).__name__}: {exc}"
    stepped_aside = isinstance(exc, ItemLocked)  # before the ledger's row: not an attempt
    if job is not None:
        if not stepped_aside:  # RQ keeps the last traceback; the history of attempts is ours to keep
            history = job.meta.setdefault("attempts", [])
            history.append({"at": datetime.now(UTC).isoformat(), "error": error[:500]})
            del history[:-20]
        job.save_meta()
    try:
        if not stepped_aside or final:
            ctx.ledger.failed(event_id, error, final=final)
    except Exception:  # the database may be what failed; the job's own error matters more
        log.exception("job.ledger_unavailable")
    if budget and not final:  # expected, and handled: the job waits for its budget
        log.info("job.deferred", error=error, retry_after=getattr(exc, "retry_after", None),
                 next_attempt=next_attempt(job))  # fmt: skip
        return
    if final:
        log.error("job.failed", error=error, final=final)
    else:  # RQ logs no traceback for an expected one (see workers.runner.EXPECTED): this line is all
        log.warning("job.failed", error=error, final=final, next_attempt=next_attempt(job))


def next_attempt(job: Any) -> str | None:
    """When RQ's retry of ``job`` (which follows this failure) will run: it waits the interval its
    schedule gives for the retries left (``Job.get_retry_interval``), counted from about now."""
    if job is None or not job.retries_left:
        return None
    return (datetime.now(UTC) + timedelta(seconds=job.get_retry_interval())).isoformat(timespec="seconds")


def item_created(event: Event) -> dict[str, Any]:
    c = event["content"]
    # A full sync: never skipped as served (its whole listing is what it is for), and it serves nothing.
    return _run(event, lambda ctx, s: s.sync_item(c["user_uuid"], c["item_id"], full=True))


def item_refreshed(event: Event) -> dict[str, Any]:
    c = event["content"]
    return _run(event, lambda ctx, s: s.sync_item(c["user_uuid"], c["item_id"], full=False), "item")


def _account(event: Event) -> dict[str, Any]:
    c = event["content"]
    return _run(
        event, lambda ctx, s: s.sync_account(c["user_uuid"], c["item_id"], c["account_id"]), "account"
    )


def account_created(event: Event) -> dict[str, Any]:
    return _account(event)


def account_updated(event: Event) -> dict[str, Any]:
    return _account(event)


def _mark(event: Event, mark: Callable[[WorkerContext, Any], None]) -> dict[str, Any]:
    def work(ctx: WorkerContext, syncer: Syncer) -> dict[str, Any]:
        with ctx.storage.transaction() as tx:
            mark(ctx, tx)
        return {"deleted_at": event_time(event).isoformat()}

    return _run(event, work)


def account_deleted(event: Event) -> dict[str, Any]:
    c, at = event["content"], event_time(event)
    return _mark(event, lambda ctx, tx: ctx.storage.mark_account_deleted(tx, c["account_id"], at))


def item_deleted(event: Event) -> dict[str, Any]:
    c, at = event["content"], event_time(event)
    return _mark(event, lambda ctx, tx: ctx.storage.mark_item_deleted(tx, c["item_id"], at))


def user_deleted(event: Event) -> dict[str, Any]:
    """The user first, with its items and accounts: a sync that writes its item after this marks it
    and stops (Syncer._write_item). Then each item we hold for the user again, under the item's
    lock: after the sync that holds it now, which began before and may have added accounts since."""
    return delete_user(event, event["content"]["user_uuid"])


def delete_user(event: Event, user_uuid: str) -> dict[str, Any]:
    """:func:`user_deleted` for either provider's user (workers.powens_jobs.user_deleted)."""
    at = event_time(event)

    def work(ctx: WorkerContext, _: Syncer) -> dict[str, Any]:
        lock = lambda item_id: item_lock(ctx, item_id)  # noqa: E731
        with ctx.storage.transaction() as tx:
            erased = is_erased(tx, user_uuid)
        if erased:  # the application deleted the user first (the API): no row of theirs, not even this
            erase_user(ctx.storage, user_uuid, None, at, lock)  # event's ledger row
            return {"skipped": "erased"}
        with ctx.storage.transaction() as tx:
            ctx.storage.mark_user_deleted(tx, user_uuid, at)
            tokens.forget(tx, user_uuid)  # a Powens user's: no use to anyone now
        tokens.unpublish(ctx.redis, user_uuid)  # nor to the receiver's bearer mode
        busy = []
        for item_id in ctx.storage.item_ids_of(user_uuid):
            try:
                with item_lock(ctx, item_id), ctx.storage.transaction() as tx:
                    ctx.storage.mark_item_deleted(tx, item_id, at)
            except ItemBusy:  # a long sync: the other items first, this one on the job's retry
                busy.append(item_id)
        if busy:
            raise ItemBusy(f"items {busy} stayed locked; the user is marked, these items will be again")
        if ctx.settings.deleted_user_retention_days == 0:  # no retention: erased at once
            erase_user(ctx.storage, user_uuid, None, at, lock)
            if provider_of_user(user_uuid) == "bridge":
                ctx.client.forget_token(user_uuid)
            return {"deleted_at": at.isoformat(), "erased": True}
        return {"deleted_at": at.isoformat()}

    return _run(event, work, locks_itself=True)


def connect_returned(event: Event) -> dict[str, Any]:
    """The end of Connect as the user's browser reported it (service.connect): hints, not facts.
    Recorded in ``connect_sessions`` for a live user we know (one the API created, or one webhooks
    told us of) and an item that is not another user's. Then, when ``success`` is true, the item is
    synced under its lock, as after ``item.refreshed`` (its sync serves, and is served by, the
    webhooks Bridge sends for the same Connect: workers.watermark), or in full for an item we do not
    hold yet, which Bridge itself vouches for: it answers the user's own token for the user's items
    only (a 404 otherwise, and nothing is written)."""
    c = event["content"]
    user_uuid, item_id = str(c["user_uuid"]), c.get("item_id")
    ctx = current()
    body = json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)
    with ctx.storage.transaction() as tx:
        user = tx.execute(
            "SELECT 1 FROM users WHERE uuid = %s AND deleted_at IS NULL", (user_uuid,)
        ).fetchone()
        owner = None if item_id is None else tx.execute(
            "SELECT user_uuid FROM items WHERE id = %s", (item_id,)
        ).fetchone()  # fmt: skip
        refused = None
        if user is None:
            refused = "unknown_user"
        elif owner is not None and owner[0] != user_uuid:
            refused = "not_the_users_item"
        if refused is None:
            tx.execute(
                "INSERT INTO connect_sessions (id, user_uuid, item_id, success, step, context, returned_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (hashlib.sha256(body.encode()).hexdigest(), user_uuid, item_id, bool(c["success"]),
                 c.get("step"), c.get("context"), event_time(event)),
            )  # fmt: skip
    if refused is not None or not c["success"] or item_id is None:
        outcome = {"skipped": refused} if refused else {"recorded": True}
        return _run(event, lambda ctx, s: outcome, locks_itself=True)
    return _run(event, lambda ctx, s: s.sync_item(user_uuid, int(item_id), full=owner is None), "item")


def resync_item(event: Event) -> dict[str, Any]:
    """A full resync of one item (cursors reset), enqueued by `bridgehook resync` or reconciliation."""
    c = event["content"]
    # As item_created: never skipped as served, and it serves nothing.
    return _run(event, lambda ctx, s: s.sync_item(c["user_uuid"], c["item_id"], resync=True))


def resync_user(event: Event) -> dict[str, Any]:
    """A full resync of every item Bridge lists for the user, one item lock at a time, but those
    `bridgehook resync --user` skipped (their bank is down: their sync would fail the job)."""
    user_uuid = event["content"]["user_uuid"]
    skip = {int(i) for i in event["content"].get("skip", ())}

    def work(ctx: WorkerContext, _: Syncer) -> dict[str, Any]:
        done = PROGRESS.get() or Progress()
        item_ids = done.user_item_ids()  # (listed by an earlier attempt of this job)
        if item_ids is None:
            item_ids = [int(item["id"]) for page in ctx.client.item_pages(user_uuid) for item in page]
            done.user_items = ItemIds(time.time(), item_ids)
        synced = [item_id for item_id in item_ids if item_id not in skip]
        for item_id in synced:
            if item_id not in done.items:  # (resynced by an earlier attempt of this job)
                with item_lock(ctx, item_id) as heartbeat:
                    ctx.syncer(heartbeat).sync_item(user_uuid, item_id, resync=True)
                done.items.add(item_id)
        return {"items": synced}

    return _run(event, work, locks_itself=True)


def reconcile(event: Event) -> dict[str, Any]:
    """The periodic sweep that catches what webhooks missed (see workers.reconcile)."""
    from workers.reconcile import Reconciler

    trigger = "manual" if "manual" in (event.get("content") or {}) else "scheduled"
    return _run(event, lambda ctx, _: Reconciler(ctx, trigger=trigger).run())
