"""What items need (workers.actions) through `bridgehook items attention` and the scheduler's metrics,
and the retention of users Bridge deleted (workers.erasure through the sweep and the job), on SQLite
and PostgreSQL, with real Redis, the fake Bridge over HTTP and RQ workers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from bridgehook.cli import main
from fakebridge.world import World, iso_ms
from tests.harness import Harness, worker_settings
from tests.support import TEST_ENCRYPTION_KEY
from workers import context
from workers.actions import ACTIONS, action
from workers.db import to_datetime
from workers.observe import StatusCollector
from workers.reconcile import Reconciler

NOW = datetime(2026, 12, 1, tzinfo=UTC)
DAY = timedelta(days=1)
USER_TABLES = ("users", "items", "accounts", "transactions", "webhook_events", "connect_sessions")


@pytest.mark.parametrize(
    ("status", "changed", "expires", "expected"),
    [
        (0, None, None, None),
        (402, None, None, "update_credentials"),
        (1007, None, None, "complete_sca"),
        (1009, None, None, "complete_sca"),
        (1010, None, None, "complete_sca"),
        (1100, None, None, "validate_pro_account"),
        (429, None, None, "act_on_bank_site"),
        (430, None, None, "renew_password"),
        (-2, None, None, "wait"),
        (-3, None, None, "wait"),
        (1003, NOW - timedelta(hours=23), None, "wait"),
        (1003, NOW - timedelta(hours=24), None, "contact_support"),
        (0, None, NOW + 14 * DAY, "renew_consent"),
        (0, None, NOW + 15 * DAY, None),
        (0, None, NOW - DAY, "renew_consent"),  # ended already
        (402, None, NOW + DAY, "update_credentials"),  # Connect renews both at once
        (1005, None, None, None),
    ],
)
def test_each_status_has_its_action(
    status: int, changed: datetime | None, expires: datetime | None, expected: str | None
) -> None:
    assert action(status, changed, expires, NOW, 14 * DAY) == expected


def _items(world: World, harness: Harness) -> dict[str, int]:
    """One item per situation at the fake, synced through the receiver and the workers."""
    user = world.add_user("app-attention")
    soon = iso_ms(int((datetime.now(UTC) + 3 * DAY).timestamp() * 1000))
    later = iso_ms(int((datetime.now(UTC) + 90 * DAY).timestamp() * 1000))
    made = {
        "ok": world.add_item(user, authentication_expires_at=later),
        "consent": world.add_item(user, authentication_expires_at=soon),
        "credentials": world.add_item(user, status=402),
        "pro": world.add_item(user, status=1100),
    }
    for item in made.values():
        harness.send(world.event_item_created(item))
    harness.drain()
    return made


def _cli(harness: Harness, tmp_path: Path, *args: str) -> Result:
    s = harness.settings
    env = {"REDIS_URL": s.redis_url or "", "DATABASE_URL": s.database_url,
           "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY, "BRIDGEHOOK_HOME": str(tmp_path / "home")}  # fmt: skip
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_items_attention_lists_by_action_oldest_first(harness: Harness, world: World, tmp_path: Path) -> None:
    assert _cli(harness, tmp_path, "items", "attention").exit_code == 0  # nothing yet: 0
    made = _items(world, harness)
    answer = _cli(harness, tmp_path, "items", "attention", "--json")
    assert answer.exit_code == 1  # something needs attention
    listed = json.loads(answer.stdout)
    assert {i["item_id"]: i["action"] for i in listed["items"]} == {
        made["consent"]: "renew_consent", made["credentials"]: "update_credentials",
        made["pro"]: "validate_pro_account",
    }  # fmt: skip
    assert listed["by_action"] == {"renew_consent": 1, "update_credentials": 1, "validate_pro_account": 1}
    since = [i["since"] for i in listed["items"]]
    assert since == sorted(since)
    table = _cli(harness, tmp_path, "items", "attention")
    assert "update_credentials" in table.stdout and table.exit_code == 1


def test_the_scheduler_exports_items_per_action(harness: Harness, world: World) -> None:
    _items(world, harness)
    ctx = context.current()
    families = {m.name: m for m in StatusCollector(ctx.settings, ctx.redis, ctx.storage).collect()}
    by_action = {s.labels["action"]: s.value for s in families["bridgehook_items_by_action"].samples}
    assert set(by_action) == set(ACTIONS)
    assert by_action["update_credentials"] == by_action["validate_pro_account"] == 1
    assert by_action["renew_consent"] == 1 and by_action["contact_support"] == 0
    [expiring] = families["bridgehook_items_consent_expiring_7d"].samples
    assert expiring.value == 1


def _deleted_user(world: World, harness: Harness) -> str:
    user = world.add_user("app-leaving")
    item = world.add_item(user)
    world.add_transactions(world.add_account(item), 5)
    harness.send(world.event_item_created(item))
    harness.drain()
    world.delete_user(user)
    harness.send(world.event_user_deleted(user))
    harness.drain()
    return user


def _rows(harness: Harness) -> dict[str, Any]:
    return {t: harness.rows(f"SELECT count(*) FROM {t}")[0][0] for t in USER_TABLES}  # noqa: S608


def test_a_user_bridge_deleted_is_erased_after_the_retention(harness: Harness, world: World) -> None:
    user = _deleted_user(world, harness)
    [(deleted_at,)] = harness.rows("SELECT deleted_at FROM users WHERE uuid = %s", (user,))
    assert deleted_at is not None and _rows(harness)["transactions"] == 5  # marked, kept for now
    deleted = to_datetime(deleted_at)
    assert deleted is not None  # the event's time (the harness's events are dated 2023)
    Reconciler(context.current(), now=lambda: deleted + 29 * DAY).run()
    assert _rows(harness)["transactions"] == 5
    counts = Reconciler(context.current(), now=lambda: deleted + 31 * DAY).run()
    assert counts["erased"] == 1
    assert _rows(harness) == dict.fromkeys(USER_TABLES, 0)
    assert harness.rows("SELECT uuid FROM erased_users") == [(user,)]


def test_no_retention_erases_at_once(
    redis_url: str, r: Any, database_url: str, world: World, fake: Any
) -> None:
    settings = worker_settings(redis_url, database_url, fake.api_url, world, DELETED_USER_RETENTION_DAYS="0")
    harness = Harness(settings, world, fake, r)
    try:
        _deleted_user(world, harness)
        assert _rows(harness) == dict.fromkeys(USER_TABLES, 0)
    finally:
        harness.close()
