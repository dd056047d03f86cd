"""One listing of the user's transactions (``GET /transactions?since=`` without ``account_id``) for an
item's accounts that have a cursor, instead of one listing per account: fewer of Bridge's requests,
the same rows. On SQLite and PostgreSQL, against the fake Bridge over HTTP."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any

from fakebridge.world import World
from tests.harness import Harness
from tests.test_budgets import fast_budget, run_to_the_end, scheduled
from workers import context
from workers.writer import Writer


def bank(world: World, accounts: int = 3, per_account: int = 20) -> dict[str, Any]:
    user = world.add_user(external_user_id="app-user-1")
    item = world.add_item(user)
    account_ids = [world.add_account(item, name=f"Compte {n}") for n in range(accounts)]
    for account in account_ids:
        world.add_transactions(account, per_account)
    return {"user": user, "item": item, "accounts": account_ids}


def synced(harness: Harness, world: World, b: dict[str, Any]) -> None:
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    assert harness.tables() == harness.truth()


def listings(world: World) -> list[str]:
    """The query of each transactions request since the last reset."""
    return [r.query for r in world.requests if r.path.endswith("/transactions")]


def held(harness: Harness, account_id: int) -> set[int]:
    rows = harness.rows("SELECT id FROM transactions WHERE account_id = %s", (account_id,))
    return {row[0] for row in rows}


def test_an_items_accounts_are_listed_in_one_request(harness: Harness, world: World) -> None:
    """Three accounts with a cursor, two of them changed (new, updated and deleted transactions): one
    request without ``account_id``, and every change written, the deletion marked."""
    b = bank(world)
    synced(harness, world, b)
    first, second, _ = b["accounts"]
    [gone, changed] = sorted(held(harness, first))[:2]
    world.delete_transaction(gone)
    world.update_transaction(changed, amount="-12.34")
    new = world.add_transactions(second, 4)
    world.set_item_status(b["item"], 0)
    world.reset_requests()

    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()

    [query] = listings(world)
    assert "account_id" not in query and "since=" in query
    assert set(new) <= held(harness, second)
    assert harness.tables() == harness.truth()
    assert harness.rows("SELECT deleted_at IS NOT NULL FROM transactions WHERE id = %s", (gone,)) == [(True,)]
    assert harness.failed_ids() == []


def test_the_users_other_accounts_are_left_out(harness: Harness, world: World) -> None:
    """The user's listing also shows an account whose data access is disabled and the accounts of the
    user's other item: none of their rows is written by this item's sync (the other item's are its
    own sync's, under its own lock)."""
    b = bank(world, accounts=2)
    disabled = world.add_account(b["item"], name="Fermé", data_access="disabled")
    other_item = world.add_item(b["user"])
    other = world.add_account(other_item, name="Ailleurs")
    world.add_transactions(other, 5)
    for item in (b["item"], other_item):
        harness.send(world.event_item_created(item))
    harness.drain()
    assert harness.tables() == harness.truth()
    world.add_transactions(disabled, 3)
    later = world.add_transactions(other, 3)
    world.add_transactions(b["accounts"][0], 2)
    world.set_item_status(b["item"], 0)
    world.reset_requests()

    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()

    assert len(listings(world)) == 1
    assert held(harness, disabled) == set()
    assert not set(later) & held(harness, other)
    world.set_item_status(other_item, 0)
    harness.send(world.event_item_refreshed(other_item))
    harness.drain()
    assert set(later) <= held(harness, other)
    assert harness.tables() == harness.truth()
    assert harness.failed_ids() == []


def test_a_users_listing_goes_on_where_a_spent_budget_stopped_it(
    harness: Harness, world: World, redis_url: str
) -> None:
    """Two accounts changed by 2,800 transactions together, six pages of the user's listing, under a user
    budget of five requests per few seconds: the listing stops, its position saved with both accounts,
    and goes on from there. Each page is fetched once; the cursors move only with the last page."""
    b = bank(world, accounts=2, per_account=5)
    synced(harness, world, b)
    for account in b["accounts"]:
        world.add_transactions(account, 1400)
    world.set_item_status(b["item"], 0)
    fast_budget(harness, world, redis_url, "5/6")
    context.configure(None)  # the next run builds its context with that budget
    time.sleep(6.1)  # once the first sync's requests have left its window
    world.reset_requests()

    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()
    assert len(scheduled(harness)) == 1
    saved = harness.rows("SELECT listing FROM accounts WHERE listing IS NOT NULL")
    assert len(saved) == 2 and '"group"' in saved[0][0]
    run_to_the_end(harness)

    queries = listings(world)
    assert len(queries) == 6 and not any("account_id" in q for q in queries)  # each page once
    assert harness.failed_ids() == []
    assert harness.tables() == harness.truth()
    assert harness.rows("SELECT listing FROM accounts") == [(None,), (None,)]


def refresh_with_new_transactions(harness: Harness, world: World, b: dict[str, Any]) -> None:
    """Two new transactions in each account, and the refresh that announces them, processed."""
    for account in b["accounts"]:
        world.add_transactions(account, 2)
    world.set_item_status(b["item"], 0)
    world.reset_requests()
    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()


def test_a_users_listing_bridge_will_not_resume_starts_again(harness: Harness, world: World) -> None:
    """The saved position of a listing of the user's whose next_uri Bridge refuses (400): the listing
    starts again from page 1 for the same accounts, rather than failing the job for good."""
    b = bank(world, accounts=2)
    synced(harness, world, b)
    cursors = dict(harness.rows("SELECT id, transactions_cursor FROM accounts"))
    state = {
        "next": "/v3/aggregation/transactions?limit=500&after=expired",
        "since": str(min(cursors.values())), "newest": None, "future": [], "reset": False,
        "started": datetime.now().astimezone().isoformat(), "group": b["accounts"],
    }  # fmt: skip
    with harness.db.transaction() as tx:
        tx.execute("UPDATE accounts SET listing = %s", (json.dumps(state),))
    refresh_with_new_transactions(harness, world, b)

    statuses = [r.status for r in world.requests if r.path.endswith("/transactions")]
    assert statuses == [400, 200] and not any("account_id" in q for q in listings(world))
    assert harness.failed_ids() == []
    assert harness.tables() == harness.truth()
    assert harness.rows("SELECT listing FROM accounts") == [(None,), (None,)]


def test_an_account_whose_cursor_is_far_behind_is_listed_on_its_own(harness: Harness, world: World) -> None:
    """Two accounts' cursors within a day of each other are listed together; a third's, two days
    behind, on its own: listed with the others, it would make the listing read two days of theirs."""
    b = bank(world)
    synced(harness, world, b)
    behind = b["accounts"][2]
    cursor = Writer(harness.db).cursor(behind)
    assert cursor is not None
    with harness.db.transaction() as tx:
        tx.execute(
            "UPDATE accounts SET transactions_cursor = %s WHERE id = %s", (cursor - timedelta(days=2), behind)
        )
    refresh_with_new_transactions(harness, world, b)

    queries = listings(world)
    assert len(queries) == 2
    assert sum("account_id" not in q for q in queries) == 1
    assert sum(f"account_id={behind}" in q for q in queries) == 1
    assert harness.tables() == harness.truth()


def test_pages_with_none_of_the_groups_rows_are_not_read_twice(
    harness: Harness, world: World, redis_url: str
) -> None:
    """The user's other item changed by 1,500 transactions, the item's two accounts by one each: the
    listing's first three pages hold none of the group's rows. A spent budget stops it after two of
    them; the next attempt goes on after those (their position was saved, rows or none), instead of
    reading them again on every attempt until the job died of deferrals without progress."""
    b = bank(world, accounts=2, per_account=5)
    other_item = world.add_item(b["user"])
    other = world.add_account(other_item, name="Ailleurs")
    for item in (b["item"], other_item):
        harness.send(world.event_item_created(item))
    harness.drain()
    world.add_transactions(other, 1500)
    for account in b["accounts"]:
        world.add_transactions(account, 1)
    world.set_item_status(b["item"], 0)
    fast_budget(harness, world, redis_url, "4/4")  # the item, its accounts, two pages
    context.configure(None)
    time.sleep(4.1)
    world.reset_requests()

    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()
    assert len(scheduled(harness)) == 1
    assert len(listings(world)) == 2
    run_to_the_end(harness)

    queries = listings(world)
    assert len(queries) == 4 == len(set(queries))  # each page once
    assert harness.failed_ids() == []
    world.set_item_status(other_item, 0)  # the other item's rows are its own sync's
    harness.send(world.event_item_refreshed(other_item))
    run_to_the_end(harness)
    assert harness.tables() == harness.truth()
