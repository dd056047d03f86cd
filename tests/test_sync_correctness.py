"""The tables equal Bridge's current state after timelines the everyday tests do not drive: replays of a
whole listing, labels that hold X's, late syncs after deletions, accounts and items gone at Bridge, and
the durability that the watermark of served events relies on. On SQLite and PostgreSQL, against the fake
Bridge over HTTP."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fakebridge.world import World
from tests.faults.support import wait_until
from tests.harness import Harness
from workers import context
from workers.db import Database
from workers.reconcile import Reconciler, stale_items
from workers.replay import Enqueuer
from workers.storage import Storage, clear, clear_iban


def bank(
    world: World, *, accounts: int = 2, per_account: int = 20, external: str = "app-user-1"
) -> dict[str, Any]:
    user = world.add_user(external_user_id=external)
    item = world.add_item(user)
    account_ids = [world.add_account(item, name=f"Compte {n}") for n in range(accounts)]
    for account in account_ids:
        world.add_transactions(account, per_account)
    return {"user": user, "item": item, "accounts": account_ids}


def synced(harness: Harness, world: World, **shape: int) -> dict[str, Any]:
    b = bank(world, **shape)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    assert harness.tables() == harness.truth()
    return b


def held(harness: Harness, account_id: int) -> list[int]:
    rows = harness.rows("SELECT id FROM transactions WHERE account_id = %s ORDER BY id", (account_id,))
    return [row[0] for row in rows]


def enqueuer(harness: Harness) -> Enqueuer:
    return Enqueuer(harness.r, harness.settings)


# -- 1. a whole listing never steps over a deletion ------------------------------------------------------
def test_a_replayed_item_created_marks_what_bridge_deleted_meanwhile(harness: Harness, world: World) -> None:
    """No event announced the deletion; newer transactions came after it. A whole listing shows live
    transactions only and moves the cursor past the deletion: listed since its cursor first, the account
    learns of it."""
    b = synced(harness, world)
    first = b["accounts"][0]
    victim = held(harness, first)[5]
    world.delete_transaction(victim)
    world.add_transactions(first, 2)  # updated after the deletion: the whole listing's newest

    harness.send(world.event_item_created(b["item"]))  # replayed (a new delivery of the same kind)
    harness.drain()

    assert harness.tables() == harness.truth()
    [(deleted_at,)] = harness.rows("SELECT deleted_at FROM transactions WHERE id = %s", (victim,))
    assert deleted_at is not None
    assert harness.failed_ids() == []


def test_a_resync_replaces_a_cursor_from_the_future_and_marks_deletions(
    harness: Harness, world: World
) -> None:
    b = synced(harness, world, accounts=1)
    account = b["accounts"][0]
    victim = held(harness, account)[3]
    world.delete_transaction(victim)
    with harness.db.transaction() as tx:  # a cursor pushed too far by some bug
        tx.execute(
            "UPDATE accounts SET transactions_cursor = %s WHERE id = %s",
            (datetime.now(UTC) + timedelta(days=30), account),
        )

    enqueuer(harness).resync_item(b["item"], b["user"])
    harness.drain()

    [(cursor,)] = harness.rows("SELECT transactions_cursor FROM accounts WHERE id = %s", (account,))
    assert cursor is not None and str(cursor) < str(datetime.now(UTC) + timedelta(days=1))
    world.add_transactions(account, 1)  # the next delta sees what comes after
    harness.send(world.event_account(account, "updated"))
    harness.drain()
    assert harness.tables() == harness.truth()


# -- 3. only Bridge's mask is thrown away ----------------------------------------------------------------
def test_a_label_holding_x_is_bank_data(harness: Harness, world: World) -> None:
    b = bank(world, accounts=1, per_account=3)
    account = b["accounts"][0]
    [card] = world.add_transactions(account, 1)
    world.update_transaction(
        card,
        clean_description="CB CARTE 4974XXXXXXXX1234 MONOPRIX",
        provider_description="PAIEMENT CB 4974XXXXXXXX1234 PARIS",
    )
    world.update_account(account, name="SCI XXXXL")
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    assert harness.tables() == harness.truth()
    [row] = harness.reader.select(
        "transactions", ["clean_description", "provider_description"], f"id = {card}"
    )
    assert row == {
        "clean_description": "CB CARTE 4974XXXXXXXX1234 MONOPRIX",
        "provider_description": "PAIEMENT CB 4974XXXXXXXX1234 PARIS",
    }

    # Bridge's mask itself never overwrites what we hold (an item that went into 1100 mid-sync).
    world.update_transaction(card, clean_description="XXXX", provider_description="XXXX")
    harness.send(world.event_account(account, "updated"))
    harness.drain()
    [row] = harness.reader.select("transactions", ["clean_description"], f"id = {card}")
    assert row == {"clean_description": "CB CARTE 4974XXXXXXXX1234 MONOPRIX"}


def test_what_counts_as_the_mask() -> None:
    assert clear("XXXX") is None
    assert clear(" XXXXXXXX ") is None
    assert clear("CB CARTE 4974XXXXXXXX1234") == "CB CARTE 4974XXXXXXXX1234"
    assert clear("XXXX MONOPRIX") == "XXXX MONOPRIX"
    assert clear("XXX") == "XXX"
    assert clear(None) is None
    assert clear_iban("FR76XXXXXXXXXXXX") is None  # an IBAN never holds four X's in a row
    assert clear_iban("FR7630006000011234567890189") == "FR7630006000011234567890189"


# -- 4. deleted stays deleted ----------------------------------------------------------------------------
def test_a_sync_after_item_account_deleted_writes_nothing_under_it(harness: Harness, world: World) -> None:
    """item.account.deleted is handled first; Bridge still answers for the account a moment (a retry, a
    replay of an older event): the late syncs write no live row under it."""
    b = synced(harness, world)
    gone = b["accounts"][0]
    harness.send(world.event_account(gone, "deleted"))
    harness.drain()
    world.add_transactions(gone, 3)  # still listed by Bridge for a moment
    harness.send(world.event_account(gone, "updated"))
    world.set_item_status(b["item"], 0)
    harness.send(world.event_item_refreshed(b["item"]))
    harness.send(world.event_item_created(b["item"]))
    harness.drain()

    assert harness.rows("SELECT deleted_at IS NOT NULL FROM accounts WHERE id = %s", (gone,)) == [(True,)]
    assert len(held(harness, gone)) == 20  # nothing written under it since
    assert harness.failed_ids() == []


def test_a_sync_after_item_deleted_writes_nothing_under_it(harness: Harness, world: World) -> None:
    b = synced(harness, world, accounts=1)
    harness.send(world.event_item_deleted(b["item"]))
    harness.drain()
    late = world.add_account(b["item"])  # Bridge still answering for the item a moment
    world.add_transactions(late, 2)
    harness.send(world.event_account(late, "created"))
    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()

    assert harness.rows("SELECT count(*) FROM items WHERE deleted_at IS NULL") == [(0,)]
    assert harness.rows("SELECT count(*) FROM accounts WHERE deleted_at IS NULL") == [(0,)]
    assert harness.rows("SELECT count(*) FROM transactions WHERE account_id = %s", (late,)) == [(0,)]
    assert harness.failed_ids() == []


# -- 5. one gone account does not end the item's sync ----------------------------------------------------
def refresh_deleting_once_listed(harness: Harness, world: World, item: int, gone: int) -> None:
    """A refresh of the item whose sync finds ``gone`` deleted at Bridge once it has listed the item's
    accounts (each call takes 0.2 s at the fake)."""
    world.set_item_status(item, 0)
    world.reset_requests()
    world.faults.delay(0.2)

    def delete_once_listed() -> None:
        def listed() -> bool:
            return any(r.path.endswith("/accounts") for r in list(world.requests))

        wait_until(listed, 30, "the item's account listing", interval=0.005)
        world.delete_account(gone)

    deleter = threading.Thread(target=delete_once_listed)
    deleter.start()
    harness.send(world.event_item_refreshed(item))
    harness.drain()
    deleter.join()
    world.faults.clear()


def test_an_account_gone_mid_sync_is_marked_and_the_others_synced(harness: Harness, world: World) -> None:
    """The account is deleted at Bridge between the account listing and its transactions (each call
    takes 0.2 s at the fake): its listing answers 404. The item's other account (new: listed whole) is
    synced all the same. (The account is listed on its own: the item's only one with a cursor.)"""
    b = synced(harness, world, accounts=1)
    [gone] = b["accounts"]
    other = world.add_account(b["item"], name="Nouveau")
    new = world.add_transactions(other, 4)
    refresh_deleting_once_listed(harness, world, b["item"], gone)

    listings = [r for r in world.requests if r.path.endswith("/transactions")]
    assert [r.status for r in listings if f"account_id={gone}" in r.query] == [404]
    assert set(new) <= set(held(harness, other))
    assert harness.rows("SELECT deleted_at IS NOT NULL FROM accounts WHERE id = %s", (gone,)) == [(True,)]
    assert harness.tables() == harness.truth()
    assert harness.failed_ids() == []


def test_an_account_gone_mid_users_listing_is_marked_by_its_event(harness: Harness, world: World) -> None:
    """Accounts listed together by one listing of the user's: the account deleted at Bridge after the
    account listing is no longer in it (no 404 to tell), so the sync writes the other's rows and leaves
    the gone one as it was; Bridge's ``item.account.deleted`` marks it."""
    b = synced(harness, world)
    gone, other = b["accounts"]
    new = world.add_transactions(other, 4)
    world.add_transactions(gone, 2)
    refresh_deleting_once_listed(harness, world, b["item"], gone)

    assert set(new) <= set(held(harness, other))
    assert harness.rows("SELECT deleted_at IS NULL FROM accounts WHERE id = %s", (gone,)) == [(True,)]
    harness.send(world.event_account(gone, "deleted"))
    harness.drain()
    assert harness.rows("SELECT deleted_at IS NOT NULL FROM accounts WHERE id = %s", (gone,)) == [(True,)]
    assert harness.tables() == harness.truth()
    assert harness.failed_ids() == []


def test_an_account_event_for_a_gone_account_marks_it(harness: Harness, world: World) -> None:
    b = synced(harness, world)
    gone = b["accounts"][1]
    event = world.event_account(gone, "updated")
    world.delete_account(gone)  # its item.account.deleted never reaches us
    harness.send(event)
    harness.drain()
    assert harness.rows("SELECT deleted_at IS NOT NULL FROM accounts WHERE id = %s", (gone,)) == [(True,)]
    assert harness.tables() == harness.truth()


def test_an_account_bridge_no_longer_lists_is_marked(harness: Harness, world: World) -> None:
    b = synced(harness, world)
    gone = b["accounts"][0]
    world.delete_account(gone)  # its item.account.deleted is lost
    world.set_item_status(b["item"], 0)
    harness.send(world.event_item_refreshed(b["item"]))
    harness.drain()
    assert harness.rows("SELECT deleted_at IS NOT NULL FROM accounts WHERE id = %s", (gone,)) == [(True,)]
    assert harness.tables() == harness.truth()


# -- 6. a gone item is marked, and left alone ------------------------------------------------------------
def test_a_stale_item_bridge_answers_404_for_is_marked_gone(harness: Harness, world: World) -> None:
    b = synced(harness, world, accounts=1)
    world.delete_item(b["item"])  # its item.deleted never reaches us
    storage = Storage(harness.db)
    later = datetime.now(UTC) + timedelta(days=3)
    assert stale_items(storage, later, timedelta(days=2)) == [(b["item"], b["user"])]

    enqueuer(harness).resync_item(b["item"], b["user"])  # what the sweep does for a stale item
    harness.drain()

    assert harness.rows("SELECT deleted_at IS NOT NULL FROM items") == [(True,)]
    assert harness.rows("SELECT count(*) FROM accounts WHERE deleted_at IS NULL") == [(0,)]
    assert stale_items(storage, later, timedelta(days=2)) == []  # the next sweep leaves it alone
    assert harness.failed_ids() == []


def sweep(harness: Harness) -> dict[str, int]:
    harness.drain()  # builds the worker context too
    return Reconciler(context.current()).run()


def another_item(harness: Harness, world: World, user: str) -> int:
    """A second item of ``user`` at the fake, with an account of two transactions, synced."""
    item = world.add_item(user)
    world.add_transactions(world.add_account(item), 2)
    harness.send(world.event_item_created(item))
    harness.drain()
    return item


def test_the_sweep_finds_an_item_deleted_without_a_webhook(harness: Harness, world: World) -> None:
    b = synced(harness, world)
    another_item(harness, world, b["user"])
    world.delete_item(b["item"])  # its item.deleted never reaches us

    assert sweep(harness)["gone"] == 1
    harness.drain()

    assert harness.rows("SELECT id FROM items WHERE deleted_at IS NOT NULL") == [(b["item"],)]
    assert harness.tables() == harness.truth()
    assert sweep(harness)["gone"] == 0  # and it is left alone


def test_the_sweep_finds_a_user_deleted_without_a_webhook(harness: Harness, world: World) -> None:
    b = synced(harness, world)
    kept = another_item(harness, world, world.add_user(external_user_id="app-user-2"))
    world.delete_user(b["user"])  # its user.deleted never reaches us

    assert sweep(harness)["gone"] == 1
    harness.drain()

    assert harness.rows("SELECT uuid FROM users WHERE deleted_at IS NOT NULL") == [(b["user"],)]
    assert harness.rows("SELECT id FROM items WHERE deleted_at IS NULL") == [(kept,)]
    assert harness.tables() == harness.truth()
    assert sweep(harness)["users"] == 1  # only the user left
    assert harness.failed_ids() == []


def test_the_sweep_deletes_nobody_when_bridge_knows_none_of_several_users(
    harness: Harness, world: World
) -> None:
    """Every one of several users unknown at once is likelier a wrong BRIDGE_API_URL or credentials than
    every customer leaving: a deletion is never undone, so the sweep only warns. A lone user (a
    deployment with one) is deleted."""
    b = synced(harness, world)
    other = bank(world, accounts=1, per_account=2, external="app-user-2")
    harness.send(world.event_item_created(other["item"]))
    harness.drain()
    world.delete_user(b["user"])
    world.delete_user(other["user"])
    counts = sweep(harness)
    harness.drain()
    assert (counts["users"], counts["gone"]) == (0, 0)
    assert harness.rows("SELECT count(*) FROM items WHERE deleted_at IS NULL") == [(2,)]


def test_the_sweep_deletes_a_lone_user_bridge_no_longer_knows(harness: Harness, world: World) -> None:
    b = synced(harness, world)
    world.delete_user(b["user"])
    assert sweep(harness)["gone"] == 1
    harness.drain()
    assert harness.rows("SELECT count(*) FROM items WHERE deleted_at IS NULL") == [(0,)]
    assert harness.tables() == harness.truth()


def test_the_sweep_leaves_an_item_we_marked_deleted_alone(harness: Harness, world: World) -> None:
    """item.deleted handled while Bridge still lists the item: the sweep neither calls it new nor
    resyncs it (which would stop at once, on every sweep)."""
    b = synced(harness, world, accounts=1)
    harness.send(world.event_item_deleted(b["item"]))
    harness.drain()
    counts = sweep(harness)
    assert (counts["new_items"], counts["gone"], counts["deltas"]) == (0, 0, 0)
    assert harness.r.llen(f"rq:queue:{harness.settings.queue_name}") == 0


# -- 7. SQLite: the commit a watermark relies on is durable ----------------------------------------
def test_a_durable_sqlite_transaction_syncs_its_commit(tmp_path: Path) -> None:
    """In WAL mode with synchronous=NORMAL a commit may be lost to a power failure; the commit that ends a
    job (after which Redis records what its sync served) runs with synchronous=FULL."""
    db = Database.from_url(f"sqlite:///{tmp_path / 'bridgehook.db'}")
    try:
        with db.transaction() as tx:
            assert tx.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        with db.transaction(durable=False) as tx:
            assert tx.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        try:
            with db.transaction() as tx:
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        with db.transaction(durable=False) as tx:
            assert tx.execute("PRAGMA synchronous").fetchone() == (1,)
    finally:
        db.close()
