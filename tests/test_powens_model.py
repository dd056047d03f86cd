"""The promise for Powens, as a model-based test: whatever the order, repetitions or gaps of Powens's
webhooks, our tables end equal to what Powens holds (tests/test_model.py is Bridge's).

A hypothesis ``RuleBasedStateMachine`` drives the fake Powens (served over HTTP) and the REAL pipeline
(signed POST → receiver → Redis → RQ worker → SQLite or PostgreSQL) through random timelines:

- rules that change Powens, each producing the webhooks Powens would send for it, bodies made then:
  a sync that finds new transactions, updates or deletes some, books a coming one; an account found
  (awaiting consent), consent given or withdrawn; a connection's state (SCA, wrong password, bank
  down, a state Powens adds later, back to OK); a connection or a user deleted; a new connection;
- rules that deliver: a pending webhook (any: out of order) once or several times, a delivered one
  again, or dropped for good (a gap; any event, the first sync's included); drain; resync a
  connection; a reconciliation sweep; replay the dead letters;
- ``settle`` (a rule, and again at the end of every timeline): what is in flight arrives, the queue
  drains, one sweep runs and its jobs drain; then the tables must equal Powens's state, and no dead
  letter may have failed for a transient reason.

``BRIDGEHOOK_POWENS_MODEL_EXAMPLES`` timelines per database (20 unless set) of
``BRIDGEHOOK_MODEL_STEPS`` steps (25); ``BRIDGEHOOK_MODEL_SEED`` reruns the very same timelines.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
)

from fakebridge.powens import FakePowensServer
from fakebridge.powens_world import PowensWorld
from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from tests.harness import worker_settings
from tests.powens_harness import PowensHarness, powens_environ
from tests.test_model import Env, Scratch, drain, end_timeline, run_timelines, settle_and_compare, wrap_rules
from workers.codec import codec_from_settings
from workers.deadletters import DeadLetters
from workers.providers import powens_user, stored_id
from workers.replay import Enqueuer
from workers.storage import Storage

EXAMPLES = int(os.environ.get("BRIDGEHOOK_POWENS_MODEL_EXAMPLES") or 20)
# Half the time a connection's state goes back to OK (null): the other rules change usable ones only.
STATES = [None, None, None, None, "SCARequired", "wrongpass", "websiteUnavailable", "actionNeeded", "bug2"]
CONSENT = st.sampled_from([True, True, True, False])  # an account the user consented to, mostly
Rows = dict[str, dict[Any, Any]]


@dataclass
class Pending:
    """A webhook Powens has to deliver: its event and its body, made when Powens changed."""

    label: str
    event: str
    body: dict[str, Any]


class PowensModel(RuleBasedStateMachine):
    def __init__(self, env: Env) -> None:
        super().__init__()
        self.pworld = PowensWorld(seed=5)
        self.powens = FakePowensServer(self.pworld)
        self.powens.start()
        self.world = World(seed=7)  # Bridge's, idle: the harness's receiver serves both providers
        self.fake = FakeBridgeServer(self.world)
        self.fake.start()
        self.scratch = Scratch(env)
        self.r, url = self.scratch.r, self.scratch.url
        env_vars = powens_environ(self.powens, self.pworld) | {"BRIDGE_BUDGET_MAX_WAIT_SECONDS": "0"}
        s = worker_settings(env.redis_url, url, self.fake.api_url, self.world, **env_vars)
        self.h = PowensHarness(s, self.world, self.fake, self.r, self.powens)
        self.enqueuer = Enqueuer(self.r, s)
        self.storage = Storage(self.h.db, codec_from_settings(s))
        self.pending: list[Pending] = []
        self.delivered: list[Pending] = []
        self.sweeps = 0
        self.healthy = True

    # -- plumbing ------------------------------------------------------------------------------------
    def teardown(self) -> None:
        end_timeline(self, self.h.close, self.powens.stop, self.fake.stop, self.scratch.close)

    def _queue(self, event: str, body: dict[str, Any], what: str) -> None:
        self.pending.append(Pending(f"{event} {what}", event, copy.deepcopy(body)))  # amounts as numbers

    def _queue_account(self, event: str, account: Any) -> None:
        """An account's event (ACCOUNT_FOUND, _ENABLED, _DISABLED), its body as Powens renders the account."""
        self._queue(event, self.pworld.webhook(self.pworld.render_account(account)), str(account.id))

    def _post(self, pending: Pending, times: int = 1) -> None:
        for _ in range(times):
            status = self.h.deliver(pending.event, pending.body)
            note(f"  deliver {pending.label}: {status}")
        self.delivered.append(pending)

    def _connections(self, *, usable: bool | None = None) -> list[int]:
        return sorted(
            c.id for c in self.pworld.connections.values() if usable is None or (c.state is None) == usable
        )

    def _accounts(self, *, enabled: bool) -> list[int]:
        usable = set(self._connections(usable=True))
        return sorted(
            a.id
            for a in self.pworld.accounts.values()
            if a.id_connection in usable and a.deleted is None and (a.disabled is None) == enabled
        )

    def _transactions(self, *, coming: bool | None = None) -> list[int]:
        enabled = set(self._accounts(enabled=True))
        return sorted(
            t.id
            for t in self.pworld.transactions.values()
            if t.id_account in enabled and t.deleted is None and (coming is None or t.coming == coming)
        )

    def _synced(self, connection_id: int, new: list[int], what: str) -> None:
        self._queue("CONNECTION_SYNCED", self.pworld.synced(connection_id, new), f"{connection_id} {what}")

    def _connection_of(self, account_id: int) -> int:
        return self.pworld.accounts[account_id].id_connection

    def _new_connection(self, user_id: int, accounts: list[tuple[int, bool]]) -> None:
        connection = self.pworld.add_connection(user_id, accounts=0)
        for transactions, consent in accounts:  # (Powens reads no transaction without consent)
            account = self.pworld.add_account(connection.id, transactions if consent else 0)
            self._queue_account("ACCOUNT_FOUND", account)
            if consent:
                self.pworld.enable_account(account.id)
        self._synced(connection.id, [], f"(new, {len(accounts)} accounts)")

    # -- Powens changes --------------------------------------------------------------------------------
    @initialize(
        layout=st.lists(
            st.lists(
                st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=1, max_size=3), max_size=2
            ),
            min_size=1,
            max_size=2,
        )
    )
    def create_world(self, layout: list[list[list[tuple[int, bool]]]]) -> None:
        for connections in layout:
            user = self.h.user()
            for accounts in connections:
                self._new_connection(user.id, accounts)
        note(f"world: {layout}")

    @precondition(lambda self: bool(self._accounts(enabled=True)))
    @rule(data=st.data(), count=st.integers(1, 4), coming=st.booleans())
    def new_transactions(self, data: st.DataObject, count: int, coming: bool) -> None:
        account = data.draw(st.sampled_from(self._accounts(enabled=True)), "account")
        new = [self.pworld.add_transaction(account, coming=coming).id for _ in range(count)]
        self._synced(self._connection_of(account), new, f"+{count} on {account}")

    @precondition(lambda self: bool(self._transactions()))
    @rule(
        data=st.data(),
        changes=st.lists(st.sampled_from(["value", "wording", "delete", "booked"]), min_size=1, max_size=4),
    )
    def change_transactions(self, data: st.DataObject, changes: list[str]) -> None:
        """A sync that finds transactions changed or deleted at the bank (one CONNECTION_SYNCED per
        connection it touched, which carries none of them: only new ones travel in the body)."""
        touched: set[int] = set()
        for change in changes:
            pool = self._transactions(coming=True) if change == "booked" else self._transactions()
            if not pool:
                continue
            transaction = self.pworld.transactions[data.draw(st.sampled_from(pool), "transaction")]
            if change == "delete":
                self.pworld.delete_transaction(transaction.id)
            elif change == "booked":
                self.pworld.update_transaction(transaction.id, coming=False)
            elif change == "value":
                self.pworld.update_transaction(transaction.id, value=transaction.value + 1)
            else:
                self.pworld.update_transaction(transaction.id, wording="CARTE CORRIGEE")
            touched.add(self._connection_of(transaction.id_account))
            note(f"  {change} {transaction.id}")
        for connection in sorted(touched):
            self._synced(connection, [], f"{changes}")

    @precondition(lambda self: bool(self._connections(usable=True)))
    @rule(data=st.data())
    def account_found(self, data: st.DataObject) -> None:
        connection = data.draw(st.sampled_from(self._connections(usable=True)), "connection")
        account = self.pworld.add_account(connection)
        self._queue_account("ACCOUNT_FOUND", account)

    @precondition(lambda self: bool(self._accounts(enabled=False)))
    @rule(data=st.data())
    def consent_given(self, data: st.DataObject) -> None:
        account = self.pworld.enable_account(
            data.draw(st.sampled_from(self._accounts(enabled=False)), "account")
        )
        self._queue_account("ACCOUNT_ENABLED", account)
        self._synced(account.id_connection, [], f"after consent to {account.id}")

    @precondition(lambda self: bool(self._accounts(enabled=True)))
    @rule(data=st.data())
    def consent_withdrawn(self, data: st.DataObject) -> None:
        account = self.pworld.disable_account(
            data.draw(st.sampled_from(self._accounts(enabled=True)), "account")
        )
        self._queue_account("ACCOUNT_DISABLED", account)

    @precondition(lambda self: bool(self._connections()))
    @rule(data=st.data(), state=st.sampled_from(STATES))
    def connection_state(self, data: st.DataObject, state: str | None) -> None:
        connection = data.draw(st.sampled_from(self._connections()), "connection")
        self.pworld.set_state(connection, state, None if state is None else "message")
        self._synced(connection, [], f"state {state}")

    @precondition(lambda self: bool(self._connections()))
    @rule(data=st.data())
    def delete_connection(self, data: st.DataObject) -> None:
        connection = self.pworld.delete_connection(
            data.draw(st.sampled_from(self._connections()), "connection")
        )
        body = self.pworld.webhook({"id": connection.id, "id_user": connection.id_user})
        self._queue("CONNECTION_DELETED", body, str(connection.id))

    @precondition(lambda self: len(self.pworld.users) > 1)
    @rule(data=st.data())
    def delete_user(self, data: st.DataObject) -> None:
        user = self.pworld.delete_user(data.draw(st.sampled_from(sorted(self.pworld.users)), "user"))
        self._queue("USER_DELETED", self.pworld.webhook({"id": user.id}), str(user.id))

    @rule(
        data=st.data(), accounts=st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=2)
    )
    def new_connection(self, data: st.DataObject, accounts: list[tuple[int, bool]]) -> None:
        user = data.draw(st.sampled_from(sorted(self.pworld.users)), "user")
        self._new_connection(user, accounts)

    # -- deliveries and our side ---------------------------------------------------------------------
    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), times=st.integers(1, 2), then_drain=st.booleans())
    def deliver(self, data: st.DataObject, times: int, then_drain: bool) -> None:
        self._post(self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1), "pending")), times)
        if then_drain:
            drain(self.h)

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        self._post(self.delivered[data.draw(st.integers(0, len(self.delivered) - 1), "delivered")])

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        lost = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1), "dropped"))
        note(f"  DROP {lost.label} (never delivered)")

    @rule()
    def drain(self) -> None:
        drain(self.h)

    @precondition(lambda self: bool(self.pworld.connections))
    @rule(data=st.data())
    def resync_connection(self, data: st.DataObject) -> None:
        connection = self.pworld.connections[data.draw(st.sampled_from(self._connections()), "connection")]
        outcome = self.enqueuer.resync_item(stored_id(connection.id), powens_user(connection.id_user))
        note(f"  resync connection {connection.id}: {outcome}")

    @precondition(lambda self: bool(self.pworld.users))
    @rule(data=st.data())
    def resync_user(self, data: st.DataObject) -> None:
        """`bridgehook resync --user`: every connection of the user under its lock, all held at once."""
        user_id = data.draw(st.sampled_from(sorted(self.pworld.users)), "user")
        note(f"  resync user {user_id}: {self.enqueuer.resync_user(powens_user(user_id))}")

    @rule()
    def reconcile(self) -> None:
        note(f"  reconciliation sweep: {self._sweep()}")

    @rule()
    def replay_dead_letters(self) -> None:
        letters = DeadLetters(self.r, self.h.settings.queue_name, self.storage)
        ids = letters.ids()
        note(f"  dlq replay of {len(ids)}: {letters.replay(ids) if ids else 'nothing'}")

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        self._settle(data.draw(st.permutations(range(len(self.pending))), "delivery order"))

    def _sweep(self) -> str:
        self.sweeps += 1
        return self.enqueuer.sweep(f"powens-model-{self.sweeps}")

    def _settle(self, order: list[int]) -> None:
        """What is in flight arrives, the queue drains, a sweep runs and its jobs drain; then the
        promise must hold."""
        in_flight, self.pending = [self.pending[i] for i in order], []
        for pending in in_flight:
            self._post(pending)
        count, _ = settle_and_compare(self.h, self._sweep, expected_and_observed, "Powens")
        note(f"  settled: equal ({count} transactions)")


wrap_rules(PowensModel)


def expected_and_observed(h: PowensHarness) -> tuple[Rows, Rows]:
    """Powens's live state and ours. As for Bridge, a connection waiting for its user or for Powens
    keeps the data of its last usable sync: its accounts and transactions are not compared."""
    usable = {c.id for c in h.pworld.connections.values() if not c.state}
    truth, ours = h.powens_truth(), h.powens_tables()
    expected: Rows = {"items": truth["items"]}
    observed: Rows = {"items": ours["items"]}
    for rows, into in ((truth, expected), (ours, observed)):
        into["accounts"] = {k: v for k, v in rows["accounts"].items() if v["connection"] in usable}
        into["transactions"] = {
            k: v for k, v in rows["transactions"].items() if v["account"] in into["accounts"]
        }
    return expected, observed


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_tables_end_equal_to_powens(engine: str, redis_url: str, tmp_path: Path) -> None:
    env = Env(redis_url, engine, tmp_path)
    run_timelines("powens model", lambda: PowensModel(env), EXAMPLES, engine)
