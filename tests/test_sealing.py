"""Powens's bodies sealed before Redis (service/sealing.py): the scheme on its own, then the whole
pipeline (the real receiver, Redis, RQ workers, both databases, the fake Powens): Redis never holds
the bank data in clear, and every path that reads a body (the job, a replay from the archive, a dead
letter) opens it."""

from __future__ import annotations

import dataclasses
import zlib
from datetime import UTC, datetime, timedelta

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from service.sealing import Opener, Sealer, TamperedSeal, UnknownSealKey, generate_pair, public_of
from tests.powens_harness import PowensHarness
from tests.support import TEST_SEAL_PRIVATE_KEY, TEST_SEAL_PUBLIC_KEY
from tests.test_powens_sync import connected
from workers import context
from workers.deadletters import DeadLetters
from workers.errors import PermanentError
from workers.providers import powens_user, stored_id
from workers.replay import Enqueuer, from_ledger
from workers.sealed import opened
from workers.storage import Storage

BODY = b'{"connection": {"accounts": [{"iban": "FR7630006000011234567890189", "name": "Livret A"}]}}'


def test_a_body_opens_only_with_its_private_key_and_only_unaltered() -> None:
    sealed = Sealer(TEST_SEAL_PUBLIC_KEY).seal(BODY)
    assert sealed.startswith(b"bs1:") and b"FR76" not in sealed and b"Livret" not in sealed
    assert sealed != Sealer(TEST_SEAL_PUBLIC_KEY).seal(BODY)  # a fresh key pair and nonce each time
    assert Opener([TEST_SEAL_PRIVATE_KEY]).open(sealed) == BODY
    assert Opener([TEST_SEAL_PRIVATE_KEY]).open(sealed.decode()) == BODY
    other, _ = generate_pair()
    with pytest.raises(UnknownSealKey, match="does not hold"):
        Opener([other]).open(sealed)
    assert Opener([other, TEST_SEAL_PRIVATE_KEY]).open(sealed) == BODY  # rotation: any key listed
    flipped = sealed[:-6] + (b"A" if sealed[-6:-5] != b"A" else b"B") + sealed[-5:]
    with pytest.raises(TamperedSeal):
        Opener([TEST_SEAL_PRIVATE_KEY]).open(flipped)
    with pytest.raises(TamperedSeal):
        Opener([TEST_SEAL_PRIVATE_KEY]).open(b"not sealed")
    assert public_of(TEST_SEAL_PRIVATE_KEY) == TEST_SEAL_PUBLIC_KEY
    assert "gDlQ" not in repr(Opener([TEST_SEAL_PRIVATE_KEY]))  # no key in a repr
    big = b'{"rows": [%s]}' % b",".join(b'{"id": %d, "wording": "CB CARREFOUR"}' % n for n in range(20000))
    assert len(Sealer(TEST_SEAL_PUBLIC_KEY).seal(big)) < len(big) / 4  # compressed before it is sealed


def redis_values(r: redis.Redis) -> bytes:
    """Every value in the Redis database, job payloads inflated (RQ stores them compressed)."""
    out = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"hash":
            for field, value in r.hgetall(key).items():
                out.append(
                    zlib.decompress(value) if field == b"data" and key.startswith(b"rq:job:") else value
                )
        elif kind == b"stream":
            out += [v for _, fields in r.xrange(key) for v in fields.values()]
        elif kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"zset":
            out += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == b"set":
            out += list(r.smembers(key))
    return b"\n".join(out)


def bank_data(ph: PowensHarness, connection_id: int) -> list[bytes]:
    """What of the connection's bank data a body carries: IBANs, account names, wordings."""
    accounts = [a for a in ph.pworld.accounts.values() if a.id_connection == connection_id]
    found = [str(a.iban).encode() for a in accounts if a.iban] + [a.name.encode() for a in accounts]
    return found + [t.wording.encode() for t in ph.pworld.transactions.values() if t.id_account in {
        a.id for a in accounts}][:3]  # fmt: skip


def test_redis_never_holds_a_powens_body_in_clear(ph: PowensHarness) -> None:
    """A CONNECTION_SYNCED through the receiver: the job and the archive hold it sealed; the worker
    opens it and the rows land; a replay from the archive requeues it sealed again, and lands the same."""
    user = ph.user()
    cid = connected(ph, user)
    secrets = bank_data(ph, cid)
    assert len(secrets) >= 4
    assert ph.deliver("CONNECTION_SYNCED", ph.pworld.connection_synced(cid)) == "queued"
    held = redis_values(ph.r)
    assert b"bs1:" in held
    assert [s for s in secrets if s in held] == []
    ph.drain()
    assert ph.failed_ids() == []
    assert ph.powens_tables() == ph.powens_truth()

    enqueuer = Enqueuer(ph.r, ph.settings)
    replayed = [
        enqueuer.event(event_id, event, received)
        for event_id, event, received in enqueuer.archived(datetime.now(UTC) - timedelta(hours=1), None)
    ]
    assert replayed == ["queued"]
    assert [s for s in secrets if s in redis_values(ph.r)] == []
    ph.drain()
    assert ph.failed_ids() == []
    assert ph.powens_tables() == ph.powens_truth()


