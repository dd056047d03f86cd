"""Powens's storm: a backlog of Powens events, and the fake Powens answering 5xx and 429 for a while.

Six connections of three users (one with an account awaiting consent, which the webhooks' bodies leave
out) and three CONNECTION_SYNCED each wait in the queue, delivered by a real receiver, when two real
workers start. The fake Powens first fails four times in a row (502, 503, 500, 503: every attempt of
the first call, the accounts of the first connection, made while one worker runs alone), then answers
500 to a quarter of the calls and 429 to another quarter: with ``Retry-After: 1`` for the first
``PHASE`` requests, without it (Powens documents none) for the next ``PHASE``; then the weather clears.

Afterwards nothing acknowledged is lost, no event is a dead letter (every failure was transient), and
the tables equal the fake's ground truth. A call refused by a bare 429 at its last attempt defers its
job by a minute (Powens's budgets' period, workers.attempts): such deferrals are made due once the
storm is over, as if the minute had passed (the summary's notes count them).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.faults.support import POSTGRESQL, Processes, Recorder, Sender, hurry_deferred, wait_until
from tests.powens_harness import PowensHarness
from tests.test_powens_sync import connected

pytestmark = POSTGRESQL

PHASE = 25  # requests served with Retry-After, then as many without
RETRY_AFTER = 1


def test_storm_of_5xx_and_429_over_a_powens_backlog(
    powens: PowensHarness, processes: Processes, recorder: Recorder
) -> None:
    h, world = powens, powens.pworld
    users = [h.user() for _ in range(3)]
    connections = [connected(h, user, accounts=2, transactions=300) for user in users for _ in range(2)]
    awaiting = world.add_account(connections[0], transactions=3)  # found at the bank: awaits consent

    events: list[tuple[str, dict[str, Any]]] = []
    events += [("CONNECTION_SYNCED", world.connection_synced(c)) for c in connections]
    for n in range(2):  # two more syncs each, finding a transaction; one updated, one deleted
        for c in connections:
            accounts = sorted(
                a.id for a in world.accounts.values() if a.id_connection == c and not a.disabled
            )
            live = sorted(
                t.id for t in world.transactions.values() if t.id_account in accounts and not t.deleted
            )
            world.update_transaction(live[n], value=world.transactions[live[n]].value + 1)
            world.delete_transaction(live[-1 - n])
            found = world.add_transaction(accounts[n], coming=n == 1)
            events.append(("CONNECTION_SYNCED", world.synced(c, new=[found.id])))

    url = processes.receiver(WORKER_RETRY_INTERVALS="0,0,0,0,0")
    sender = Sender()
    for event, body in events:
        assert sender.deliver_powens(url, event, body).outcome == "queued"

    for status in (502, 503, 500, 503):
        world.faults.fail_next(1, status)
    world.faults.set_ratios(p500=0.25, p429=0.25, retry_after=RETRY_AFTER, seed=21)

    def settled() -> bool:
        """Every acknowledged event done or a dead letter (a dead letter ends the storm's waits too)."""
        ledger = h.ledger()
        return all(ledger.get(e, ("",))[0] in ("done", "failed") for e in sender.acknowledged)

    def served(n: int) -> bool:
        return len(world.requests) >= n or settled()

    processes.worker()
    wait_until(lambda: served(4), 30, "the first call's four attempts")
    processes.worker()
    wait_until(lambda: served(PHASE), 60, f"{PHASE} requests with Retry-After")
    world.retry_after_header = False
    bare_from = len(world.requests)
    wait_until(lambda: served(bare_from + PHASE), 60, f"{PHASE} requests without it")
    world.faults.clear()
    world.retry_after_header = True
    bare_to = len(world.requests)

    hurried: set[str] = set()

    def hurried_and_settled() -> bool:
        hurried.update(hurry_deferred(h.r, h.settings.queue_name))
        return settled()

    wait_until(hurried_and_settled, 60, "every event processed", explain=lambda: str(h.ledger()))
    sender.close()
    statuses = Counter(r.status for r in world.requests[:bare_to])
    recorder.note(f"{len(world.requests)} requests, {dict(statuses)} in the storm; {len(hurried)} deferred")

    dead = h.rows("SELECT type, last_error FROM webhook_events WHERE status = 'failed'")
    assert h.failed_ids() == [] and dead == [], f"{len(dead)} dead letters, e.g. {dead[:2]}"
    bare = Counter(r.status for r in world.requests[bare_from:bare_to])
    assert {500, 502, 503, 429} <= statuses.keys(), f"the storm did not happen: {statuses}"
    assert bare[429], f"no 429 without Retry-After: {bare}"
    # The first run of the first event failed at its first call, the accounts' listing (the one-shot
    # faults), after it had written the accounts the body carries: its retry must still read the others.
    assert h.powens_tables()["accounts"].get(awaiting.id) == h.powens_truth()["accounts"][awaiting.id], (
        "the account awaiting consent, which the body leaves out, was never read"
    )
    recorder.settle(h, sent=len(sender.deliveries), acknowledged=sender.acknowledged)
