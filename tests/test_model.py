"""The promise, as a model-based test: whatever the order, repetitions or gaps of the events, our tables
end equal to what Bridge holds.

A hypothesis ``RuleBasedStateMachine`` drives the fake Bridge (served over HTTP) and the REAL pipeline
(signed POST → receiver → Redis → RQ worker → SQLite or PostgreSQL) through random timelines:

- rules that change Bridge, each producing the webhooks Bridge would send for it (built by the world's
  ``event_*`` builders at the time of the change, signed bodies made then): transactions new, updated,
  deleted, future ones changing or vanishing, accounts added / disabled / re-enabled / deleted, items
  deleted, item statuses (402, 1003, 1010, 1100 and back to 0), users deleted and new items; tokens
  expired; 500 and 429 storms;
- rules that deliver: one pending event (any of them: out of order) once or several times, a delivered
  one again (Bridge's retry), or dropped for good (a gap); drain the queue; enqueue a resync (item or
  user), a reconciliation sweep; replay events from the receiver's archive, from the ledger, or the dead
  letters;
- ``settle`` (a rule, and again at the end of every timeline): Bridge calms down and every event still in
  flight arrives (in an order hypothesis picks), the queue drains, one reconciliation sweep runs and its
  jobs drain; then the tables must equal Bridge's state, and every dead letter must have failed for a
  permanent reason.

Bounded by default (``BRIDGEHOOK_MODEL_EXAMPLES`` examples per database, 20 unless set). The seed is
printed (``BRIDGEHOOK_MODEL_SEED=…`` reruns the very same timelines). ``BRIDGEHOOK_MODEL_STEPS`` sets the
number of steps per timeline (25). ``BRIDGEHOOK_MODEL_NEVER_DROP`` (event types, comma-separated) keeps
those events from being dropped, and ``BRIDGEHOOK_MODEL_SKIP`` (rule names) leaves those rules out, to
look past a failure already understood (see tests/test_timelines.py).
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import redis
from hypothesis import HealthCheck, note, reproduce_failure, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from rq import Queue
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from service.app import create_app
from tests.harness import Harness, pg_schema, worker_settings
from tests.support import BRIDGE_IP, signed
from workers import context
from workers.codec import codec_from_settings
from workers.context import WorkerContext
from workers.deadletters import DeadLetters, traceback_of
from workers.replay import Enqueuer, from_ledger
from workers.runner import Worker
from workers.storage import Storage

Event = tuple[str, dict[str, Any]]
Rows = dict[str, dict[Any, Any]]

EXAMPLES = int(os.environ.get("BRIDGEHOOK_MODEL_EXAMPLES") or 20)
STEPS = int(os.environ.get("BRIDGEHOOK_MODEL_STEPS") or 25)
NEVER_DROP = frozenset(
    {"item.created", *filter(None, (os.environ.get("BRIDGEHOOK_MODEL_NEVER_DROP") or "").split(","))}
)
# Dead letters the model accepts: a request Bridge calls wrong (4xx), and an item that stayed
# temporarily unavailable (1003) through every retry: the harness retries at once (intervals 0), where
# production waits minutes; the item's data is still checked once it is back (Bridge refreshes it, and
# the sweep enqueues the delta).
PERMANENT = ("PermanentError", "ItemUnavailable")
USER_ACTION = (402, 1010, 1100)
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

# users → items → accounts → (transactions, future transactions)
LAYOUT = st.lists(
    st.lists(
        st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2)), min_size=1, max_size=3),
        min_size=1,
        max_size=2,
    ),
    min_size=1,
    max_size=2,
)
DESCRIPTIONS = ["Corrigé", "Carrefour City", "Boulangerie Paul"]
SKIP = frozenset(filter(None, (os.environ.get("BRIDGEHOOK_MODEL_SKIP") or "").split(",")))


@dataclass
class Pending:
    """A webhook Bridge has to deliver: its event and the signed body, made when Bridge changed."""

    label: str
    event: Event
    body: bytes
    batch: int  # the Bridge change that made it


@dataclass(frozen=True)
class Env:
    """What one pytest run gives every timeline: Redis, the engine, a scratch directory."""

    redis_url: str
    engine: str
    scratch: Path


class Scratch:
    """What one timeline starts from: Redis flushed, a directory of its own, and an empty database (a
    SQLite file in it, or a PostgreSQL schema of its own)."""

    def __init__(self, env: Env) -> None:
        self.r = redis.Redis.from_url(env.redis_url)
        self.r.flushdb()
        self.dir = Path(tempfile.mkdtemp(dir=env.scratch))
        self._schema: AbstractContextManager[str] | None = None
        if env.engine == "sqlite":
            self.url = f"sqlite:///{self.dir / 'bridgehook.db'}"
        else:
            self._schema = pg_schema()
            self.url = self._schema.__enter__()

    def close(self) -> None:
        if self._schema is not None:
            self._schema.__exit__(None, None, None)
        self.r.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class BurstWorker(Worker):
    """The production worker (``bridgehook worker``), without the pub/sub channel RQ listens to for
    commands: its thread takes 0.2 s to stop at the end of every burst, most of a timeline's time."""

    def subscribe(self) -> None:
        return None


