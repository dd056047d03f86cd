"""Scenario 6: jobs that always fail end in the dead-letter registry; once fixed, a replay heals them.

Bridge answers 500 to every call about one item. Its jobs exhaust the Bridge client's attempts, then
RQ's retries (``WORKER_RETRY_INTERVALS``), and land in RQ's ``FailedJobRegistry`` with their event
intact and the history of their attempts, while the other item's job succeeds. Once Bridge is fixed,
the operator's command, ``bridgehook dlq replay``, run as a process, requeues them; a worker processes
them, the registry is empty and the tables equal the ground truth.
"""

from __future__ import annotations

import json

import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from fakebridge.world import World
from tests.faults.support import POSTGRESQL, Processes, Recorder, event_id, populate
from tests.harness import Harness

pytestmark = POSTGRESQL


def test_dead_letters_then_replay(
    harness: Harness, world: World, processes: Processes, recorder: Recorder, r: redis.Redis
) -> None:
    h = harness
    bank = populate(world, items=2, accounts=2, transactions=120)
    (good, _), (bad, bad_accounts) = bank.items.items()
    world.faults.fail_item(bad, status=500)
    doomed = [h.body(world.event_item_created(bad)), h.body(world.event_account(bad_accounts[0], "updated"))]
    for body in doomed:
        assert h.post(body) == "queued"
    assert h.send(world.event_item_created(good)) == "queued"

    first = processes.run("worker", "--burst", timeout=120)
    assert first.returncode == 0, first.output
    runs = len(h.settings.retry_intervals) + 1
    dead = {event_id(body): body for body in doomed}
    assert set(h.failed_ids()) == dead.keys()
    for job_id, body in dead.items():
        job = Job.fetch(job_id, connection=r, serializer=JSONSerializer)
        assert job.args == [json.loads(body)], "the dead letter lost its event"
        attempts = job.meta["attempts"]
        assert len(attempts) == runs and all("500 from Bridge" in a["error"] for a in attempts), attempts
        assert h.ledger()[job_id] == ("failed", runs)
    assert h.ledger()[h.acknowledged[-1]] == ("done", 1)

    world.faults.unfail_item(bad)
    replay = processes.run("dlq", "replay", "--all", "--yes", timeout=60)
    assert replay.returncode == 0, replay.output
    assert f"requeued {len(dead)}, missing 0" in replay.output
    second = processes.run("worker", "--burst", timeout=120)
    assert second.returncode == 0, second.output

    assert h.failed_ids() == []
    assert {job_id: h.ledger()[job_id] for job_id in dead} == dict.fromkeys(dead, ("done", runs + 1))
    recorder.note(f"{len(dead)} dead letters after {runs} runs each, replayed")
    recorder.settle(h, sent=len(h.acknowledged), acknowledged=h.acknowledged)
