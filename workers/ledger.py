"""The event ledger: one ``webhook_events`` row per event a job has run, with its body and outcome.

RQ forgets a job some time after it ends; the ledger keeps what ops need later: which events ran, how
many attempts each took, the last error, and the body (encrypted like bank data), from which
``bridgehook events replay --from ledger`` requeues events beyond the archive's retention. A job
writes its row as it starts (``queued``) and ends it ``done`` or ``failed``; ``bridgehook dlq purge``
marks it ``purged``.

The row that ends a job is a synchronous commit: it makes every asynchronous commit of the job's sync
durable with it (see :mod:`workers.db`), so a job reported done never loses its rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from workers.codec import Codec
from workers.db import Database, to_datetime
from workers.providers import subject

BODY = "webhook_events.body"  # the encrypted column (workers.codec.ENCRYPTED_COLUMNS)


class Entry(NamedTuple):
    """One event's row, its body decrypted (None: undecodable, left to the caller to say so)."""

    id: str
    received_at: datetime | None  # aware, UTC
    attempts: int
    last_error: str | None
    body: str | None


class Ledger:
    def __init__(self, db: Database, codec: Codec) -> None:
        self.db = db
        self.codec = codec

    def __repr__(self) -> str:
        return f"Ledger({self.db!r})"

    def started(
        self,
        event_id: str,
        event: Mapping[str, Any],
        body: str,
        received_at: datetime,
        *,
        durable: bool = True,
        done: bool = False,
    ) -> None:
        """A job begins (again: one more attempt). ``durable=False``: committed asynchronously, for a
        job whose row ends done or failed by a synchronous commit (which makes this one durable too).
        ``done``: the job had nothing left to do (a later sync served its event): the row goes in done
        at once."""
        about = subject(event)
        with self.db.transaction(durable=durable) as tx:
            tx.execute(
                "INSERT INTO webhook_events (id, type, item_id, user_uuid, provider, received_at, status, "
                "attempts, body, processed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, 1, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET attempts = webhook_events.attempts + 1, "
                "status = excluded.status, processed_at = "
                "COALESCE(excluded.processed_at, webhook_events.processed_at), last_error = CASE WHEN "
                "excluded.status = 'done' THEN NULL ELSE webhook_events.last_error END, "
                # A row that names no user where this attempt does: an earlier attempt could not open
                # the sealed body (workers.sealed). It takes this one's body, item and user, so that
                # a replay, the dead letters' filters and an erasure find it.
                "body = CASE WHEN webhook_events.user_uuid IS NULL AND excluded.user_uuid IS NOT NULL "
                "THEN excluded.body ELSE webhook_events.body END, "
                "item_id = COALESCE(webhook_events.item_id, excluded.item_id), "
                "user_uuid = COALESCE(webhook_events.user_uuid, excluded.user_uuid)",
                (
                    event_id,
                    event.get("type"),
                    about.item_id,
                    about.user_uuid,
                    about.provider,
                    received_at,
                    "done" if done else "queued",
                    self.codec.encode(body, BODY),
                    datetime.now(UTC) if done else None,
                ),
            )

    def done(self, event_id: str) -> None:
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE webhook_events SET status = 'done', processed_at = %s, last_error = NULL "
                "WHERE id = %s",
                (datetime.now(UTC), event_id),
            )

    def failed(self, event_id: str, error: str, *, final: bool) -> None:
        """An attempt failed: ``final``, the job is a dead letter; else it stays queued for its retry."""
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE webhook_events SET status = %s, last_error = %s WHERE id = %s",
                ("failed" if final else "queued", error[:2000], event_id),
            )

    def purged(
        self, event_id: str, event: Mapping[str, Any], body: str, attempts: int, received_at: datetime
    ) -> None:
        """A dead letter was purged: its row stays, marked so (written if the job never got to it)."""
        about = subject(event)
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO webhook_events (id, type, item_id, user_uuid, provider, received_at, status, "
                "attempts, body) VALUES (%s, %s, %s, %s, %s, %s, 'purged', %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET status = 'purged'",
                (event_id, event.get("type", "?"), about.item_id, about.user_uuid, about.provider,
                 received_at, attempts, self.codec.encode(body, BODY)),
            )  # fmt: skip

    # -- reads ---------------------------------------------------------------------------------

    def entries(self, event_ids: Sequence[str]) -> dict[str, Entry]:
        """The rows of these events (those the ledger holds), read 500 ids to a statement."""
        found: dict[str, Entry] = {}
        ids = list(event_ids)
        for start in range(0, len(ids), 500):
            some = ids[start : start + 500]
            sql = f"{_SELECT} WHERE id IN ({', '.join(['%s'] * len(some))})"
            with self.db.transaction() as tx:
                rows = tx.execute(sql, some).fetchall()
            found.update((entry.id, entry) for entry in map(self._entry, rows))
        return found

    def received(self, since: datetime, until: datetime | None = None) -> list[Entry]:
        """The rows of the events received in ``[since, until)``, oldest first."""
        sql, params = f"{_SELECT} WHERE received_at >= %s", [since]
        if until is not None:
            sql += " AND received_at < %s"
            params.append(until)
        with self.db.transaction() as tx:
            return [self._entry(row) for row in tx.execute(sql + " ORDER BY received_at", params).fetchall()]

    def _entry(self, row: tuple[Any, ...]) -> Entry:
        event_id, received_at, attempts, last_error, body = row
        when = to_datetime(received_at)
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return Entry(event_id, when, int(attempts), last_error, self.codec.decode(body, BODY))


_SELECT = "SELECT id, received_at, attempts, last_error, body FROM webhook_events"
