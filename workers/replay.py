"""Enqueue work without a new webhook: archived events again, and full resyncs.

Replays go through RQ's own enqueue with the same job options as the receiver
(:func:`service.job.build_job`), under the event's own id. An event whose job is
still queued, running or scheduled is left alone (``in_flight``), so a replay rerun after
an interruption does not duplicate work; jobs are idempotent anyway.

Sources: the receiver's archive stream (raw bodies, by receive time) or, beyond its
retention, the ``webhook_events`` ledger.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from functools import cached_property
from typing import Any

import redis
from rq import Queue
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from service import powens_events
from service.events import MalformedEvent, job_function, parse
from service.job import build_job
from service.queue import ARCHIVE_KEY
from service.sealing import Opener, Sealer, UnknownSealKey, is_sealed
from service.settings import Settings
from workers.ledger import Ledger
from workers.providers import native_id, powens_user_id, provider_of_id, provider_of_user
from workers.sealed import opener_of, sealed, sealer_of
from workers.storage import Storage

IN_FLIGHT = {b"queued", b"started", b"scheduled", b"deferred"}
RESYNC_ITEM = "workers.jobs.resync_item"
RESYNC_USER = "workers.jobs.resync_user"
RECONCILE = "workers.jobs.reconcile"
POWENS_RESYNC = "workers.powens_jobs.resync_connection"

# An event received earlier, read back to replay it: its id, the event, when it arrived (ms).
ReceivedEvent = tuple[str, dict[str, Any], int]


class Enqueuer:
    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.redis = connection
        self.settings = settings
        self.queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)

    @cached_property
    def _sealer(self) -> Sealer | None:
        """What seals a replayed Powens body (built once for a replay of many)."""
        return sealer_of(self.settings)

    def enqueue(
        self, job_id: str, function: str, event: dict[str, Any], *, received_at_ms: int | None = None
    ) -> str:
        """``queued``, or ``in_flight`` when a job with this id is still waiting or running."""
        status = self.redis.hget(Job.key_for(job_id), "status")
        if status in IN_FLIGHT or (isinstance(status, str) and status.encode() in IN_FLIGHT):
            return "in_flight"
        FailedJobRegistry(queue=self.queue).remove(job_id)  # it goes back through the queue instead
        job = build_job(self.redis, self.settings, job_id, function, event,
                        received_at_ms=received_at_ms, replayed=True)  # fmt: skip
        self.queue.enqueue_job(job)
        return "queued"

    def enqueue_once(self, job_id: str, function: str, event: dict[str, Any]) -> str:
        """``queued``, or ``duplicate`` when a job with this id exists in any state (waiting, running,
        done or failed): RQ's unique enqueue checks and writes in one Redis script, so callers racing
        for one id enqueue it once."""
        job = build_job(self.redis, self.settings, job_id, function, event, replayed=True)
        try:
            self.queue.enqueue_job(job, unique=True)
        except DuplicateJobError:
            return "duplicate"
        return "queued"

    def event(self, event_id: str, event: dict[str, Any], received_at_ms: int | None = None) -> str:
        """A received event again (a replay): a Powens body sealed again, as the receiver had it."""
        kind = str(event.get("type", ""))
        function = (
            powens_events.job_function(kind) if event.get("provider") == "powens" else job_function(kind)
        )
        if function is None:
            return "ignored"
        event = sealed(event, self._sealer, clear=self.settings.allow_plaintext_storage)
        return self.enqueue(event_id, function, event, received_at_ms=received_at_ms)

    def resync_item(self, item_id: int, user_uuid: str) -> str:
        if provider_of_id(item_id) == "powens":
            return self.powens_resync(item_id, user_uuid, f"resync-item-{item_id}", reset=True)
        return self.enqueue(f"resync-item-{item_id}", RESYNC_ITEM, _task("resync.item", item_id=item_id,
                                                                           user_uuid=user_uuid))  # fmt: skip

    def powens_resync(self, item_id: int, user_uuid: str, job_id: str, *, reset: bool) -> str:
        """A Powens connection as Powens lists it now (workers.powens_jobs.resync_connection)."""
        task = _task("resync.item", item_id=item_id, user_uuid=user_uuid, reset=reset,
                     id_connection=native_id(item_id), id_user=powens_user_id(user_uuid))  # fmt: skip
        return self.enqueue(job_id, POWENS_RESYNC, {**task, "provider": "powens"})

    def resync_user(self, user_uuid: str, skip: Iterable[int] = ()) -> str:
        """Every item Bridge lists for the user but those in ``skip`` (their bank is down, say)."""
        task = _task("resync.user", user_uuid=user_uuid, skip=sorted(skip))
        if provider_of_user(user_uuid) == "powens":
            task |= {
                "provider": "powens",
                "content": {**task["content"], "id_user": powens_user_id(user_uuid)},
            }
            return self.enqueue(f"resync-user-{user_uuid}", "workers.powens_jobs.resync_user", task)
        return self.enqueue(f"resync-user-{user_uuid}", RESYNC_USER, task)

    def sweep(self, tag: str) -> str:
        """A reconciliation sweep now, besides the scheduler's (``bridgehook reconcile``), whose trigger
        ``status`` reports as manual; ``tag`` names it (``reconcile-manual-<tag>``)."""
        event = {"type": "bridgehook.reconcile", "content": {"manual": tag}, "timestamp": 0}
        return self.enqueue(f"reconcile-manual-{tag}", RECONCILE, event)

    def user_gone(self, user_uuid: str) -> str:
        """The user's deletion, for a user the provider no longer knows (its webhook never reached us)."""
        at = int(time.time() * 1000)
        if provider_of_user(user_uuid) == "powens":
            content: dict[str, Any] = {"id": powens_user_id(user_uuid)}
            event = {"type": "USER_DELETED", "provider": "powens", "content": content, "timestamp": at}
            return self.enqueue(f"user-gone-{user_uuid}", "workers.powens_jobs.user_deleted", event)
        event = {"type": "user.deleted", "content": {"user_uuid": user_uuid}, "timestamp": at}
        return self.enqueue(f"user-gone-{user_uuid}", "workers.jobs.user_deleted", event)

    def delta(self, item_id: int, user_uuid: str, tag: str) -> str:
        """An incremental sync of the item, as if ``item.refreshed`` had arrived."""
        event = {"type": "item.refreshed", "content": {"item_id": item_id, "user_uuid": user_uuid},
                 "timestamp": int(time.time() * 1000)}  # fmt: skip
        return self.enqueue(f"reconcile-{item_id}-{tag}", "workers.jobs.item_refreshed", event)

    # -- sources ---------------------------------------------------------------------------------

    def archived(
        self, since: datetime, until: datetime | None, provider: str | None = None
    ) -> Iterator[ReceivedEvent]:
        """Signed deliveries the receiver archived between the two times, each event once, of one
        ``provider`` or both (a sealed body opened: SealError if it cannot be; a replay of Bridge's
        events never opens one)."""
        opener = opener_of(self.settings)
        powens = f"{powens_events.PROVIDER}-"
        start = f"{int(since.timestamp() * 1000)}-0"
        end = f"{int(until.timestamp() * 1000) - 1}-99999999" if until else "+"
        seen: set[str] = set()
        while True:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = self.redis.xrange(  # type: ignore[assignment]
                ARCHIVE_KEY, min=start, max=end, count=500
            )
            for _, fields in entries:
                event_id = fields[b"id"].decode()
                if provider is not None and event_id.startswith(powens) != (provider == "powens"):
                    continue
                if fields.get(b"decision") in (b"queued", b"duplicate") and event_id not in seen:
                    seen.add(event_id)
                    try:
                        event = _archived_event(event_id, fields, opener)
                    except MalformedEvent:
                        continue
                    yield event_id, event, int(fields[b"received_at"])
            if len(entries) < 500:
                return
            start = "(" + entries[-1][0].decode()


