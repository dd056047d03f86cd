"""Scenario 4: Bridge answers 500 to 30 % of calls and 429 (with Retry-After) to 20 %.

The sync completes all the same, and it costs no more requests than the retry policy allows: each
logical call (one token, one item, one account listing, one page of transactions…) is tried at most
``BRIDGE_MAX_ATTEMPTS`` times per run of the job, and the job runs at most once more per RQ retry.
The number of logical calls is measured, not assumed: an item of the same shape is synced first with no
fault, by the same kind of job. Each 429 is followed by a wait of at least its Retry-After.

The job gets as many RQ retries as production's schedule has (five; immediate here), so that it dead-
letters in under 1 % of fault sequences. The fake draws its faults from a seeded generator and one
worker makes the calls in a fixed order, so the run is reproducible: with this seed, as the calls are
made today, one fails four times in a row and the job needs an RQ retry (the summary shows the runs).
"""

from __future__ import annotations

from collections import Counter

from fakebridge.world import RequestRecord, World
from tests.faults.support import POSTGRESQL, Processes, Recorder, Sender
from tests.harness import Harness

pytestmark = POSTGRESQL

RETRY_AFTER = 1


def test_storm_of_500_and_429(
    harness: Harness, world: World, processes: Processes, recorder: Recorder
) -> None:
    h = harness
    url = processes.receiver(WORKER_RETRY_INTERVALS="0,0,0,0,0")
    sender = Sender()

    def item_like_the_others() -> int:
        item = world.add_item(world.add_user())
        for _ in range(2):
            world.add_transactions(world.add_account(item), 1100)  # 3 pages each
        return item

    calm, stormy = item_like_the_others(), item_like_the_others()

    def sync(item: int) -> list[RequestRecord]:
        world.reset_requests()
        assert sender.deliver(url, h.body(world.event_item_created(item))).outcome == "queued"
        finished = processes.run("worker", "--burst", timeout=120)
        assert finished.returncode == 0, finished.output
        with world.lock:
            return list(world.requests)

    logical_calls = len(sync(calm))
    world.faults.set_ratios(p500=0.3, p429=0.2, retry_after=RETRY_AFTER, seed=12)
    requests = sync(stormy)
    world.faults.clear()
    sender.close()

    statuses = Counter(r.status for r in requests)
    assert statuses[500] and statuses[429], f"the storm did not happen: {statuses}"
    status, job_runs = h.ledger()[sender.acknowledged[-1]]
    assert status == "done"
    assert h.failed_ids() == []
    bound = logical_calls * h.settings.bridge_max_attempts * job_runs
    assert logical_calls < len(requests) <= bound, (logical_calls, len(requests), job_runs)
    # The same logical calls as the calm sync, none tried more often than the policy allows.
    tries = Counter((r.method, r.path, r.query) for r in requests)
    assert len(tries) == logical_calls
    assert max(tries.values()) <= h.settings.bridge_max_attempts * job_runs, tries.most_common(3)
    # Retry-After is honoured: a call refused with 429 comes back no sooner than it said, unless that
    # was its last attempt (the job run then ends, and RQ's retry, immediate here, starts it over).
    streaks: Counter[tuple[str, str, str]] = Counter()
    waited = []
    for n, request in enumerate(requests):
        call = (request.method, request.path, request.query)
        streaks[call] = streaks[call] + 1 if request.status >= 400 else 0
        if request.status == 429 and streaks[call] < h.settings.bridge_max_attempts:
            again = next(r for r in requests[n + 1 :] if (r.method, r.path, r.query) == call)
            waited.append(again.time - request.time)
        streaks[call] %= h.settings.bridge_max_attempts
    assert waited and min(waited) >= RETRY_AFTER - 0.05, waited

    recorder.note(
        f"{len(requests)} requests (bound {bound}: {logical_calls} calls x "
        f"{h.settings.bridge_max_attempts} attempts x {job_runs} job runs); {dict(statuses)}"
    )
    recorder.settle(h, sent=len(sender.deliveries), acknowledged=sender.acknowledged)
