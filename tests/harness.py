"""End-to-end harness: signed webhooks → the real receiver → Redis → RQ workers → the database,
with the fake Bridge served over HTTP as the source of truth."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis
from rq import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from fakebridge.sender import webhook_body
from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from service.app import create_app
from service.settings import Settings
from tests.support import BRIDGE_IP, SECRET, TEST_ENCRYPTION_KEY, signed
from workers import context
from workers.codec import codec_from_settings
from workers.context import WorkerContext
from workers.db import Database, to_datetime
from workers.reader import Reader
from workers.runner import PlainWorker
from workers.schema import upgrade
from workers.storage import Storage

PG_URL = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"


def worker_environ(
    redis_url: str, database_url: str, api_url: str, world: World, **env: str
) -> dict[str, str]:
    """The environment of the tests' workers: what in-process settings are read from, and what the
    fault suite's `bridgehook` processes run with, so that a new setting reaches both."""
    base = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "BRIDGE_WEBHOOK_SECRETS": SECRET,
        "BRIDGE_API_URL": api_url,
        "BRIDGE_CLIENT_ID": world.client_id,
        "BRIDGE_CLIENT_SECRET": world.client_secret,
        "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        "WORKER_RETRY_INTERVALS": "0,0,0",
        "ITEM_LOCK_SECONDS": "10",
        # The fake's history is seconds old: any overlap would re-read all of it. Overlap has its own test.
        "SYNC_OVERLAP_SECONDS": "0",
        # Bridge's real budgets would throttle a test suite; the limiter has its own test.
        "BRIDGE_RATE_LIMIT_USER": "100000/60",
        "BRIDGE_RATE_LIMIT_APP": "100000/60",
        "BRIDGE_BACKOFF_MS": "5",  # the policy (4 attempts, doubling) stays; the waits shrink
    }
    base.update(env)
    return base


def worker_settings(redis_url: str, database_url: str, api_url: str, world: World, **env: str) -> Settings:
    return Settings.from_env(worker_environ(redis_url, database_url, api_url, world, **env))


class Harness:
    def __init__(self, settings: Settings, world: World, fake: FakeBridgeServer, r: redis.Redis) -> None:
        self.settings = settings
        self.world = world
        self.fake = fake
        self.r = r
        self.receiver = TestClient(create_app(settings), client=(BRIDGE_IP, 40000))
        self.receiver.__enter__()
        self.db = Database.from_url(settings.database_url)
        self.reader = Reader(self.db, codec_from_settings(settings))
        upgrade(self.db)
        self.timestamp = 1_700_000_000_000
        self.acknowledged: list[str] = []  # event ids the receiver answered 200, in order

    def close(self) -> None:
        self.receiver.__exit__(None, None, None)
        context.configure(None)
        self.db.close()

    # -- driving ---------------------------------------------------------------------------------

    def body(self, event: tuple[str, dict[str, Any]]) -> bytes:
        """The event as Bridge sends it, with a timestamp of its own (a new body: a new event)."""
        self.timestamp += 1
        return webhook_body(event[0], event[1], self.timestamp)

    def send(self, event: tuple[str, dict[str, Any]]) -> str:
        """POST the event, signed, to the receiver; return its status (queued, duplicate…)."""
        return self.post(self.body(event))

    def post(self, body: bytes) -> str:
        """POST the body, signed, to the receiver; return its status (queued, duplicate…)."""
        response = self.receiver.post("/webhooks/bridge", **signed(body))
        assert response.status_code == 200, response.text
        self.acknowledged.append(str(response.json()["event_id"]))
        return str(response.json()["status"])

    def drain(self) -> None:
        """Run every queued job (and every immediate retry) in a real RQ worker, in-process (RQ's
        SimpleWorker, whose shutdown does not wait for its pub/sub thread: see PlainWorker)."""
        if context._current is None:
            context.configure(WorkerContext.build(self.settings))
        queue = Queue(self.settings.queue_name, connection=self.r, serializer=JSONSerializer)
        PlainWorker([queue], connection=self.r, serializer=JSONSerializer).work(
            burst=True, with_scheduler=False
        )

    def failed_ids(self) -> list[str]:
        queue = Queue(self.settings.queue_name, connection=self.r, serializer=JSONSerializer)
        return list(FailedJobRegistry(queue=queue).get_job_ids())

    # -- reading ---------------------------------------------------------------------------------

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.db.transaction() as tx:
            return tx.execute(sql, params).fetchall()

    def ledger(self) -> dict[str, tuple[str, int]]:
        """``webhook_events``: each event id with its status and number of attempts."""
        rows = self.rows("SELECT id, status, attempts FROM webhook_events")
        return {event_id: (status, attempts) for event_id, status, attempts in rows}

    def every_row(self) -> list[list[dict[str, Any]]]:
        """Every row of the synced tables, deleted ones included, bank data decrypted: what two runs
        that must leave the same state are compared by."""
        return [self.reader.select(table, cols.split(", ")) for table, cols in COMPARED]

    def tables(self) -> dict[str, dict[Any, dict[str, Any]]]:
        """Live Bridge rows in the shape of the fake's ground truth."""
        out: dict[str, dict[Any, dict[str, Any]]] = {"items": {}, "accounts": {}, "transactions": {}}
        for row in self.rows(
            "SELECT id, status, provider_id, last_try_refresh FROM items "
            "WHERE deleted_at IS NULL AND provider = 'bridge'"
        ):
            out["items"][row[0]] = {"status": row[1], "provider_id": row[2], "last_try_refresh": ts(row[3])}
        accounts = self.reader.select(
            "accounts", ["id", *ACCOUNT_COLUMNS], "deleted_at IS NULL AND provider = 'bridge'"
        )
        out["accounts"] = {a["id"]: _shape(ACCOUNT_FIELDS, [a[c] for c in ACCOUNT_COLUMNS]) for a in accounts}
        transactions = self.reader.select(
            "transactions",
            ["id", *TRANSACTION_COLUMNS],
            "deleted_at IS NULL AND account_id IN "
            "(SELECT id FROM accounts WHERE deleted_at IS NULL AND provider = 'bridge')",
        )
        out["transactions"] = {
            t["id"]: _shape(TRANSACTION_FIELDS, [t[c] for c in TRANSACTION_COLUMNS]) for t in transactions
        }
        return out

    def truth(self) -> dict[str, dict[Any, dict[str, Any]]]:
        """The fake's state, live objects only, in the same shape."""
        snap = self.world.snapshot()
        out: dict[str, dict[Any, dict[str, Any]]] = {"items": {}, "accounts": {}, "transactions": {}}
        for i in snap["items"].values():
            out["items"][i["id"]] = {
                "status": i.get("status"),
                "provider_id": i.get("provider_id"),
                "last_try_refresh": ts(i.get("last_try_refresh")),
            }
        synced_items = {i for i, v in out["items"].items() if v["status"] == 0}
        for a in snap["accounts"].values():
            if a["item_id"] not in synced_items:
                continue
            out["accounts"][a["id"]] = _shape(ACCOUNT_FIELDS, [a.get(f) for f in ACCOUNT_FIELDS])
        enabled = {k for k, a in out["accounts"].items() if a["data_access"] != "disabled"}
        for t in snap["transactions"].values():
            if t.get("deleted") or t["account_id"] not in enabled:
                continue
            out["transactions"][t["id"]] = _shape(TRANSACTION_FIELDS, [t.get(f) for f in TRANSACTION_FIELDS])
        return out


