"""No secret and no bank data in any log line of a full run, errors included.

The receiver, a worker and the ops commands run as processes at ``LOG_LEVEL=debug`` (the most they
ever say), with the database password in ``DATABASE_URL`` (PostgreSQL's trust authentication ignores
it, so it is a real URL with a real password), through: accepted deliveries; rejected ones whose
bodies carry an IBAN (bad signature, bad JSON, too large, unknown type); a sync; an item whose every
Bridge call fails (tracebacks, retries, the dead-letter queue); an item whose page Bridge sends with
an invalid date beside bank data; and the ops commands that read the failures back
(``dlq list/show/replay``, ``status``, ``keys rotate --dry-run``). Everything they print is searched
for every secret (webhook and client secrets, the encryption key, the database password, each access
token the fake issued) and every IBAN, account name and description of the fake's world. Powens's
twin does the same with Powens's events, its users' tokens and its secrets.
"""

from __future__ import annotations

import json
import re
import time

import httpx

from fakebridge.world import World
from service.powens import signature_date
from tests.faults.support import POSTGRESQL, WEBHOOK_PATH, Processes, Sender, populate, wait_until
from tests.harness import Harness
from tests.powens_harness import PowensHarness
from tests.support import POWENS_SECRET, SECRET, TEST_ENCRYPTION_KEY, powens_signed, powens_url, signed
from tests.test_powens_sync import connected

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
    read_back_failures(h, processes, db_url)
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
    assert_none_in(logs, bank_values | secrets)


def test_no_powens_token_secret_or_bank_data_in_any_log(powens: PowensHarness, processes: Processes) -> None:
    """Powens's twin: CONNECTION_SYNCED bodies full of IBANs, account names and transaction wordings,
    through a receiver and a worker at debug, with: a sync listed; a user whose token Powens refuses;
    a user without a token (a dead letter, whose body carries bank data); a sync whose every call fails
    (retries, then a dead letter); refused deliveries carrying an IBAN (a bad signature, an old one, bad
    JSON, a missing id, too large) and an event type we only archive; then the ops commands. Searched
    for: every value of the bodies' accounts and transactions, every user's token, the webhook and
    client secrets, the encryption key and the database password."""
    h, world = powens, powens.pworld
    good, refused, tokenless = h.user(), h.user(), h.user(token=False)
    synced, refusing, orphan = (connected(h, user, transactions=20) for user in (good, refused, tokenless))
    for account in world.accounts.values():  # names no log line could hold by chance
        account.name = f"Compte joint Mme Lefebvre {account.id}"
    for t in world.transactions.values():
        t.wording = f"PRLV SEPA MUTUELLE {t.id} REF {t.id * 7}"
    old_token, refused.token = refused.token, "revoked-" + refused.token  # Powens no longer knows ours
    bodies = [world.connection_synced(c) for c in (synced, refusing, orphan)]

    db_url = with_password(h.settings.database_url)
    url = processes.receiver(LOG_LEVEL="debug", POWENS_WEBHOOK_MAX_BODY_BYTES="200000")
    worker = processes.worker(LOG_LEVEL="debug", DATABASE_URL=db_url)
    sender = Sender(patience=10)
    for body in bodies:
        assert sender.deliver_powens(url, "CONNECTION_SYNCED", body).outcome == "queued"
    iban = next(iter(world.accounts.values())).iban
    leaky = json.dumps({"id": 1, "id_connection": 1, "iban": iban, "name": "x"}).encode()
    base, event = url.removesuffix(WEBHOOK_PATH), "ACCOUNT_ENABLED"
    long_ago = signature_date(time.time() - 3600)
    incomplete = json.dumps({"user": {"id": good.id}, "connection": {"iban": iban}}).encode()
    with httpx.Client(base_url=base, timeout=10) as client:
        for path, kwargs, status in [
            (event, powens_signed(event, leaky, "wrong-secret-1234"), 401),
            (event, powens_signed(event, leaky, date=long_ago), 401),
            (event, powens_signed(event, b'{"iban": "' + iban.encode() + b'"'), 400),
            ("CONNECTION_SYNCED", powens_signed("CONNECTION_SYNCED", incomplete), 400),
            (event, powens_signed(event, leaky + b" " * 200_000), 413),
            ("ACCOUNTS_FETCHED", powens_signed("ACCOUNTS_FETCHED", leaky), 200),
        ]:
            assert client.post(powens_url(path), **kwargs).status_code == status, path

    def ended(n: int) -> bool:
        return sum(status in ("done", "failed") for status, _ in h.ledger().values()) >= n

    wait_until(lambda: ended(3), 60, "the three syncs ended")
    errors = dict(h.rows("SELECT id, coalesce(last_error, status) FROM webhook_events"))
    outcomes = [errors[d.event_id].split(" is stored")[0] for d in sender.deliveries]
    # The refused token's ends done, as not found: Powens refuses the token of a user it deleted.
    assert outcomes == ["done", "done", "MissingToken: no token"], errors
    world.faults.fail_next(4 * (1 + len(h.settings.retry_intervals)), 503)  # every attempt of every run
    account = next(a.id for a in world.accounts.values() if a.id_connection == synced)
    found = world.add_transaction(account)
    found.wording = "VIR INST M DUPONT LOYER DECEMBRE"
    failing = sender.deliver_powens(url, "CONNECTION_SYNCED", world.synced(synced, [found.id])).event_id
    wait_until(lambda: ended(4), 60, "the failing sync a dead letter")
    read_back_failures(h, processes, db_url)  # the failing sync's replay succeeds, the orphan's fails
    wait_until(lambda: h.ledger()[failing][0] == "done", 30, "the replayed sync done")
    wait_until(lambda: len(h.failed_ids()) == 1, 30, "the orphan's replay a dead letter again")
    processes.stop(worker)
    sender.close()
    logs = processes.all_output()

    said = ("job.done", "job.failed", "powens.listed", "503 from Powens", "no token", "Powens refuses",
            "webhook.rejected", "invalid_signature", "signature_date_out_of_window", "413")  # fmt: skip
    assert [s for s in said if s not in logs] == []
    fields = ("name", "original_name", "iban", "number", "original_wording", "simplified_wording", "wording")
    rendered = [world.render_account(a) for a in world.accounts.values()]
    rendered += [world.render_transaction(t) for t in world.transactions.values()]
    bank_values = {str(row[f]) for row in rendered for f in fields if row.get(f)}
    tokens = {user.token for user in (good, refused, tokenless)} | {old_token}
    secrets = {POWENS_SECRET, world.client_secret, TEST_ENCRYPTION_KEY, DB_PASSWORD, *tokens}
    assert_none_in(logs, bank_values | secrets)


def read_back_failures(h: Harness, processes: Processes, db_url: str) -> None:
    """The ops commands that read the dead letters back, at debug, and the replay of them all."""
    commands = [
        ("dlq", "list"),
        ("dlq", "show", h.failed_ids()[0]),
        ("status",),
        ("keys", "rotate", "--dry-run"),
        ("dlq", "replay", "--all", "--yes"),
    ]
    outputs = [processes.run(*command, LOG_LEVEL="debug", DATABASE_URL=db_url) for command in commands]
    assert all(o.returncode == 0 for o in outputs), [o.output for o in outputs]


def assert_none_in(logs: str, values: set[str]) -> None:
    """None of ``values`` (those long enough not to occur by chance) anywhere in ``logs``."""
    leaks = sorted(v for v in values if len(v) >= 6 and v in logs)
    assert leaks == [], f"{len(leaks)} secret or bank values in the logs, e.g. {leaks[:3]}"
