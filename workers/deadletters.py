"""The dead-letter queue: RQ's failed-job registry, read together with ``webhook_events``.

RQ keeps each failed job (its event, every attempt's result and the last traceback) in
``FailedJobRegistry``; our ledger keeps when the event first arrived and how many attempts
it took. Replay is RQ's own ``requeue`` (atomic: out of the registry, onto the queue), so
an interrupted replay simply resumes: what was requeued is no longer a dead letter. A replayed job
gets its retry schedule again, as a new delivery would: replays follow an outage or a fix, and one
more blip of Bridge's should not send an event straight back. Purge removes the job but marks the
ledger row ``purged`` (inserting it from the job when the worker never wrote one), so
nothing is silently lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from service.events import normalise_type
from workers.db import to_datetime
from workers.ledger import Ledger
from workers.providers import Provider, subject
from workers.storage import Storage

# Keys whose values are bank data, by substring. Powens's own: a transaction's wordings and amount
# (``value``), an account's number (the end of its IBAN) and coming balance, a counterparty.
SENSITIVE = ("iban", "name", "description", "balance", "amount", "label", "owner", "holder",
             "wording", "number", "value", "coming", "counterparty", "sealed")  # fmt: skip


def redact(value: Any) -> Any:
    """The event with bank data (names, IBANs and account numbers, descriptions and wordings, amounts)
    replaced by ``***``."""
    if isinstance(value, dict):
        return {
            k: "***" if any(s in str(k).lower() for s in SENSITIVE) else redact(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def last_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


@dataclass
class DeadLetter:
    id: str
    job: Job | None
    event: dict[str, Any]
    received_at: datetime | None
    failed_at: datetime | None
    attempts: int
    error: str  # the last line of the last traceback

    @property
    def type(self) -> str:
        return normalise_type(str(self.event.get("type", "?")))

    @property
    def provider(self) -> Provider:
        return subject(self.event).provider

    @property
    def item_id(self) -> int | None:
        """The item's id (a Powens connection N is item -N: see workers.providers)."""
        item = subject(self.event).item_id
        return item if isinstance(item, int) else None

    @property
    def user_uuid(self) -> str | None:
        return subject(self.event).user_uuid

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "provider": self.provider,
            "type": self.type,
            "item_id": self.item_id,
            "received_at": self.received_at.isoformat() if self.received_at else None,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "attempts": self.attempts,
            "error": self.error,
        }


@dataclass(frozen=True)
class Filters:
    type: str | None = None
    item_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    error: str | None = None
    limit: int | None = None
    provider: str | None = None

    def match(self, d: DeadLetter) -> bool:
        when = d.received_at or d.failed_at
        return (
            (self.provider is None or d.provider == self.provider)
            and (self.type is None or d.type == normalise_type(self.type))
            and (self.item_id is None or d.item_id == self.item_id)
            and (self.since is None or (when is not None and when >= self.since))
            and (self.until is None or (when is not None and when < self.until))
            and (self.error is None or self.error.lower() in d.error.lower())
        )


class UnknownId(LookupError):
    pass


MIN_PREFIX = 8  # characters of an id that `dlq show`, `replay` and `purge` take for the whole id


