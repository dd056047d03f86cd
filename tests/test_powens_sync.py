"""Powens's events through the whole pipeline: the real receiver, RQ workers, Redis and both
databases, against the fake Powens over HTTP. Whatever the order and the repetitions, our rows end
equal to the fake's ground truth, in the same tables as Bridge's."""

from __future__ import annotations

import copy
import hashlib
from datetime import UTC, datetime, timedelta

from fakebridge.powens_world import PUser
from fakebridge.world import render_json
from service import bearer
from tests.powens_harness import PowensHarness
from tests.support import powens_signed, powens_url
from workers import context, tokens
from workers.actions import action
from workers.providers import powens_user, stored_id
from workers.reconcile import Reconciler
from workers.replay import Enqueuer


def connected(ph: PowensHarness, user: PUser, accounts: int = 2, transactions: int = 5) -> int:
    """A connection whose accounts the user consented to (Powens's are disabled until then)."""
    connection = ph.pworld.add_connection(user.id, accounts=accounts, transactions=transactions)
    for account in [a for a in ph.pworld.accounts.values() if a.id_connection == connection.id]:
        ph.pworld.enable_account(account.id)
    return connection.id


def synced(ph: PowensHarness, connection_id: int, new: list[int] | None = None) -> None:
    assert ph.deliver("CONNECTION_SYNCED", ph.pworld.connection_synced(connection_id, new)) == "queued"
    ph.drain()
    assert ph.failed_ids() == []


def test_a_first_sync_lands_in_the_same_tables(ph: PowensHarness) -> None:
    user = ph.user()
    cid = connected(ph, user)
    synced(ph, cid)
    assert ph.powens_tables() == ph.powens_truth()
    assert len(ph.powens_tables()["transactions"]) == 10
    item = ph.item(cid)
    assert (item["status"], item["provider"], item["deleted_at"]) == (0, "powens", None)
    [(user_uuid, provider)] = ph.rows("SELECT uuid, provider FROM users")
    assert (user_uuid, provider) == (powens_user(user.id), "powens")
    [(kind, item_id, owner, provider)] = ph.rows(
        "SELECT type, item_id, user_uuid, provider FROM webhook_events"
    )
    assert (kind, item_id, owner, provider) == (
        "CONNECTION_SYNCED",
        stored_id(cid),
        powens_user(user.id),
        "powens",
    )


def test_updates_and_deletions_the_body_does_not_carry_come_from_the_listing(ph: PowensHarness) -> None:
    user = ph.user()
    cid = connected(ph, user)
    synced(ph, cid)
    world = ph.pworld
    first, second = sorted(world.transactions)[:2]
    world.update_transaction(first, value=world.transactions[first].value + 1)
    world.delete_transaction(second)
    account = next(a.id for a in world.accounts.values() if a.id_connection == cid)
    new = world.add_transaction(account, coming=True)
    synced(ph, cid, new=[new.id])  # the body carries the new one only
    assert ph.powens_tables() == ph.powens_truth()
    [(deleted_at,)] = ph.rows("SELECT deleted_at FROM transactions WHERE id = %s", (stored_id(second),))
    assert deleted_at is not None


def test_an_older_body_delivered_after_a_newer_one_changes_nothing(ph: PowensHarness) -> None:
    user = ph.user()
    cid = connected(ph, user)
    old = ph.pworld.connection_synced(cid)
    world = ph.pworld
    account = next(a for a in world.accounts.values() if a.id_connection == cid)
    account.balance += 100
    account.last_update = world.tick()
    changed = sorted(t for t in world.transactions if world.transactions[t].id_account == account.id)[0]
    world.update_transaction(changed, wording="CARTE RENAMED")
    world.set_state(cid, None)
    synced(ph, cid)
    before = ph.every_row()
    replayed = copy.deepcopy(old)
    replayed["id_webhook_data"] = world.webhook({})["id_webhook_data"]  # delivered again, days later
    assert ph.deliver("CONNECTION_SYNCED", replayed) == "queued"
    ph.drain()
    assert ph.failed_ids() == []
    assert ph.every_row() == before
    assert ph.powens_tables() == ph.powens_truth()


def test_a_connection_state_becomes_the_same_action_as_bridges(ph: PowensHarness) -> None:
    """(Every state's status: tests/test_powens_client.py.) A connection the user must repair is
    stored with its action and not listed; once usable again, what changed meanwhile is listed."""
    user = ph.user()
    cid = connected(ph, user)
    synced(ph, cid)
    now = datetime.now(UTC)
    for state, wanted in [
        ("wrongpass", "update_credentials"),
        ("somethingPowensAddsLater", "contact_support"),
    ]:
        ph.pworld.set_state(cid, state, "message")
        synced(ph, cid)
        item = ph.item(cid)
        assert (item["state"], item["needs_user_action"]) == (state, state == "wrongpass"), state
        assert action(item["status"], None, None, now, timedelta(days=14)) == wanted
    account = next(a.id for a in ph.pworld.accounts.values() if a.id_connection == cid)
    ph.pworld.add_transaction(account)
    ph.pworld.set_state(cid, None)
    synced(ph, cid, new=[])
    assert ph.item(cid)["status"] == 0
    assert ph.powens_tables() == ph.powens_truth()


