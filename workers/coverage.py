"""Which events a sync has already covered, so that a burst of webhooks for one item costs one sync.

Bridge sends several events for one refresh (``item.refreshed``, then ``item.account.updated`` for
each account), and every sync fetches the item's current state, whichever event asked for it. The
receiver numbers each event it enqueues (``meta.received_seq``: one Redis counter, incremented in the
enqueueing script, :data:`service.queue.RECEIVED_SEQ_KEY`). A sync of a whole item reads the counter
before its first request to Bridge and, once its rows are durably committed, records that number for
the item. A later job for an event of that item whose number is not above the record was received
before that sync began, so the sync fetched at least the state the event announced: the job records
itself done without calling Bridge. Only a sync that listed every account since its cursor records
(:attr:`workers.sync.SyncResult.covers_earlier_events`): a whole listing (a first or a full sync)
leaves deleted transactions out, so it cannot stand for the delta that would have shown them.
A sync of one account does the same for that account's events.
Events replayed from the archive or the ledger, and resyncs, carry no number: they always run. A dead
letter requeued by ``dlq replay`` keeps its job and so its number: when a later sync covered it, it
ends done (``covered``) without a call, which is what it would have fetched.

Only Redis's own order is compared, never two machines' clocks. Redis, if it loses its last writes
(a crash between two fsyncs), loses them in order: a recorded number, read from the counter before
it was written, never exceeds the counter that comes back. Should the counter itself be lost (evicted
against the "noeviction" requirement, deleted by hand), it starts again in a new epoch
(:data:`service.queue.RECEIVED_EPOCH_KEY`), and records of another epoch cover nothing. A record
lapses after a day; a job that waited longer simply syncs.
"""

from __future__ import annotations

import redis

from service.queue import KEY_PREFIX, RECEIVED_EPOCH_KEY, RECEIVED_SEQ_KEY

RECORD_PREFIX = f"{KEY_PREFIX}:synced-through:"
RECORD_TTL_SECONDS = 86_400

# A record is "<epoch>:<number>". Never move one back within an epoch (two syncs of one item may
# finish in either order); a mark of another epoch replaces it (and, if older, covers nothing).
_RECORD = """
local epoch, n = string.match(ARGV[1], "^(.*):(%d+)$")
local current = redis.call("GET", KEYS[1])
if current then
  local e, m = string.match(current, "^(.*):(%d+)$")
  if e == epoch and tonumber(m) >= tonumber(n) then
    return 0
  end
end
redis.call("SET", KEYS[1], ARGV[1], "EX", ARGV[2])
return 1
"""


def received_so_far(connection: redis.Redis) -> str:
    """A mark of the last event received (its epoch and number): read before a sync's first request
    to Bridge, recorded once the sync is committed."""
    epoch, seq = connection.mget([RECEIVED_EPOCH_KEY, RECEIVED_SEQ_KEY])
    return f"{_text(epoch)}:{int(seq or 0)}"


def covered(connection: redis.Redis, received_seq: int, item_id: int, account_id: int | None = None) -> bool:
    """Whether a completed sync of the item (or of the account) began after the event numbered
    ``received_seq`` arrived."""
    keys = [RECEIVED_EPOCH_KEY, _key(item_id, None)]
    if account_id is not None:
        keys.append(_key(item_id, account_id))
    epoch, *records = connection.mget(keys)
    for record in records:
        if record is not None:
            recorded_epoch, _, through = _text(record).rpartition(":")
            if recorded_epoch == _text(epoch) and received_seq <= int(through):
                return True
    return False


def record(connection: redis.Redis, mark: str, item_id: int, account_id: int | None = None) -> None:
    """A sync of the whole item (or of one account), begun at ``mark`` (:func:`received_so_far`), is
    committed."""
    script = connection.register_script(_RECORD)
    script(keys=[_key(item_id, account_id)], args=[mark, RECORD_TTL_SECONDS])


def _key(item_id: int, account_id: int | None) -> str:
    return f"{RECORD_PREFIX}item:{item_id}" if account_id is None else f"{RECORD_PREFIX}account:{account_id}"


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")