def test_a_worker_without_the_key_dead_letters_the_event_and_a_replay_with_it_lands(
    ph: PowensHarness,
) -> None:
    """A worker that cannot open a body fails the job for good at once (no retry can help), in the
    dead letters with its reason; once the key is there, `dlq replay` lands it. The dead letter's
    event reads as the ledger holds it, never the sealed string."""
    user = ph.user()
    cid = connected(ph, user)
    keyed = ph.settings
    ph.settings = dataclasses.replace(keyed, body_seal_private_keys=())
    context.configure(None)
    ph.deliver("CONNECTION_SYNCED", ph.pworld.connection_synced(cid))
    ph.drain()
    [dead] = ph.failed_ids()
    job = Job.fetch(dead, connection=ph.r, serializer=JSONSerializer)
    assert "no BODY_SEAL_PRIVATE_KEYS" in str(job.meta["attempts"][-1]["error"])
    assert len(job.meta["attempts"]) == 1  # never retried
    with pytest.raises(PermanentError):
        opened(job.args[0], None)

    ph.settings = keyed
    context.configure(None)
    DeadLetters(ph.r, ph.settings.queue_name, None).replay([dead])
    ph.drain()
    assert ph.failed_ids() == []
    assert ph.powens_tables() == ph.powens_truth()
    # The ledger's row now names what the opened body names (a replay, the filters, an erasure find it).
    assert ph.rows("SELECT item_id, user_uuid FROM webhook_events WHERE id = %s", (dead,)) == [
        (stored_id(cid), powens_user(user.id))
    ]


def test_a_replay_never_requeues_a_powens_body_in_clear_by_mistake(ph: PowensHarness) -> None:
    """A replay from the ledger (which holds bodies opened, encrypted in the database) by a command
    without the seal keys: refused with the variable to set, unless ALLOW_PLAINTEXT_STORAGE says so."""
    user = ph.user()
    cid = connected(ph, user)
    ph.deliver("CONNECTION_SYNCED", ph.pworld.connection_synced(cid))
    ph.drain()
    [(event_id, event, received)] = list(
        from_ledger(Storage(ph.db, ph.codec), datetime(2000, 1, 1, tzinfo=UTC), None)
    )
    assert "content" in event
    unkeyed = dataclasses.replace(ph.settings, body_seal_public_key=None, body_seal_private_keys=())
    with pytest.raises(UnknownSealKey, match="ALLOW_PLAINTEXT_STORAGE"):
        Enqueuer(ph.r, unkeyed).event(event_id, event, received)
    assert Enqueuer(ph.r, ph.settings).event(event_id, event, received) == "queued"
    job = Job.fetch(event_id, connection=ph.r, serializer=JSONSerializer)
    assert "content" not in job.args[0] and job.args[0]["sealed"].startswith("bs1:")
    ph.drain()
    assert ph.failed_ids() == []


def test_a_replay_of_bridges_events_opens_no_powens_body(ph: PowensHarness) -> None:
    """An archive holding a Bridge delivery and a sealed Powens one, read by a command without the
    seal keys: Bridge's events replay; Powens's, or both providers', say which variable to set."""
    user = ph.user()
    cid = connected(ph, user)
    ph.deliver("CONNECTION_SYNCED", ph.pworld.connection_synced(cid))
    bridge_user = ph.world.add_user()
    ph.send(ph.world.event_item_created(ph.world.add_item(bridge_user)))
    unkeyed = Enqueuer(
        ph.r, dataclasses.replace(ph.settings, body_seal_public_key=None, body_seal_private_keys=())
    )
    since = datetime.now(UTC) - timedelta(hours=1)
    assert [e["type"] for _, e, _ in unkeyed.archived(since, None, "bridge")] == ["item.created"]
    for provider in ("powens", None):
        with pytest.raises(UnknownSealKey, match="BODY_SEAL_PRIVATE_KEYS"):
            list(unkeyed.archived(since, None, provider))
    assert [e["type"] for _, e, _ in Enqueuer(ph.r, ph.settings).archived(since, None, "powens")] == [
        "CONNECTION_SYNCED"
    ]