class DeadLetters:
    def __init__(self, connection: redis.Redis, queue_name: str, storage: Storage | None) -> None:
        self.redis = connection
        self.queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
        self.registry = FailedJobRegistry(queue=self.queue)
        self.storage = storage

    def ids(self) -> list[str]:
        return list(self.registry.get_job_ids())

    def count(self) -> int:
        return int(self.registry.count)

    def load(self, ids: Sequence[str]) -> list[DeadLetter]:
        jobs = Job.fetch_many(ids, connection=self.redis, serializer=JSONSerializer)
        ledger = self._ledger(ids)
        letters = []
        for job_id, job in zip(ids, jobs, strict=True):
            row = ledger.get(job_id, {})
            event = _event_of(job) or row.get("event") or {}
            if "sealed" in event and row.get("event"):  # a sealed body: the worker's opened copy
                event = row["event"]
            error = last_line(traceback_of(job)) or last_line(row.get("last_error"))
            letters.append(
                DeadLetter(
                    id=job_id,
                    job=job,
                    event=event,
                    received_at=row.get("received_at") or (job.created_at if job else None),
                    failed_at=_aware(job.ended_at) if job is not None else None,
                    attempts=int(row.get("attempts") or 1),
                    error=error,
                )
            )
        letters.sort(key=lambda d: d.received_at or d.failed_at or datetime.min.replace(tzinfo=UTC))
        return letters

    def select(self, filters: Filters) -> list[DeadLetter]:
        chosen = [d for d in self.load(self.ids()) if filters.match(d)]
        return chosen[: filters.limit] if filters.limit else chosen

    def resolve(self, given: Iterable[str]) -> list[str]:
        """Full ids for ids or unique prefixes (MIN_PREFIX+ characters) of dead letters; UnknownId, saying
        what a prefix matches, otherwise."""
        known = self.ids()
        out = []
        for raw in given:
            exact = [i for i in known if i == raw]
            matches = exact or [i for i in known if raw and i.startswith(raw)]
            if len(matches) == 1 and (exact or len(raw) >= MIN_PREFIX):
                out.append(matches[0])
                continue
            # Saying "not in the queue" of a prefix that is there (issue #17) sends people looking
            # elsewhere: say what it does match, and what to give instead.
            if not matches:
                why = "is not in the dead-letter queue (`bridgehook dlq list` lists them)"
            elif len(raw) < MIN_PREFIX and len(matches) == 1:
                why = f"is too short: give {MIN_PREFIX} or more characters, e.g. {matches[0][:12]}"
            else:
                shown = ", ".join(i[:12] for i in sorted(matches)[:5])
                more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
                why = f"matches {len(matches)} dead letters ({shown}{more}): give more characters"
            raise UnknownId(f"{raw} {why}")
        return out

    def attempts(self, job: Job) -> list[dict[str, Any]]:
        """Every failed attempt, oldest first: when, and the error (the job records them in its meta)."""
        return [
            {"at": to_datetime(a.get("at")), "outcome": "failed", "error": str(a.get("error", ""))}
            for a in job.meta.get("attempts", [])
        ]

    def replay(
        self,
        ids: Sequence[str],
        *,
        rate: float | None = None,
        progress: Callable[[str, str], None] = lambda job_id, outcome: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, int]:
        """Requeue each id with RQ (at most ``rate`` per second), its retries back. Outcomes:
        requeued, missing."""
        outcomes = {"requeued": 0, "missing": 0}
        interval = 1.0 / rate if rate else 0.0
        for job_id in ids:
            started = time.monotonic()
            try:
                job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
                job.retries_left = len(job.retry_intervals or ())  # its retries back, as a new delivery's
                # RQ removes it from the registry first (else InvalidJobOperation, nothing written:
                # purged or replayed meanwhile), then saves it with its retries and queues it.
                self.registry.requeue(job)
                outcome = "requeued"
            except (InvalidJobOperation, NoSuchJobError):
                outcome = "missing"  # replayed or purged meanwhile, or its hash expired
            outcomes[outcome] += 1
            self.redis.hincrby("bridgehook:replays", outcome, 1)
            progress(job_id, outcome)
            wait = interval - (time.monotonic() - started)
            if wait > 0:
                sleep(wait)
        return outcomes

    def purge(self, letters: Sequence[DeadLetter]) -> int:
        """Remove from the registry; the ledger row stays, marked ``purged``."""
        ledger = None if self.storage is None else Ledger(self.storage.db, self.storage.codec)
        for d in letters:
            if ledger is not None:
                body = json.dumps(d.event, sort_keys=True)
                ledger.purged(d.id, d.event, body, d.attempts, d.received_at or datetime.now(UTC))
            self.registry.remove(d.id, delete_job=True)
        return len(letters)

    def _ledger(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if self.storage is None or not ids:
            return {}
        entries = Ledger(self.storage.db, self.storage.codec).entries(ids)
        return {
            event_id: {
                "received_at": entry.received_at, "attempts": entry.attempts,
                "last_error": entry.last_error, "event": _json(entry.body),
            }
            for event_id, entry in entries.items()
        }  # fmt: skip


def traceback_of(job: Job | None) -> str | None:
    """The last attempt's traceback, as RQ kept it."""
    result = job.latest_result() if job is not None else None
    return result.exc_string if result is not None else None


def _event_of(job: Job | None) -> dict[str, Any] | None:
    if job is None:
        return None
    try:
        args = job.args
    except Exception:  # an undecodable payload is still a dead letter to show
        return None
    return dict(args[0]) if args and isinstance(args[0], dict) else None


def _json(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