# How long a drain waits for jobs deferred by a spent budget (RQ's scheduler runs them when due): a
# budget's window in this model is a second or two.
DEFERRED_WAIT = 30.0


def drain(h: Harness) -> None:
    """``Harness.drain``, by the production worker class (see BurstWorker), then, as long as jobs wait
    in RQ's scheduled registry (deferred by a spent budget, or a retry's interval), RQ's own scheduler
    hands them to the queue when due and the worker runs them: until nothing is queued or scheduled."""
    if context._current is None:
        context.configure(WorkerContext.build(h.settings))
    queue = Queue(h.settings.queue_name, connection=h.r, serializer=JSONSerializer)
    scheduler = RQScheduler([queue], connection=h.r, serializer=JSONSerializer)
    scheduler.prepare_registries([queue.name])
    registry = ScheduledJobRegistry(queue=queue)
    deadline = time.monotonic() + DEFERRED_WAIT
    while True:
        BurstWorker([queue], connection=h.r, serializer=JSONSerializer).work(burst=True, with_scheduler=False)
        waiting = registry.get_job_ids()
        if not waiting:
            return
        assert time.monotonic() < deadline, f"jobs still deferred after {DEFERRED_WAIT:.0f}s: {waiting}"
        first = min(registry.get_scheduled_time(job_id) for job_id in waiting)
        time.sleep(min(2.0, max(0.0, first.timestamp() - time.time()) + 0.05))
        scheduler.enqueue_scheduled_jobs()


# -- the state to compare ----------------------------------------------------------------------------
def expected_and_observed(h: Harness) -> tuple[Rows, Rows]:
    """Bridge's state and our live rows, in the shape of ``Harness.truth()`` / ``tables()``, adapted to
    Bridge's semantics where ``truth()`` does not say them:

    - an item in a status other than 0 is not refreshed by Bridge: we keep the data of its last usable
      sync (the 1100 values are even obfuscated). Its accounts and their transactions are not compared
      (an account deleted during the refresh that left it waiting is marked by the sync that follows
      its next successful refresh). ``truth()`` drops such items' accounts, where our tables rightly
      keep them;
    - a disabled account (``data_access``) keeps the transactions synced while it was enabled, flagged
      by the account: they are out of what applications see as active, and not compared. ``truth()``
      leaves them out but ``tables()`` lists them.

    Everything else is ``truth()`` and ``tables()`` as they are: every live item (status, provider,
    last_try_refresh), every live account of the items in status 0, every transaction of their enabled
    accounts that Bridge has not deleted.
    """
    truth, tables = h.truth(), h.tables()
    snap = h.world.snapshot()
    waiting = {i for i, item in snap["items"].items() if item.get("status") != 0}

    expected: Rows = {"items": truth["items"], "accounts": truth["accounts"]}
    expected["transactions"] = truth["transactions"]
    accounts = {a: v for a, v in tables["accounts"].items() if v["item_id"] not in waiting}
    enabled = {a for a, v in accounts.items() if v["data_access"] != "disabled"}
    observed: Rows = {"items": tables["items"], "accounts": accounts}
    observed["transactions"] = {t: v for t, v in tables["transactions"].items() if v["account_id"] in enabled}
    return expected, observed