# Every column but our own bookkeeping times (users.updated_at, items.updated_at, last_synced_at).
COMPARED = (
    ("items", "id, user_uuid, status, provider_id, needs_user_action, last_try_refresh, deleted_at"),
    (
        "accounts",
        "id, item_id, name, balance, iban, data_access, bridge_updated_at, transactions_cursor, deleted_at",
    ),
    (
        "transactions",
        "id, account_id, amount, date, clean_description, future, bridge_updated_at, deleted_at",
    ),
)

ACCOUNT_FIELDS = [
    "item_id",
    "name",
    "type",
    "currency_code",
    "balance",
    "iban",
    "data_access",
    "pro",
    "updated_at",
]
TRANSACTION_FIELDS = [
    "account_id", "amount", "date", "clean_description", "provider_description", "category_id",
    "operation_type", "future", "updated_at",
]  # fmt: skip
# The same fields as the tables name them (Bridge's updated_at is our bridge_updated_at).
ACCOUNT_COLUMNS = [f.replace("updated_at", "bridge_updated_at") for f in ACCOUNT_FIELDS]
TRANSACTION_COLUMNS = [f.replace("updated_at", "bridge_updated_at") for f in TRANSACTION_FIELDS]


# How each compared field is normalised, whichever engine (or the fake) it comes from.
_NORMALISE: dict[str, Any] = {
    "balance": lambda v: dec(v),
    "amount": lambda v: dec(v),
    "pro": bool,
    "future": bool,
    "updated_at": lambda v: ts(v),
    "date": lambda v: None if v is None else str(v),
}


def _shape(fields: list[str], values: Any) -> dict[str, Any]:
    return {f: _NORMALISE.get(f, lambda v: v)(v) for f, v in zip(fields, values, strict=True)}


def ts(value: Any) -> str | None:
    """Any timestamp (datetime, ISO text with Z or offset) as UTC ISO with milliseconds."""
    if value is None:
        return None
    parsed = to_datetime(str(value).replace("Z", "+00:00")) if not isinstance(value, datetime) else value
    assert parsed is not None
    return parsed.astimezone(UTC).isoformat(timespec="milliseconds")


def dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


@contextmanager
def storage_at(url: str) -> Iterator[Storage]:
    """A Storage on ``url``, its schema up to date, closed afterwards."""
    db = Database.from_url(url)
    upgrade(db)
    try:
        yield Storage(db)
    finally:
        db.close()


@contextmanager
def pg_schema() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards; fails the test (never
    skips it) when PostgreSQL is unreachable."""
    import uuid

    import psycopg

    schema = f"bh_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_URL} is required by this test and unreachable: {exc}", pytrace=False)
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    with pg_schema() as url:
        yield url