def test_consent_withdrawn_and_given_again(ph: PowensHarness) -> None:
    user = ph.user()
    cid = connected(ph, user)
    synced(ph, cid)
    world = ph.pworld
    account = next(a for a in world.accounts.values() if a.id_connection == cid)
    world.disable_account(account.id)
    assert ph.deliver("ACCOUNT_DISABLED", world.webhook(world.render_account(account))) == "queued"
    ph.drain()
    tables = ph.powens_tables()
    assert tables == ph.powens_truth() and tables["accounts"][account.id]["disabled"]
    assert not [t for t in tables["transactions"].values() if t["account"] == account.id]
    world.enable_account(account.id)
    world.add_transaction(account.id)
    assert ph.deliver("ACCOUNT_ENABLED", world.webhook(world.render_account(account))) == "queued"
    ph.drain()
    assert ph.failed_ids() == []
    assert ph.powens_tables() == ph.powens_truth()


def test_a_deleted_connection_and_user_stay_deleted(ph: PowensHarness) -> None:
    user = ph.user()
    kept, dropped = connected(ph, user), connected(ph, user)
    synced(ph, kept)
    synced(ph, dropped)
    old = ph.pworld.connection_synced(dropped)
    ph.pworld.delete_connection(dropped)
    assert (
        ph.deliver("CONNECTION_DELETED", ph.pworld.webhook({"id": dropped, "id_user": user.id})) == "queued"
    )
    ph.drain()
    assert ph.item(dropped)["deleted_at"] is not None
    assert ph.deliver("CONNECTION_SYNCED", old) == "queued"  # late: deleted stays deleted
    ph.drain()
    assert ph.item(dropped)["deleted_at"] is not None
    assert ph.powens_tables() == ph.powens_truth()
    assert ph.deliver("USER_DELETED", ph.pworld.webhook({"id": user.id})) == "queued"
    ph.drain()
    assert ph.failed_ids() == []
    assert ph.item(kept)["deleted_at"] is not None
    assert ph.rows("SELECT user_uuid FROM user_tokens") == []


def test_without_a_token_the_body_lands_and_the_event_is_a_dead_letter(ph: PowensHarness) -> None:
    user = ph.user(token=False)
    cid = connected(ph, user)
    assert ph.deliver("CONNECTION_SYNCED", ph.pworld.connection_synced(cid)) == "queued"
    ph.drain()
    [failed] = ph.failed_ids()
    [(status, error)] = ph.rows("SELECT status, last_error FROM webhook_events WHERE id = %s", (failed,))
    assert status == "failed" and "no token" in error and user.token not in error
    assert ph.powens_tables() == ph.powens_truth()  # the body carried all there was


def test_powens_and_bridge_ids_never_meet(ph: PowensHarness) -> None:
    """The fakes count from different numbers: here a Bridge item takes the very id of a Powens
    connection, and each keeps its own rows."""
    user = ph.user()
    cid = connected(ph, user)
    account = next(a.id for a in ph.pworld.accounts.values() if a.id_connection == cid)
    uuid = ph.world.add_user()
    item_id = ph.world.add_item(uuid, item_id=cid)
    ph.world.add_transactions(ph.world.add_account(item_id, account_id=account), 3)
    assert ph.send(ph.world.event_item_created(item_id)) == "queued"
    synced(ph, cid)
    providers = dict(ph.rows("SELECT id, provider FROM items"))
    assert providers == {cid: "bridge", stored_id(cid): "powens"}
    bridge = ph.tables()
    assert bridge["items"].keys() == {cid} and bridge["accounts"].keys() == {account}
    assert len(bridge["transactions"]) == 3 and all(t > 0 for t in bridge["transactions"])
    assert ph.powens_tables() == ph.powens_truth()


def test_amounts_as_powens_writes_them_json_numbers(ph: PowensHarness) -> None:
    """Powens writes amounts as JSON numbers (``"balance": 310.0``, bridgehook/fixtures/powens/), not as
    the strings ``PowensHarness.deliver`` sends: the body's accounts and transactions land all the same."""
    cid = connected(ph, ph.user())
    raw = render_json(ph.pworld.connection_synced(cid)).encode()
    response = ph.receiver.post(powens_url("CONNECTION_SYNCED"), **powens_signed("CONNECTION_SYNCED", raw))
    assert response.json()["status"] == "queued"
    ph.drain()
    assert ph.rows("SELECT last_error FROM webhook_events WHERE status = 'failed'") == []
    assert ph.powens_tables() == ph.powens_truth()


