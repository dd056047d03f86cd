"""Scenario 5: every event delivered three times, in shuffled order, to two receivers at once.

Bridge retries deliveries, and behind a load balancer two receiver processes see the copies at the
same time. The de-duplication in Redis is atomic across processes: each body is queued once and
answered "duplicate" twice, whichever receiver sees it. Two workers process the jobs concurrently and
out of order. The tables end identical to the ground truth, and, deletions and cursors included, to
the tables of a run where each event was delivered once, in order, to one receiver and one worker.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, defaultdict

import redis

from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from tests.faults.support import POSTGRESQL, Event, Processes, Recorder, Sender, populate, wait_until
from tests.harness import Harness, pg_schema, worker_settings

pytestmark = POSTGRESQL


def history(world: World) -> list[Event]:
    """What Bridge would have sent while three items lived their lives: creations, new and deleted
    transactions, a new account, refreshes, then an account, an item and a user deleted. One account
    shows no transaction, its only one deleted (a sync that lists it still serves what came before)."""
    bank = populate(world, items=3, accounts=2, transactions=80)
    (first, accounts), (second, _), (third, _) = bank.items.items()
    joint = world.add_account(first, name="Compte joint")
    events = [world.event_item_created(item) for item in bank.items]
    world.delete_transaction(world.add_transactions(joint, 1)[0])
    events.append(world.event_account(joint, "updated"))
    extra = world.add_account(first, name="Livret")
    world.add_transactions(extra, 15)
    events.append(world.event_account(extra, "created"))
    for account in accounts:
        world.add_transactions(account, 6)
        world.delete_transaction(world.add_transactions(account, 1)[0])
        events.append(world.event_account(account, "updated"))
    events.append(world.event_item_refreshed(first))
    events.append(world.event_account(extra, "deleted"))
    world.delete_account(extra)
    events.append(world.event_item_deleted(second))
    world.delete_item(second)
    owner = world.event_item_created(third)[1]["user_uuid"]
    events.append(world.event_user_deleted(owner))
    world.delete_user(owner)
    return events


def test_three_deliveries_shuffled_two_receivers(
    harness: Harness,
    world: World,
    fake: FakeBridgeServer,
    processes: Processes,
    recorder: Recorder,
    redis_url: str,
    r: redis.Redis,
) -> None:
    h = harness
    bodies = [h.body(event) for event in history(world)]
    receivers = [processes.receiver(), processes.receiver()]

    # Once, in order, through one receiver, into a schema of its own, by one worker.
    with pg_schema() as url:
        single = Harness(worker_settings(redis_url, url, fake.api_url, world), world, fake, r)
        try:
            once = Sender()
            for body in bodies:
                assert once.deliver(receivers[0], body).outcome == "queued"
            once.close()
            finished = processes.run("worker", "--burst", timeout=120, DATABASE_URL=url)
            assert finished.returncode == 0, finished.output
            assert single.tables() == single.truth()
            reference = single.every_row()
        finally:
            single.close()
    r.flushdb()  # forget the first run's de-duplication keys and jobs

    # Three times each, shuffled, from two senders to two receivers, two workers taking the jobs.
    workers = [processes.worker(), processes.worker()]
    deliveries = bodies * 3
    random.Random(5).shuffle(deliveries)
    sender = Sender()

    def send(share: list[bytes], seed: int) -> None:
        pick = random.Random(seed)
        for body in share:
            sender.deliver(pick.choice(receivers), body)

    threads = [threading.Thread(target=send, args=(deliveries[k::2], k), daemon=True) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a sender is stuck"
    sender.close()

    outcomes: dict[str, Counter[str | None]] = defaultdict(Counter)
    for delivery in sender.deliveries:
        outcomes[delivery.event_id][delivery.outcome] += 1
    assert all(c == Counter(queued=1, duplicate=2) for c in outcomes.values()), outcomes

    def all_done() -> bool:
        return {e for e, (status, _) in h.ledger().items() if status == "done"} >= outcomes.keys()

    wait_until(all_done, 90, "the workers to process every event", 0.2)
    for worker in workers:
        processes.stop(worker)
    assert h.ledger() == dict.fromkeys(outcomes, ("done", 1)), "a job ran twice, or failed once"
    assert h.failed_ids() == []
    assert h.every_row() == reference, "three shuffled deliveries left other rows than one in order"
    recorder.settle(h, sent=len(deliveries), acknowledged=sender.acknowledged)
