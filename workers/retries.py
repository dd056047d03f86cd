"""Scheduled retries: jobs in RQ's ``ScheduledJobRegistry``, waiting for their next attempt.

A job that fails with retries left and a non-zero interval (``WORKER_RETRY_INTERVALS``, or a
``Retry-After`` from Bridge, or a spent request budget: see workers.jobs) is not lost and not a
dead letter yet: RQ scores it in the registry by the second its next attempt is due, and RQ's
scheduler (run by the workers) enqueues it then. Each is read the way a dead letter is
(:meth:`DeadLetters.load`: its event, ledger row, attempts), with what only a waiting job has:
when it runs again, how many retries it has left, and the last error its own history recorded
(RQ keeps a traceback only once a job has failed for good).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from workers.deadletters import DeadLetter, DeadLetters, last_line
from workers.storage import Storage


@dataclass
class ScheduledRetry:
    letter: DeadLetter  # the job and its event, read as a dead letter is
    next_attempt: datetime
    retries_left: int | None

    @property
    def attempt(self) -> int:
        """The number of the attempt to come (the ledger counts those made)."""
        return self.letter.attempts + 1

    def as_json(self) -> dict[str, Any]:
        return {
            **self.letter.as_json(),
            "user_uuid": self.letter.user_uuid,
            "next_attempt": self.next_attempt.isoformat(),
            "attempt": self.attempt,
            "retries_left": self.retries_left,
        }


class ScheduledRetries:
    def __init__(self, connection: redis.Redis, queue_name: str, storage: Storage | None) -> None:
        self.redis = connection
        queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
        self.registry = ScheduledJobRegistry(queue=queue)  # type: ignore[no-untyped-call]
        self.letters = DeadLetters(connection, queue_name, storage)

    def soonest(self) -> datetime | None:
        """When the first waiting job runs again, without reading any job."""
        first: list[tuple[bytes, float]] = self.redis.zrange(self.registry.key, 0, 0, withscores=True)  # type: ignore[assignment]
        return _utc(first[0][1]) if first else None

    def list(self, limit: int | None = None) -> list[ScheduledRetry]:
        """Every waiting job (or the first ``limit``), soonest first."""
        end = -1 if limit is None else limit - 1
        due: list[tuple[bytes, float]] = self.redis.zrange(self.registry.key, 0, end, withscores=True)  # type: ignore[assignment]
        when = {job_id.decode(): _utc(score) for job_id, score in due}
        retries = []
        for letter in self.letters.load(list(when)):
            history = self.letters.attempts(letter.job) if letter.job is not None else []
            if history:
                letter.error = last_line(history[-1]["error"]) or letter.error
            left = letter.job.retries_left if letter.job is not None else None
            retries.append(ScheduledRetry(letter, when[letter.id], left))
        retries.sort(key=lambda r: (r.next_attempt, r.letter.id))
        return retries


def _utc(score: float) -> datetime:
    return datetime.fromtimestamp(score, tz=UTC)
