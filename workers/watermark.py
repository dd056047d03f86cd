"""Each item's watermark: the events a completed sync has served, so that a burst of webhooks for one
item costs one sync.

Bridge sends several events for one refresh (``item.refreshed``, then ``item.account.updated`` for
each account), and every sync fetches the item's current state, whichever event asked for it. The
receiver numbers each event it enqueues (``meta.received_seq``: one Redis counter, incremented in the
enqueueing script, :data:`service.queue.RECEIVED_SEQ_KEY`). A sync of a whole item reads the counter
before its first request to Bridge and, once its rows are durably committed and before it releases
the item's lock (:mod:`workers.jobs`), records that number for the item, so that a job that stepped
aside for that lock (workers.jobs.ItemLocked) finds it when it takes the lock. A later job for an
event of that item whose number is not above the record was received before that sync began, so
the sync fetched at least the state the event announced: the job records itself done without calling
Bridge. Only a sync that listed every account since its
cursor records (:attr:`workers.sync.SyncResult.serves_earlier_events`): a whole listing (a first or a
full sync) leaves deleted transactions out, so it cannot stand for the delta that would have shown
them. An
account without a cursor whose listing shows no transaction is the exception: it keeps no cursor, so
whichever sync lists it next lists it whole too. So is the first listing of an account of which no
transaction is stored (not in a full sync): there is nothing of it to delete, so it shows all a delta
would. A sync of one account does the same for that account's events.
Full syncs (``item.created``, resyncs) are never skipped and serve nothing; events replayed from the
archive or the ledger carry no number: they always run. A dead
letter requeued by ``dlq replay`` keeps its job and so its number: when a later sync served it, it
ends done (``served``) without a call, which is what it would have fetched.

Only Redis's own order is compared, never two machines' clocks. Redis, if it loses its last writes
(a crash between two fsyncs, a failover to a replica that lagged), loses them in order: reading the
number also writes a sentinel, and the record is written only if the sentinel is still there, so a
recorded number never exceeds the counter that came back. Should the counter itself be lost (evicted
against the "noeviction" requirement, deleted by hand), it starts again in a new epoch
(:data:`service.queue.RECEIVED_EPOCH_KEY`), and records of another epoch serve nothing. A record
lapses after a day; a job that waited longer simply syncs.
"""

from __future__ import annotations

import uuid
from typing import NamedTuple

import redis

from service.job import JOB_TIMEOUT_SECONDS
from service.queue import KEY_PREFIX, RECEIVED_EPOCH_KEY, RECEIVED_SEQ_KEY

RECORD_PREFIX = f"{KEY_PREFIX}:synced-through:"
SENTINEL_PREFIX = f"{KEY_PREFIX}:sync-mark:"
RECORD_TTL_SECONDS = 86_400

# The epoch and the number, and a sentinel written after every increment they count.
_READ = """
redis.call("SET", KEYS[3], "1", "EX", ARGV[1])
return {redis.call("GET", KEYS[1]) or "", redis.call("GET", KEYS[2]) or "0"}
"""

# A record is "<epoch>:<number>", written only while the mark's sentinel stands (else Redis lost what
# came after the read, perhaps increments it counted). Never moved back within an epoch (two syncs of
# one item may finish in either order); a mark of another epoch replaces it (and, if older, serves
# nothing).
_RECORD = """
if redis.call("DEL", KEYS[2]) == 0 then
  return 0
end
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


class Mark(NamedTuple):
    """Where the count of received events stood when a sync began (see :func:`received_so_far`)."""

    epoch: str
    through: int
    sentinel: str  # a key that exists as long as Redis has kept every write up to this read

    def __str__(self) -> str:
        return f"{self.epoch}:{self.through}"


def received_so_far(connection: redis.Redis) -> Mark:
    """The epoch and number of the last event received, read before a sync's first request to Bridge
    and recorded (:func:`record`) once the sync is committed."""
    sentinel = f"{SENTINEL_PREFIX}{uuid.uuid4().hex}"
    read = connection.register_script(_READ)
    epoch, seq = read(keys=[RECEIVED_EPOCH_KEY, RECEIVED_SEQ_KEY, sentinel], args=[JOB_TIMEOUT_SECONDS + 60])
    return Mark(_text(epoch), int(seq), sentinel)


def served(connection: redis.Redis, received_seq: int, item_id: int, account_id: int | None = None) -> bool:
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


def record(connection: redis.Redis, mark: Mark, item_id: int, account_id: int | None = None) -> bool:
    """A sync of the whole item (or of one account), begun at ``mark``, is committed. False when the
    record was refused (Redis lost the mark's sentinel) or an equal or later one stands."""
    script = connection.register_script(_RECORD)
    keys = [_key(item_id, account_id), mark.sentinel]
    return bool(script(keys=keys, args=[str(mark), RECORD_TTL_SECONDS]))


def _key(item_id: int, account_id: int | None) -> str:
    return f"{RECORD_PREFIX}item:{item_id}" if account_id is None else f"{RECORD_PREFIX}account:{account_id}"


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")