def differences(expected: Rows, observed: Rows, who: str = "Bridge") -> list[str]:
    """Readable lines: what is missing, extra or different, table by table (``who``: the provider)."""
    lines = []
    for table in expected:
        want, got = expected[table], observed[table]
        for key in sorted(want.keys() | got.keys(), key=str):
            if key not in got:
                lines.append(f"{table} {key}: missing, {who} has {want[key]}")
            elif key not in want:
                lines.append(f"{table} {key}: live with us, not at {who}: {got[key]}")
            elif want[key] != got[key]:
                fields = want[key].keys() if isinstance(want[key], dict) else ["value"]
                diff = {
                    f: (want[key].get(f), got[key].get(f))
                    for f in fields
                    if isinstance(want[key], dict) and want[key].get(f) != got[key].get(f)
                }
                lines.append(f"{table} {key}: ({who}, ours) differ: {diff or (want[key], got[key])}")
    return lines


def dead_letter_errors(h: Harness) -> dict[str, str]:
    """Each dead letter's job id (and event type) with the last line of its last traceback."""
    out = {}
    for job_id in h.failed_ids():
        job = Job.fetch(job_id, connection=h.r, serializer=JSONSerializer)
        lines = [line for line in (traceback_of(job) or "").strip().splitlines() if line.strip()]
        kind = (job.args[0] if job.args else {}).get("type", "?")
        out[f"{kind} {job_id[:12]}"] = lines[-1].strip() if lines else "(no traceback)"
    return out


def transient(errors: dict[str, str]) -> dict[str, str]:
    """The dead letters whose error is not a permanent one (see PERMANENT)."""
    return {k: e for k, e in errors.items() if not any(p in e.split(":")[0] for p in PERMANENT)}


