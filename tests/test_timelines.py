"""Timelines the model (tests/test_model.py) found breaking the promise, shrunk by hypothesis and
written out by hand: each one a plain story on the real pipeline, on SQLite and PostgreSQL, kept as a
regression test now that its fix has landed.

Each ends as the model's ``settle`` does: the queue drains, one reconciliation sweep runs and its jobs
drain; then the tables must equal Bridge's state (as tests.test_model.expected_and_observed reads
it) and no dead letter may have failed for a transient reason. The comments say the root cause each
one had.
"""

from __future__ import annotations

from typing import Any

from fakebridge.world import World
from tests.harness import Harness
from tests.test_model import expected_and_observed, settle_and_compare
from workers.replay import Enqueuer


def bank(
    world: World, accounts: int = 1, transactions: int = 3, *, user: str | None = None
) -> dict[str, Any]:
    """An item at the fake (a new user's, unless ``user``) with its accounts and transactions."""
    user = user or world.add_user()
    item = world.add_item(user)
    ids = [world.add_account(item, name=f"Compte {n}") for n in range(accounts)]
    for account in ids:
        if transactions:
            world.add_transactions(account, transactions)
    return {"user": user, "item": item, "accounts": ids}


def settle(h: Harness) -> None:
    """Drain, one reconciliation sweep, drain, then the promise: tables equal to Bridge, and dead
    letters only for permanent reasons (the model's own settle)."""
    enqueuer = Enqueuer(h.r, h.settings)
    settle_and_compare(h, lambda: enqueuer.sweep("timeline"), expected_and_observed, "Bridge")


# -- deletions were learned from webhooks only ----------------------------------------------------------
# Root cause: nothing compares Bridge's listings with our rows. Reconciler._user lists the user's items
# at Bridge and looks only at those it lists: an item we hold that Bridge no longer lists is left live.
# Syncer.sync_item upserts the accounts Bridge lists for the item and never marks the item's other
# accounts. A deleted user's token request answers 404, which the sweep (and every job) takes as
# "nothing to do". So a lost item.deleted, item.account.deleted or user.deleted (Bridge gives up
# retrying after a day or two) leaves its rows live forever. (Known bug 6, a stale item answered 404
# and resynced forever, is a neighbour: its fix may mark such an item once it turns stale, two days on;
# the sweep sees the item missing from Bridge's listing at once.)


def test_a_lost_item_deleted_leaves_the_item_live(harness: Harness, world: World) -> None:
    """Model, shrunk: an item deleted at Bridge whose item.deleted never arrives; the sweep lists the
    user's items, which no longer include it, and leaves it (and its account) live."""
    kept = bank(world)
    gone = bank(world, user=kept["user"])
    harness.send(world.event_item_created(kept["item"]))
    harness.send(world.event_item_created(gone["item"]))
    harness.drain()
    world.delete_item(gone["item"])  # item.deleted is lost
    settle(harness)


def test_a_lost_account_deleted_leaves_the_account_live(harness: Harness, world: World) -> None:
    """An account deleted at Bridge whose item.account.deleted never arrives: later refreshes sync the
    item, whose listing no longer shows the account, and the account stays live."""
    b = bank(world, accounts=2)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    world.delete_account(b["accounts"][1])  # item.account.deleted is lost
    world.set_item_status(b["item"], 0)
    harness.send(world.event_item_refreshed(b["item"]))
    settle(harness)


def test_a_lost_user_deleted_leaves_the_user_live(harness: Harness, world: World) -> None:
    """A user deleted at Bridge whose user.deleted never arrives: the sweep's token request answers 404,
    taken as nothing to do."""
    b = bank(world)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    world.delete_user(b["user"])  # user.deleted is lost
    settle(harness)


# -- known bug 3: a real label containing "XXXX" is stored as NULL -------------------------------------


def test_a_real_label_with_xxxx_is_kept(harness: Harness, world: World) -> None:
    """Model, shrunk: Bridge relabels a transaction "CB XXXX 4821 AMAZON" (a masked card number, the
    item in status 0: nothing is obfuscated); the delta brings it, and we keep the old label (the upsert
    keeps the stored value over a NULL) or store NULL for a new row."""
    b = bank(world)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    [account] = b["accounts"]
    txn = sorted(harness.tables()["transactions"])[0]
    world.update_transaction(txn, clean_description="CB XXXX 4821 AMAZON")
    world.add_transactions(account, 1)
    new = max(world.snapshot()["transactions"])
    world.update_transaction(new, clean_description="CB XXXX 4821 AMAZON")
    world.set_item_status(b["item"], 0)
    harness.send(world.event_item_refreshed(b["item"]))
    harness.send(world.event_account(account, "updated"))
    settle(harness)


# -- one account's sync hid a refresh of the others from the sweep -------------------------------------
# Root cause: Syncer.sync_account (item.account.created/updated) writes the item first (_write_item →
# Storage.upsert_item), last_successful_refresh included, though it fetches one account only. The sweep
# (Reconciler._user) finds refreshes whose webhooks were lost by comparing Bridge's
# last_successful_refresh with ours: once one account's event has carried the new value in, the sweep
# sees nothing missed, and the other accounts' changes (their webhooks lost) are never fetched.


def test_one_accounts_event_hides_the_lost_refresh_of_another(harness: Harness, world: World) -> None:
    """A refresh brings new transactions to the second account; of its webhooks only the first
    account's item.account.updated arrives. (The model's shrunk timeline: three accounts; a refresh
    whose webhooks are all lost, then a late item.account.updated of an earlier refresh arrives and
    carries the new last_successful_refresh in: the other accounts keep their old balances.)"""
    b = bank(world, accounts=2)
    harness.send(world.event_item_created(b["item"]))
    harness.drain()
    first, second = b["accounts"]
    world.add_transactions(second, 2)
    world.set_item_status(b["item"], 0)  # the refresh: item.refreshed and second's event are lost
    harness.send(world.event_account(first, "updated"))
    settle(harness)
