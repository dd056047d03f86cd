"""No secret and no bank data in any log line of a full run, errors included.

The receiver, a worker and the ops commands run as processes at ``LOG_LEVEL=debug`` (the most they
ever say), with the database password in ``DATABASE_URL`` (PostgreSQL's trust authentication ignores
it, so it is a real URL with a real password), through: accepted deliveries; rejected ones whose
bodies carry an IBAN (bad signature, bad JSON, too large, unknown type); a sync; an item whose every
Bridge call fails (tracebacks, retries, the dead-letter queue); an item whose page Bridge sends with
an invalid date beside bank data; and the ops commands that read the failures back
(``dlq list/show/replay``, ``status``, ``keys rotate --dry-run``). Everything they print is searched
for every secret (webhook and client secrets, the encryption key, the database password, each access
token the fake issued) and every IBAN, account name and description of the fake's world.
"""

from __future__ import annotations

import json
import re

import httpx

from fakebridge.world import World
from tests.faults.support import POSTGRESQL, Processes, populate, wait_until
from tests.harness import Harness
from tests.support import SECRET, TEST_ENCRYPTION_KEY, signed

pytestmark = POSTGRESQL
DB_PASSWORD = "Pg-pa55word-n0t-for-logs"


def with_password(url: str) -> str:
    return re.sub(r"^postgresql://(\w+)@", rf"postgresql://\1:{DB_PASSWORD}@", url)


def test_no_secret_or_bank_data_in_any_log(harness: Harness, world: World, processes: Processes) -> None:
    h = harness
    bank = populate(world, items=3, accounts=2, transactions=40)
    (good, good_accounts), (failing, _), (malformed, malformed_accounts) = bank.items.items()
    world.faults.fail_item(failing, status=500)
    transactions = world.snapshot()["transactions"].values()
    [bad_txn, *_] = [t for t in transactions if t["account_id"] in malformed_accounts]
    world.update_transaction(bad_txn["id"], date="31/12/2024")  # not ISO 8601: the page fails to parse

    db_url = with_password(h.settings.database_url)
    url = processes.receiver(LOG_LEVEL="debug")
    worker = processes.worker(LOG_LEVEL="debug", DATABASE_URL=db_url)
    iban = world.snapshot()["accounts"][good_accounts[0]]["iban"]
    with httpx.Client(timeout=10) as client:
        for item in (good, failing, malformed):
            body = h.body(world.event_item_created(item))
            assert client.post(url, **signed(body)).json()["status"] == "queued"
        leaky = json.dumps({"type": "item.created", "content": {"iban": iban, "name": "x"}}).encode()
        assert client.post(url, **signed(leaky, "wrong-secret-1234")).status_code == 401
        assert client.post(url, **signed(b'{"iban": "' + iban.encode() + b'"')).status_code == 400
        assert client.post(url, **signed(leaky + b" " * 70_000)).status_code == 413
        odd = json.dumps({"type": "item.weird", "content": {"iban": iban}, "timestamp": 1}).encode()
        assert client.post(url, **signed(odd)).status_code in (200, 422)
        h.post(h.body(world.event_account(good_accounts[1], "updated")))

    wait_until(lambda: len(h.failed_ids()) == 2, 90, "the failing and the malformed item in the DLQ")
    wait_until(lambda: ("done", 1) in h.ledger().values(), 30, "the good item synced")
    commands = [
        ("dlq", "list"),
        ("dlq", "show", h.failed_ids()[0]),
        ("status",),
        ("keys", "rotate", "--dry-run"),
        ("dlq", "replay", "--all", "--yes"),
    ]
    outputs = [processes.run(*command, LOG_LEVEL="debug", DATABASE_URL=db_url) for command in commands]
    assert all(o.returncode == 0 for o in outputs), [o.output for o in outputs]
    wait_until(lambda: len(h.failed_ids()) == 2, 90, "the replayed dead letters failing again")
    processes.stop(worker)
    logs = processes.all_output()

    # The run said what happened, errors included: the search below is over real content.
    said = ("job.done", "job.failed", "Traceback", "500 from Bridge", "webhook.rejected", "401", "413")
    assert [s for s in said if s not in logs] == []
    snap = world.snapshot()
    bank_values = {a[f] for a in snap["accounts"].values() for f in ("name", "iban") if a.get(f)}
    fields = ("clean_description", "provider_description")
    bank_values |= {t[f] for t in snap["transactions"].values() for f in fields if t.get(f)}
    secrets = {SECRET, world.client_secret, TEST_ENCRYPTION_KEY, DB_PASSWORD, *world.issued_tokens()}
    assert len(secrets) > 4, "the workers got access tokens"
    leaks = sorted(v for v in bank_values | secrets if len(v) >= 6 and v in logs)
    assert leaks == [], f"{len(leaks)} secret or bank values in the logs, e.g. {leaks[:3]}"