def test_a_sweep_publishes_every_token_digest_and_a_deletion_removes_its_own(ph: PowensHarness) -> None:
    """For the receiver's bearer mode (service/bearer.py): the harness stores tokens without publishing
    them, as a Redis rebuilt from scratch would have them."""
    kept, gone = ph.user(), ph.user()
    with ph.db.transaction() as tx:  # a token before its user's first row, as `make run` stores the fake's
        tokens.store(tx, ph.codec, powens_user(9001), "powens", "token-of-a-user-with-no-row-yet")

    def published() -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in ph.r.hgetall(bearer.KEY).items()}

    def digest(user: PUser) -> str:
        return hashlib.sha256(user.token.encode()).hexdigest()

    def sweep() -> None:
        ph.drain()  # builds the worker context too
        Reconciler(context.current()).run()
        ph.drain()

    early = hashlib.sha256(b"token-of-a-user-with-no-row-yet").hexdigest()
    sweep()
    assert published() == {str(kept.id): digest(kept), str(gone.id): digest(gone), "9001": early}
    ph.r.delete(bearer.KEY)  # Redis lost them
    sweep()
    assert published() == {str(kept.id): digest(kept), str(gone.id): digest(gone), "9001": early}
    assert ph.deliver("USER_DELETED", ph.pworld.webhook({"id": gone.id})) == "queued"
    ph.drain()
    assert published() == {str(kept.id): digest(kept), "9001": early}
    ph.r.hset(bearer.KEY, str(gone.id), digest(gone))  # as if the deletion's own removal had failed
    sweep()
    assert published() == {str(kept.id): digest(kept), "9001": early}
    assert ph.failed_ids() == []


def test_a_body_cannot_move_another_users_connection_or_accounts(ph: PowensHarness) -> None:
    """What the bearer mode's token proves is who the user is: a body naming user A with B's
    connection, or with an account of another connection, is a dead letter, and B's rows stay B's."""
    alice, bob = ph.user(), ph.user()
    mine, theirs = connected(ph, alice), connected(ph, bob)
    synced(ph, mine)
    synced(ph, theirs)
    before = ph.every_row()
    stolen = ph.pworld.connection_synced(theirs)
    stolen["user"] = {"id": alice.id}
    moved = ph.pworld.connection_synced(mine)
    moved["connection"]["accounts"][0]["id"] = next(
        a.id for a in ph.pworld.accounts.values() if a.id_connection == theirs
    )
    for body in (stolen, moved):
        assert ph.deliver("CONNECTION_SYNCED", body) == "queued"
    ph.drain()
    assert len(ph.failed_ids()) == 2
    errors = [row[0] for row in ph.rows("SELECT last_error FROM webhook_events WHERE status = 'failed'")]
    assert all("PermanentError" in e and ("not user" in e or "is not connection" in e) for e in errors), (
        errors
    )
    assert ph.every_row() == before
    assert ph.item(theirs)["provider"] == "powens"
    [(owner,)] = ph.rows("SELECT user_uuid FROM items WHERE id = %s", (stored_id(theirs),))
    assert owner == powens_user(bob.id)


def test_a_resync_of_a_user_reads_its_connections_once_and_ends_at_the_truth(ph: PowensHarness) -> None:
    """`bridgehook resync --user powens-<id>`: a connection deleted at Powens without its webhook is
    marked deleted, a changed transaction is read again, and the user's connections are listed once."""
    user = ph.user()
    kept, dropped = connected(ph, user), connected(ph, user)
    synced(ph, kept)
    synced(ph, dropped)
    ph.pworld.delete_connection(dropped)  # no CONNECTION_DELETED
    changed = next(
        t for t in ph.pworld.transactions.values() if ph.pworld.accounts[t.id_account].id_connection == kept
    )
    ph.pworld.update_transaction(changed.id, value=changed.value + 7)
    ph.pworld.requests.clear()
    assert Enqueuer(ph.r, ph.settings).resync_user(powens_user(user.id)) == "queued"
    ph.drain()
    assert ph.failed_ids() == []
    assert ph.item(dropped)["deleted_at"] is not None
    assert ph.powens_tables() == ph.powens_truth()
    listings = [r for r in ph.pworld.requests if r.method == "GET" and r.path.endswith("/connections")]
    assert len(listings) == 1