# -- the machine -------------------------------------------------------------------------------------
class BridgeModel(RuleBasedStateMachine):
    def __init__(self, env: Env) -> None:
        super().__init__()
        self.env = env
        # Pages of four: the model's histories (up to 22 transactions an account) span pages, so that
        # listings stopped by a budget resume as long ones do at Bridge's 500 a page.
        self.world = World(seed=7, page_size=4)
        self.fake = FakeBridgeServer(self.world)
        self.fake.start()
        self.scratch = Scratch(env)
        self.r, url = self.scratch.r, self.scratch.url
        # Token requests are budgeted at 10 a minute per user: expired tokens, renewed in a loop, would
        # make the client wait for the next window. The budgets have their own tests.
        # No worker waits for a budget: Bridge's 429 (Retry-After: 1 s or more) defers the job through RQ's
        # scheduler at once, the path a long wait takes in production.
        env_overrides = {"BRIDGE_RATE_LIMIT_TOKEN": "100000/60", "BRIDGE_BUDGET_MAX_WAIT_SECONDS": "0"}
        s = worker_settings(env.redis_url, url, self.fake.api_url, self.world, **env_overrides)
        self.h = Harness(s, self.world, self.fake, self.r)
        # Two receivers, as two pods behind the ingress: deliveries alternate between them.
        second = TestClient(create_app(s), client=(BRIDGE_IP, 40001))
        second.__enter__()
        self.receivers = [self.h.receiver, second]
        self.posts = 0
        self.enqueuer = Enqueuer(self.r, s)
        self.storage = Storage(self.h.db, codec_from_settings(s))
        self.pending: list[Pending] = []
        self.delivered: list[Pending] = []
        self.owner: dict[int, str] = {}  # item → user, deleted ones included
        self.users: list[str] = []
        self.sweeps = 0
        self.batch = 0  # the Bridge change the webhooks queued now belong to
        self.healthy = True  # False once a step raised: teardown then only cleans up

    # -- plumbing ------------------------------------------------------------------------------------
    def teardown(self) -> None:
        end_timeline(self, lambda: self.receivers[1].__exit__(None, None, None), self.h.close,
                     self.fake.stop, self.scratch.close)  # fmt: skip

    def _step(self, text: str) -> None:
        note(text)

    def _change(self, text: str) -> None:
        """A change at Bridge: the webhooks queued from now on are its own (one batch)."""
        self.batch += 1
        note(text)

    def _queue(self, event: Event, label: str | None = None) -> None:
        kind, content = event
        what = label or " ".join(
            f"{k}={v}" for k, v in content.items() if k in ("item_id", "account_id", "status_code")
        )
        counts = [content.get(f"nb_{k}_transactions") for k in ("new", "updated", "deleted")]
        if kind == "item.account.updated":
            what += " (new {}, updated {}, deleted {})".format(*counts)
        self.pending.append(Pending(f"{kind} {what}", event, self.h.body(event), self.batch))

    def _snap(self) -> dict[str, Any]:
        return self.world.snapshot()

    def _items(self, *statuses: int) -> list[int]:
        """Live items at Bridge, in one of ``statuses`` if given."""
        items = self._snap()["items"]
        return sorted(i for i, v in items.items() if not statuses or v.get("status") in statuses)

    def _accounts(self, *, refreshable: bool = False, enabled: bool = False) -> list[int]:
        snap = self._snap()
        ok = {i for i, v in snap["items"].items() if v.get("status") == 0}
        return sorted(
            a
            for a, v in snap["accounts"].items()
            if (not refreshable or v["item_id"] in ok) and (not enabled or v.get("data_access") != "disabled")
        )

    def _transactions(self, *, future: bool | None = None) -> list[int]:
        """Live transactions of enabled accounts of items in status 0 (what a refresh may change)."""
        accounts = set(self._accounts(refreshable=True, enabled=True))
        return sorted(
            t
            for t, v in self._snap()["transactions"].items()
            if v["account_id"] in accounts
            and not v.get("deleted")
            and (future is None or v["future"] == future)
        )

    def _item_of(self, account: int) -> int:
        item = self.world.item_of_account(account)
        assert item is not None
        return item

    def _refresh(self, item: int, *, also: Iterable[int] = ()) -> None:
        """A successful refresh of the item at Bridge: status 0, accounts' updated_at bumped, and the
        webhooks: item.refreshed and item.account.updated for each enabled account (and ``also``)."""
        self.world.set_item_status(item, 0)
        self._queue(self.world.event_item_refreshed(item))
        snap = self._snap()
        accounts = [a for a, v in snap["accounts"].items() if v["item_id"] == item]
        for account in sorted(accounts):
            if snap["accounts"][account].get("data_access") != "disabled" or account in also:
                self._queue(self.world.event_account(account, "updated"))

    def _new_item(self, user: str, accounts: list[tuple[int, int]]) -> int:
        item = self.world.add_item(user)
        self.owner[item] = user
        self._queue(self.world.event_item_created(item))
        for n, (count, future) in enumerate(accounts):
            account = self.world.add_account(item, name=f"Compte {n}", balance=f"{100 * (n + 1)}.00")
            if count:
                self.world.add_transactions(account, count)
            if future:
                self.world.add_transactions(account, future, future=True)
            self._queue(self.world.event_account(account, "created"))
            self._step(f"  item {item} account {account}: {count} transactions, {future} future")
        return item

    def _post(self, pending: Pending, times: int = 1) -> None:
        outcomes = [self._deliver(pending.body) for _ in range(times)]
        self._step(f"  deliver {pending.label} x{times}: {', '.join(outcomes)}")
        if pending not in self.delivered:
            self.delivered.append(pending)

    def _deliver(self, body: bytes) -> str:
        """POST the signed body to one receiver, then the other next time; the 200's status."""
        self.posts += 1
        response = self.receivers[self.posts % 2].post("/webhooks/bridge", **signed(body))
        assert response.status_code == 200, response.text
        return str(response.json()["status"])

    # -- Bridge changes ------------------------------------------------------------------------------
    @initialize(layout=LAYOUT)
    def create_world(self, layout: list[list[list[tuple[int, int]]]]) -> None:
        for n, items in enumerate(layout):
            user = self.world.add_user(external_user_id=f"user-{n}")
            self.users.append(user)
            for accounts in items:
                self._change(
                    f"world: user {n} {user[:8]} has an item, accounts (transactions, future) {accounts}"
                )
                self._new_item(user, accounts)

    @precondition(lambda self: bool(self._accounts(refreshable=True, enabled=True)))
    @rule(data=st.data(), count=st.integers(1, 5), future=st.booleans())
    def new_transactions(self, data: st.DataObject, count: int, future: bool) -> None:
        account = data.draw(st.sampled_from(self._accounts(refreshable=True, enabled=True)), "account")
        ids = self.world.add_transactions(account, count, future=future)
        self._change(
            f"bridge: {count} new {'future ' if future else ''}transactions {ids} on account {account}"
        )
        self._refresh(self._item_of(account))

    @precondition(lambda self: bool(self._transactions()))
    @rule(data=st.data(), change=st.sampled_from(["amount", "description"]))
    def update_transactions(self, data: st.DataObject, change: str) -> None:
        ids = data.draw(st.lists(st.sampled_from(self._transactions()), min_size=1, max_size=3, unique=True))
        for n, txn in enumerate(ids):
            if change == "amount":
                self.world.update_transaction(txn, amount=Decimal(-n - 1) - Decimal("0.37"))
            else:
                label = data.draw(st.sampled_from(DESCRIPTIONS), "description")
                self.world.update_transaction(txn, clean_description=label)
        self._change(f"bridge: transactions {ids} change their {change}")
        self._refresh_owners(ids)

    @precondition(lambda self: bool(self._transactions()))
    @rule(data=st.data())
    def real_label_with_xxxx(self, data: st.DataObject) -> None:
        """A label that really contains XXXX (a masked card number), outside any 1100 obfuscation."""
        txn = data.draw(st.sampled_from(self._transactions()), "transaction")
        self.world.update_transaction(txn, clean_description="CB XXXX 4821 AMAZON")
        self._change(f"bridge: transaction {txn} relabelled 'CB XXXX 4821 AMAZON'")
        self._refresh_owners([txn])

    @precondition(lambda self: bool(self._transactions()))
    @rule(data=st.data())
    def delete_transactions(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(self._transactions()), min_size=1, max_size=3, unique=True))
        for txn in ids:
            self.world.delete_transaction(txn)
        self._change(f"bridge: transactions {ids} deleted")
        self._refresh_owners(ids)

    @precondition(lambda self: bool(self._transactions(future=True)))
    @rule(data=st.data(), change=st.sampled_from(["amount", "vanishes", "booked"]))
    def future_transaction_changes(self, data: st.DataObject, change: str) -> None:
        txn = data.draw(st.sampled_from(self._transactions(future=True)), "future transaction")
        if change == "amount":
            self.world.update_transaction(txn, amount=Decimal("-12.34"))
        elif change == "vanishes":
            self.world.delete_transaction(txn)
        else:
            self.world.update_transaction(txn, future=False, operation_type="card")
        self._change(f"bridge: future transaction {txn} {change}")
        self._refresh_owners([txn])

    def _refresh_owners(self, transactions: list[int]) -> None:
        snap = self._snap()
        items = sorted({self._item_of(snap["transactions"][t]["account_id"]) for t in transactions})
        for item in items:
            self._refresh(item)

    @precondition(lambda self: bool(self._items(0)))
    @rule(data=st.data(), count=st.integers(0, 8))
    def add_account(self, data: st.DataObject, count: int) -> None:
        item = data.draw(st.sampled_from(self._items(0)), "item")
        account = self.world.add_account(item, name="Livret", type="savings", balance="50.00")
        if count:
            self.world.add_transactions(account, count)
        self._change(f"bridge: account {account} added to item {item} with {count} transactions")
        self._queue(self.world.event_account(account, "created"))
        self._refresh(item)

    @precondition(lambda self: bool(self._accounts(refreshable=True)))
    @rule(data=st.data())
    def toggle_data_access(self, data: st.DataObject) -> None:
        account = data.draw(st.sampled_from(self._accounts(refreshable=True)), "account")
        now = self._snap()["accounts"][account].get("data_access")
        access = "enabled" if now == "disabled" else "disabled"
        self.world.update_account(account, data_access=access)
        self._change(f"bridge: account {account} data_access {access}")
        self._refresh(self._item_of(account), also=[account])

    @precondition(lambda self: bool(self._accounts(refreshable=True)))
    @rule(data=st.data())
    def delete_account(self, data: st.DataObject) -> None:
        """An account the bank no longer reports: Bridge deletes it during a refresh of its item, and
        sends item.account.deleted with the refresh's webhooks."""
        account = data.draw(st.sampled_from(self._accounts(refreshable=True)), "account")
        item = self._item_of(account)
        event = self.world.event_account(account, "deleted")
        self.world.delete_account(account)
        self._change(f"bridge: account {account} deleted in a refresh of item {item}")
        self._queue(event)
        self._refresh(item)

    @precondition(lambda self: bool(self._items()))
    @rule(data=st.data())
    def delete_item(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(self._items()), "item")
        event = self.world.event_item_deleted(item)
        self.world.delete_item(item)
        self._change(f"bridge: item {item} deleted")
        self._queue(event)

    # At least one user stays: when Bridge knows none of several users, the sweep deletes nobody (a wrong
    # BRIDGE_API_URL is likelier; see workers.reconcile), so the deletions it heals need a known user.
    @precondition(lambda self: len(self._snap()["users"]) > 1)
    @rule(data=st.data())
    def delete_user(self, data: st.DataObject) -> None:
        user = data.draw(st.sampled_from(sorted(self._snap()["users"])), "user")
        event = self.world.event_user_deleted(user)
        self.world.delete_user(user)
        self._change(f"bridge: user {user[:8]} deleted")
        self._queue(event)

    @precondition(lambda self: bool(self._snap()["users"]))
    @rule(
        data=st.data(),
        accounts=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 1)), min_size=1, max_size=2),
    )
    def add_item(self, data: st.DataObject, accounts: list[tuple[int, int]]) -> None:
        user = data.draw(st.sampled_from(sorted(self._snap()["users"])), "user")
        self._change(f"bridge: user {user[:8]} adds an item, accounts {accounts}")
        self._new_item(user, accounts)

    @precondition(lambda self: bool(self._items(0)))
    @rule(data=st.data(), status=st.sampled_from([402, 1003, 1010, 1100]))
    def item_status(self, data: st.DataObject, status: int) -> None:
        item = data.draw(st.sampled_from(self._items(0)), "item")
        self.world.set_item_status(item, status)
        self._change(f"bridge: item {item} status {status}" + (" (no webhook)" if status == 1100 else ""))
        if status != 1100:  # 1100 is never sent by webhook: polling finds it
            self._queue(self.world.event_item_refreshed(item))

    @precondition(lambda self: bool(self._items(*USER_ACTION, 1003)))
    @rule(data=st.data(), count=st.integers(0, 3))
    def item_recovers(self, data: st.DataObject, count: int) -> None:
        item = data.draw(st.sampled_from(self._items(*USER_ACTION, 1003)), "item")
        accounts = [a for a, v in self._snap()["accounts"].items() if v["item_id"] == item]
        if count and accounts:
            self.world.add_transactions(min(accounts), count)
        self._change(f"bridge: item {item} back to status 0, {count} new transactions")
        self._refresh(item)

    @precondition(lambda self: bool(self._items(0)))
    @rule(data=st.data())
    def refresh_unchanged(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(self._items(0)), "item")
        self._change(f"bridge: item {item} refreshed, nothing new")
        self._refresh(item)

    @rule()
    def expire_tokens(self) -> None:
        self._step("bridge: every access token expires")
        self.world.expire_tokens()

    @rule(
        p500=st.sampled_from([0.0, 0.1, 0.2]), p429=st.sampled_from([0.0, 0.1, 0.2]), salt=st.integers(0, 9)
    )
    def storm(self, p500: float, p429: float, salt: int) -> None:
        self._change(f"bridge: storm, {p500:.0%} of requests 500, {p429:.0%} 429")
        self.world.faults.set_ratios(p500=p500, p429=p429, retry_after=0, seed=salt)

    @rule(requests=st.sampled_from([10, 15]), window=st.sampled_from([1, 2]))
    def small_budget(self, requests: int, window: int) -> None:
        """Bridge admits only ``requests`` per ``window`` seconds per user from here on (429 +
        Retry-After past it): syncs are deferred and their listings resume. Room enough for each of a
        few jobs of one user to write a page an attempt (below that, jobs that share a user's budget
        can starve each other; see docs/correctness.md)."""
        self._change(f"bridge: {requests} requests per {window} s per user")
        self.world.budgets.set(user=(requests, window))

    @rule(count=st.integers(1, 6), status=st.sampled_from([429, 500, 503]))
    def next_requests_fail(self, count: int, status: int) -> None:
        self._change(f"bridge: the next {count} requests answer {status}")
        if status == 429:
            self.world.faults.rate_limit_next(count, retry_after=0)
        else:
            self.world.faults.fail_next(count, status)

    # -- deliveries and our side ---------------------------------------------------------------------
    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), count=st.integers(1, 3), times=st.integers(1, 3), then_drain=st.booleans())
    def deliver(self, data: st.DataObject, count: int, times: int, then_drain: bool) -> None:
        """``count`` pending events, each picked among all of them (out of order), each delivered
        ``times`` times (the same body: Bridge's retries), then perhaps the queue drained."""
        for _ in range(min(count, len(self.pending))):
            index = data.draw(st.integers(0, len(self.pending) - 1), "pending event")
            self._post(self.pending.pop(index), times)
        if then_drain:
            self._step("  drain")
            drain(self.h)

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def deliver_one_and_drain(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.pending) - 1), "pending event")
        self._post(self.pending.pop(index))
        self._step("  drain")
        drain(self.h)

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.delivered) - 1), "delivered event")
        self._post(self.delivered[index])

    @precondition(lambda self: any(p.event[0] not in NEVER_DROP for p in self.pending))
    @rule(data=st.data(), count=st.integers(1, 3))
    def drop(self, data: st.DataObject, count: int) -> None:
        """``count`` pending events lost for good (Bridge gave up retrying): a gap."""
        for _ in range(count):
            droppable = [p for p in self.pending if p.event[0] not in NEVER_DROP]
            if not droppable:
                return
            lost = droppable[data.draw(st.integers(0, len(droppable) - 1), "dropped event")]
            self.pending.remove(lost)
            self._step(f"  DROP {lost.label} (never delivered)")

    @precondition(lambda self: any(p.event[0] not in NEVER_DROP for p in self.pending))
    @rule(data=st.data())
    def lose_part_of_a_change(self, data: st.DataObject) -> None:
        """Some of the webhooks of one Bridge change (a refresh's item.refreshed and account events)
        lost for good, the others still on their way."""
        batches = sorted({p.batch for p in self.pending if p.event[0] not in NEVER_DROP})
        batch = data.draw(st.sampled_from(batches[-3:]), "change")
        events = [p for p in self.pending if p.batch == batch and p.event[0] not in NEVER_DROP]
        lost = data.draw(st.sets(st.sampled_from(range(len(events))), min_size=1), "lost")
        for n in sorted(lost):
            self.pending.remove(events[n])
            self._step(f"  DROP {events[n].label} (never delivered)")

    @rule()
    def drain(self) -> None:
        self._step("  drain")
        drain(self.h)

    @precondition(lambda self: bool(self.owner))
    @rule(data=st.data())
    def resync_item(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(sorted(self.owner)), "item")
        self._step(f"  resync item {item}: {self.enqueuer.resync_item(item, self.owner[item])}")

    @rule(data=st.data())
    def resync_user(self, data: st.DataObject) -> None:
        user = data.draw(st.sampled_from(self.users), "user")
        self._step(f"  resync user {user[:8]}: {self.enqueuer.resync_user(user)}")

    @rule()
    def reconcile(self) -> None:
        self._step(f"  reconciliation sweep: {self._sweep()}")

    def _sweep(self) -> str:
        self.sweeps += 1
        return self.enqueuer.sweep(f"model-{self.sweeps}")

    @rule(data=st.data(), source=st.sampled_from(["archive", "ledger"]))
    def replay_events(self, data: st.DataObject, source: str) -> None:
        found = list(
            self.enqueuer.archived(EPOCH, None)
            if source == "archive"
            else from_ledger(self.storage, EPOCH, None)
        )
        if not found:
            return
        chosen = data.draw(st.lists(st.integers(0, len(found) - 1), unique=True, max_size=6), "replayed")
        outcomes = [self.enqueuer.event(*found[i]) for i in chosen]
        types = [found[i][1].get("type") for i in chosen]
        self._step(f"  replay from the {source}: {list(zip(types, outcomes, strict=True))}")

    @rule()
    def replay_dead_letters(self) -> None:
        letters = DeadLetters(self.r, self.h.settings.queue_name, self.storage)
        ids = letters.ids()
        self._step(f"  dlq replay of {len(ids)}: {letters.replay(ids) if ids else 'nothing'}")

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        order = data.draw(st.permutations(range(len(self.pending))), "delivery order")
        self._step("settle")
        self._settle(order)

    def _settle(self, order: list[int]) -> None:
        """Bridge calms down, what is in flight arrives, the queue drains, a sweep runs and its jobs
        drain; then the promise must hold."""
        self.world.faults.clear()
        self.world.budgets.clear()
        in_flight, self.pending = [self.pending[i] for i in order], []
        for pending in in_flight:
            self._post(pending)
        count, errors = settle_and_compare(self.h, self._sweep, expected_and_observed, "Bridge")
        self._step(f"  settled: equal ({count} transactions), dead letters {errors}")