def _archived_event(event_id: str, fields: dict[bytes, bytes], opener: Opener | None) -> dict[str, Any]:
    """The event a job receives, from an archived delivery of either provider: a Powens body (opened,
    if the receiver sealed it) is put in the envelope the receiver made for it
    (service/powens_events.py), its type in the archive's."""
    if not event_id.startswith(f"{powens_events.PROVIDER}-"):
        return parse(fields[b"body"])
    name, body = fields[b"type"].decode(), fields[b"body"]
    if is_sealed(body):
        if opener is None:
            raise UnknownSealKey("the archive holds sealed Powens bodies: set BODY_SEAL_PRIVATE_KEYS")
        body = opener.open(body)
    return powens_events.envelope(name, powens_events.parse(name, body), int(fields[b"received_at"]))


def from_ledger(storage: Storage, since: datetime, until: datetime | None) -> Iterator[ReceivedEvent]:
    """The same, read from ``webhook_events`` (beyond the archive's retention)."""
    for entry in Ledger(storage.db, storage.codec).received(since, until):
        try:
            event = json.loads(entry.body or "")
        except ValueError:
            continue
        if isinstance(event, dict) and "content" in event:
            when = entry.received_at
            yield entry.id, event, int(when.timestamp() * 1000) if when else 0


def _task(kind: str, **content: Any) -> dict[str, Any]:
    return {"type": f"bridgehook.{kind}", "content": content, "timestamp": int(time.time() * 1000)}
