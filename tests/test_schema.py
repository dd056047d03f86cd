"""The schema check the worker and the scheduler start with: read-only, so that they run as a
database role without DDL rights, and answer at once while an upgrade is in progress."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from service.settings import Settings
from tests.harness import Harness, worker_environ, worker_settings
from workers.db import Database
from workers.runner import run_worker
from workers.scheduler import run_scheduler
from workers.schema import _LOCK_ID, MIGRATIONS, SchemaNotReady, pending, upgrade

LATEST = MIGRATIONS[-1][0]


def schema_of(url: str) -> str:
    """The schema a pg_schema_url selects (``…options=-csearch_path%3D<schema>``)."""
    return url.rsplit("search_path%3D", 1)[1]


@contextmanager
def runtime_role(url: str) -> Iterator[tuple[str, psycopg.Connection]]:
    """A login role that may use the URL's schema and nothing more (no CREATE on it); its URL and an
    administrator's connection to grant it what docs/deploy.md says; dropped afterwards."""
    role = f"bh_runtime_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(url, autocommit=True)
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"GRANT USAGE ON SCHEMA {schema_of(url)} TO {role}")
    parts = urlsplit(url)
    try:
        yield urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}")), admin
    finally:
        admin.execute(f"DROP OWNED BY {role}")  # its privileges
        admin.execute(f"DROP ROLE {role}")
        admin.close()


def grant_dml(admin: psycopg.Connection, url: str, runtime_url: str, *, to_come: bool = False) -> None:
    """The runtime role's privileges in docs/deploy.md, data and never structure: on the tables there
    are, or (``to_come``) on those the owner will create."""
    schema, owner, role = schema_of(url), urlsplit(url).username, urlsplit(runtime_url).username
    for what, objects in (("SELECT, INSERT, UPDATE, DELETE", "TABLES"), ("USAGE, SELECT", "SEQUENCES")):
        if to_come:
            admin.execute(
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} "
                f"GRANT {what} ON {objects} TO {role}"
            )
        else:
            admin.execute(f"GRANT {what} ON ALL {objects} IN SCHEMA {schema} TO {role}")