def end_timeline(machine: Any, *cleanup: Callable[[], object]) -> None:
    """A model's teardown: a timeline whose every step passed settles (its pending deliveries in
    order, see ``_settle``); then, whatever happened, ``cleanup`` runs, step after step."""
    try:
        if machine.healthy:
            machine.healthy = False
            note("(end of the timeline) settle")
            machine._settle(list(range(len(machine.pending))))
    finally:
        for step in cleanup:
            step()


def settle_and_compare(
    h: Harness, sweep: Callable[[], str], compare: Callable[[Any], tuple[Rows, Rows]], who: str
) -> tuple[int, dict[str, str]]:
    """The end of ``settle`` (what was in flight posted): the queue drains, one sweep runs and its jobs
    drain; then no dead letter may be transient and the tables must equal the provider's. Returns the
    transactions compared and the dead letters."""
    drain(h)
    sweep()
    drain(h)
    errors = dead_letter_errors(h)
    assert not transient(errors), f"dead letters for a transient reason: {transient(errors)}"
    expected, observed = compare(h)
    diff = differences(expected, observed, who)
    assert not diff, f"our tables differ from {who}:\n  " + "\n  ".join(diff)
    return len(expected["transactions"]), errors


def _wrap(rule_method: Callable[..., None]) -> Callable[..., None]:
    """Mark the machine unhealthy while a step runs, healthy again if it returns: teardown settles only
    after a timeline whose every step passed."""

    @functools.wraps(rule_method)
    def step(self: Any, *args: Any, **kwargs: Any) -> None:
        self.healthy = False
        rule_method(self, *args, **kwargs)
        self.healthy = True

    return step