def test_a_connection_never_usable_reads_its_accounts_once(ph: PowensHarness) -> None:
    """A connection in wrongpass from its first sync: its first body reads the user's accounts (those
    awaiting consent are in no body), the next ones read nothing, for nothing has changed; once
    usable, what it holds is listed."""
    user = ph.user()
    cid = connected(ph, user)
    ph.pworld.add_account(cid)  # awaiting consent: only the accounts listing shows it
    ph.pworld.set_state(cid, "wrongpass", "message")
    calls = []
    for _ in range(3):
        ph.pworld.requests.clear()
        synced(ph, cid)
        calls.append([r.path for r in ph.pworld.requests])
    assert calls == [[f"/2.0/users/{user.id}/accounts"], [], []], calls
    assert ph.powens_tables()["accounts"] == ph.powens_truth()["accounts"]
    ph.pworld.set_state(cid, None)
    synced(ph, cid, new=[])
    assert ph.powens_tables() == ph.powens_truth()


def test_a_resync_of_a_user_lists_its_accounts_and_transactions_once(ph: PowensHarness) -> None:
    """Powens lists a user's accounts and transactions, not a connection's: a resync of a user with
    three connections (one waiting for a password, so not listed) reads each listing once, and every
    connection ends at the truth."""
    user = ph.user()
    first, second, broken = connected(ph, user), connected(ph, user, accounts=1), connected(ph, user)
    for cid in (first, second, broken):
        synced(ph, cid)
    world = ph.pworld
    world.set_state(broken, "wrongpass", "message")
    for cid in (first, second):
        changed = next(
            t for t in world.transactions.values() if world.accounts[t.id_account].id_connection == cid
        )
        world.update_transaction(changed.id, value=changed.value + 7)
        world.add_transaction(changed.id_account)
    world.add_account(first)  # awaiting consent: the accounts listing shows it
    world.requests.clear()
    assert Enqueuer(ph.r, ph.settings).resync_user(powens_user(user.id)) == "queued"
    ph.drain()
    assert ph.failed_ids() == []
    assert sorted(r.path.rsplit("/", 1)[-1] for r in world.requests) == [
        "accounts",
        "connections",
        "transactions",
    ]
    assert ph.powens_tables() == ph.powens_truth()
    assert ph.item(broken)["state"] == "wrongpass"


def test_a_body_cannot_take_a_transaction_of_another_connection(ph: PowensHarness) -> None:
    """The bearer mode's token proves the user, not the body: a body of A's connection carrying the id
    of a transaction we hold under B's account (newer, so that it would overwrite it) is a dead letter,
    and nothing of it is written."""
    alice, bob = ph.user(), ph.user()
    mine, theirs = connected(ph, alice), connected(ph, bob)
    synced(ph, mine)
    synced(ph, theirs)
    before = ph.every_row()
    world = ph.pworld
    taken = next(
        t for t in world.transactions.values() if world.accounts[t.id_account].id_connection == theirs
    )
    forged = world.connection_synced(mine, new=[])
    account = forged["connection"]["accounts"][0]
    account["transactions"] = [
        world.render_transaction(t) for t in world.transactions.values() if t.id_account == account["id"]
    ][:2]
    account["transactions"].append(
        world.render_transaction(taken)
        | {"id_account": account["id"], "value": 1, "last_update": "2027-01-01 00:00:00"}
    )
    assert ph.deliver("CONNECTION_SYNCED", forged) == "queued"
    ph.drain()
    [failed] = ph.failed_ids()
    [(error,)] = ph.rows("SELECT last_error FROM webhook_events WHERE id = %s", (failed,))
    assert "PermanentError" in error and f"transaction {taken.id} is not connection {mine}'s" in error, error
    assert ph.every_row() == before
    assert ph.powens_tables() == ph.powens_truth()


def test_a_sweep_leaves_a_connection_in_error_alone_once_it_knows_its_state(ph: PowensHarness) -> None:
    """A failed sync at Powens leaves the connection's ``last_update`` (its last *successful* update)
    where it was: once we hold the state, every later sweep costs its two calls for the user and
    enqueues nothing for the connection. (The fake used to move ``last_update`` on a failed sync too,
    and every sweep resynced such a connection.)"""
    user = ph.user()
    cid = connected(ph, user)
    synced(ph, cid)
    ph.pworld.set_state(cid, "wrongpass", "message")
    assert ph.deliver("CONNECTION_SYNCED", ph.pworld.connection_synced(cid, [])) == "queued"
    ph.drain()
    for _ in range(2):
        ph.pworld.requests.clear()
        ph.drain()
        counts = Reconciler(context.current()).run()
        ph.drain()
        assert counts["changed"] == 0, counts
        assert [r.path for r in ph.pworld.requests] == [
            f"/2.0/users/{user.id}/connections",
            f"/2.0/users/{user.id}/accounts",
        ]
    assert ph.item(cid)["state"] == "wrongpass"
    assert ph.failed_ids() == []