def migrate(url: str, *, drop_latest: bool = False) -> None:
    """Upgrade as the owner; with ``drop_latest``, undo the latest migration (a deploy's new one)."""
    db = Database.from_url(url)
    try:
        upgrade(db)
        if drop_latest:
            with db.transaction() as tx:
                tx.execute("ALTER TABLE accounts DROP COLUMN listing")
                tx.execute("DELETE FROM schema_migrations WHERE version = %s", (LATEST,))
    finally:
        db.close()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridgehook", *args], env={**os.environ, **env}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def test_a_role_without_ddl_rights_runs_the_worker_and_the_scheduler(
    redis_url: str, r: redis.Redis, pg_schema_url: str, world: World, fake: FakeBridgeServer
) -> None:
    owner = worker_settings(redis_url, pg_schema_url, fake.api_url, world, METRICS_PORT="0")
    with runtime_role(pg_schema_url) as (runtime_url, admin):
        grant_dml(admin, pg_schema_url, runtime_url, to_come=True)
        harness = Harness(owner, world, fake, r)  # migrates as the owner, and receives webhooks
        try:
            with psycopg.connect(runtime_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE schema_probe (id INTEGER)")  # the role really has no DDL
            runtime = dataclasses.replace(owner, database_url=runtime_url)
            user = world.add_user()
            item = world.add_item(user)
            account = world.add_account(item)
            world.add_transactions(account, 40)  # enough for a page to go through COPY
            assert harness.send(world.event_item_created(item)) == "queued"

            assert run_worker(runtime, burst=True)  # its check passed, and its job wrote the rows
            assert harness.rows("SELECT count(*) FROM transactions") == [(40,)]
            assert harness.rows("SELECT status FROM webhook_events") == [("done",)]
            run_scheduler(runtime, once=True)
            queue = Queue(owner.queue_name, connection=r, serializer=JSONSerializer)
            assert [job_id.startswith("reconcile-sweep-") for job_id in queue.get_job_ids()] == [True]
        finally:
            harness.close()


def test_pending_migrations_stop_the_worker_and_the_scheduler_without_ddl(
    redis_url: str, r: redis.Redis, pg_schema_url: str, world: World, fake: FakeBridgeServer
) -> None:
    with runtime_role(pg_schema_url) as (runtime_url, admin):
        env = worker_environ(redis_url, runtime_url, fake.api_url, world, METRICS_PORT="0")
        runtime = Settings.from_env(env)
        everything = list(range(1, LATEST + 1))
        refused = (
            "the database refused to read the schema's version (permission denied for table "
            "schema_migrations): grant DATABASE_URL's role the runtime privileges of docs/deploy.md, "
            "Database roles"
        )
        for missing in (everything, [LATEST]):  # an empty schema, then a deploy's new migration
            if missing != everything:
                migrate(pg_schema_url, drop_latest=True)
                done = cli("worker", "--burst", env=env)  # the owner's tables, and no grant yet
                assert (done.returncode, done.stderr) == (1, f"bridgehook: {refused}\n")
                grant_dml(admin, pg_schema_url, runtime_url)
            step = f"missing {missing}"
            expected = f"the database lacks migrations {missing}: run `bridgehook db upgrade` first"
            for run in (lambda: run_worker(runtime, burst=True), lambda: run_scheduler(runtime, once=True)):
                with pytest.raises(SchemaNotReady) as info:
                    run()
                assert str(info.value) == expected, step
            for command in (["worker", "--burst"], ["scheduler"]):  # the exit contract: 1, one line
                done = cli(*command, env=env)
                assert (done.returncode, done.stderr) == (1, f"bridgehook: {expected}\n"), (step, command)
        assert r.keys("rq:job:*") == []  # the scheduler enqueued nothing
        with psycopg.connect(pg_schema_url) as conn:  # and the runtime role created nothing
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (LATEST - 1,)


def test_the_check_answers_at_once_while_an_upgrade_holds_its_locks(pg_schema_url: str) -> None:
    """A second connection upgrades (the upgrades' advisory lock, the new column's exclusive lock on
    accounts, a row of schema_migrations) and has not committed: the check neither waits for it nor
    counts its migration; once it commits, the check passes. (A check that waited would meet its
    statement_timeout.)"""
    migrate(pg_schema_url, drop_latest=True)
    checking = Database.from_url(pg_schema_url + "%20-cstatement_timeout%3D5000")
    try:
        with psycopg.connect(pg_schema_url) as upgrading:
            upgrading.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            upgrading.execute("ALTER TABLE accounts ADD COLUMN listing TEXT")
            upgrading.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (%s, %s, %s)",
                (LATEST, "in progress", datetime.now(UTC)),
            )
            started = time.monotonic()
            assert pending(checking) == [LATEST]
            assert time.monotonic() - started < 2
            upgrading.commit()
        assert pending(checking) == []
    finally:
        checking.close()


def test_the_sqlite_check_reads_while_an_upgrade_holds_the_write_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bridgehook.db'}"
    migrate(url, drop_latest=True)
    checking = Database.from_url(url)
    upgrading = sqlite3.connect(tmp_path / "bridgehook.db", isolation_level=None)
    try:
        upgrading.execute("BEGIN IMMEDIATE")  # what an upgrade holds, the whole transaction long
        upgrading.execute("ALTER TABLE accounts ADD COLUMN listing TEXT")
        upgrading.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, 'x', 'now')",
            (LATEST,),
        )
        started = time.monotonic()
        assert pending(checking) == [LATEST]
        assert time.monotonic() - started < 2
        upgrading.execute("COMMIT")
        assert pending(checking) == []
    finally:
        upgrading.close()
        checking.close()