def _never(self: Any) -> bool:
    return False


def wrap_rules(machine: type, skip: frozenset[str] = frozenset()) -> None:
    """Every rule of ``machine`` wrapped by :func:`_wrap`; those named in ``skip`` never run."""
    for name in list(vars(machine)):
        rule_ = getattr(getattr(machine, name), "hypothesis_stateful_rule", None)
        if rule_ is not None:
            rule_.function = _wrap(rule_.function)
            if name in skip:
                rule_.preconditions = (*rule_.preconditions, _never)
        init = getattr(getattr(machine, name), "hypothesis_stateful_initialize_rule", None)
        if init is not None:
            init.function = _wrap(init.function)


wrap_rules(BridgeModel, SKIP)  # BRIDGEHOOK_MODEL_SKIP: rules left out, to look past a known failure


def run_timelines(
    name: str, machine: Callable[[], RuleBasedStateMachine], examples: int, engine: str
) -> None:
    """``examples`` random timelines of ``machine``, under the seed ``BRIDGEHOOK_MODEL_SEED`` or a new
    one, printed so that a failing run can be replayed; or the one timeline of ``BRIDGEHOOK_MODEL_BLOB``
    (the blob a failure printed in its ``@reproduce_failure``: a CI run's timeline, replayed as is)."""
    chosen = int(os.environ.get("BRIDGEHOOK_MODEL_SEED") or random.randrange(2**32))
    print(f"{name} run: BRIDGEHOOK_MODEL_SEED={chosen} ({examples} examples of {STEPS} steps, {engine})")
    blob = os.environ.get("BRIDGEHOOK_MODEL_BLOB")
    replay = reproduce_failure(hypothesis.__version__, blob.encode()) if blob else seed(chosen)
    run_state_machine_as_test(
        replay(machine),
        settings=settings(
            max_examples=examples,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=False,
            print_blob=True,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.filter_too_much,
            ],
        ),
    )


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_tables_end_equal_to_bridge(engine: str, redis_url: str, tmp_path: Path) -> None:
    env = Env(redis_url, engine, tmp_path)
    run_timelines("model", lambda: BridgeModel(env), EXAMPLES, engine)
