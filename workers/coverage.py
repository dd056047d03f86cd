"""Which events a sync has already covered, so that a burst of webhooks for one item costs one sync.

Bridge sends several events for one refresh (``item.refreshed``, then ``item.account.updated`` for
each account), and every sync fetches the item's current state, whichever event asked for it. The
receiver numbers each event it enqueues (``meta.received_seq``: one Redis counter, incremented in the
enqueueing script, :data:`service.queue.RECEIVED_SEQ_KEY`). A sync of a whole item reads the counter
before its first request to Bridge and, once its rows are durably committed, records that number for
the item. A later job for an event of that item whose number is not above the record was received
before that sync began, so the sync fetched at least the state the event announced: the job records
itself done without calling Bridge. A sync of one account does the same for that account's events.
Replays and resyncs carry no number: they always run.

Only Redis's own order is compared, never two machines' clocks. Redis, if it loses its last writes
(a crash between two fsyncs), loses them in order: a recorded number, read from the counter before
it was written, never exceeds the counter that comes back. A record lapses after a day; a job that
waited longer simply syncs.
"""

from __future__ import annotations

import redis

from service.queue import KEY_PREFIX, RECEIVED_SEQ_KEY

RECORD_PREFIX = f"{KEY_PREFIX}:synced-through:"
RECORD_TTL_SECONDS = 86_400

# Never move a record back: two syncs of one item may finish in either order.
_RECORD = """
if tonumber(redis.call("GET", KEYS[1]) or "0") < tonumber(ARGV[1]) then
  redis.call("SET", KEYS[1], ARGV[1], "EX", ARGV[2])
end
"""


def received_so_far(connection: redis.Redis) -> int:
    """The number of the last event received: read before a sync's first request to Bridge."""
    return int(connection.get(RECEIVED_SEQ_KEY) or 0)


def covered(connection: redis.Redis, received_seq: int, item_id: int, account_id: int | None = None) -> bool:
    """Whether a completed sync of the item (or of the account) began after the event numbered
    ``received_seq`` arrived."""
    keys = [_key(item_id, None)] + ([] if account_id is None else [_key(item_id, account_id)])
    return any(through is not None and received_seq <= int(through) for through in connection.mget(keys))


def record(connection: redis.Redis, through: int, item_id: int, account_id: int | None = None) -> None:
    """A sync of the whole item (or of one account), begun when the counter read ``through``, is
    committed."""
    script = connection.register_script(_RECORD)
    script(keys=[_key(item_id, account_id)], args=[through, RECORD_TTL_SECONDS])


def _key(item_id: int, account_id: int | None) -> str:
    return f"{RECORD_PREFIX}item:{item_id}" if account_id is None else f"{RECORD_PREFIX}account:{account_id}"
