"""The Powens side of the pipeline, as tests/harness.py's Harness is Bridge's: the real receiver (a
TestClient over the app) takes signed Powens webhooks, real RQ workers drain them against a fake Powens
served over HTTP, and the tables are compared with the fake's ground truth."""

from __future__ import annotations

from typing import Any

import redis

from fakebridge.powens import FakePowensServer
from fakebridge.powens_world import PowensWorld, PUser
from fakebridge.server import FakeBridgeServer
from fakebridge.world import World, render_json
from service.settings import Settings
from tests.harness import Harness, dec, ts
from tests.support import (
    POWENS_SECRET,
    TEST_SEAL_PRIVATE_KEY,
    TEST_SEAL_PUBLIC_KEY,
    powens_signed,
    powens_url,
)
from workers import tokens
from workers.codec import codec_from_settings
from workers.providers import powens_user, stored_id
from workers.storage import Storage


def powens_environ(fake: FakePowensServer, world: PowensWorld) -> dict[str, str]:
    """What the tests' workers and receiver need to serve Powens too (beside worker_environ's)."""
    return {
        "POWENS_WEBHOOK_SECRETS": POWENS_SECRET,
        "POWENS_API_URL": fake.api_url,
        "POWENS_CLIENT_ID": world.client_id,
        "POWENS_CLIENT_SECRET": world.client_secret,
        "POWENS_RATE_LIMIT_USER": "100000/60",
        "POWENS_RATE_LIMIT_APP": "100000/60",
        "BODY_SEAL_PUBLIC_KEY": TEST_SEAL_PUBLIC_KEY,
        "BODY_SEAL_PRIVATE_KEYS": TEST_SEAL_PRIVATE_KEY,
    }


class PowensHarness(Harness):
    """Bridge's harness (its fake Bridge stays idle unless a test uses it) with a fake Powens: the
    receiver serves Powens's webhooks too (its settings carry POWENS_WEBHOOK_SECRETS)."""

    def __init__(
        self,
        settings: Settings,
        world: World,
        fake: FakeBridgeServer,
        r: redis.Redis,
        powens: FakePowensServer,
    ) -> None:
        super().__init__(settings, world, fake, r)
        self.powens = powens
        self.pworld = powens.world
        self.codec = codec_from_settings(settings)

    def user(self, *, token: bool = True) -> PUser:
        """A Powens user, whose permanent token we store as the application API would."""
        user = self.pworld.add_user()
        if token:
            with self.db.transaction() as tx:
                Storage(self.db, self.codec).upsert_user(tx, powens_user(user.id))
                tokens.store(tx, self.codec, powens_user(user.id), "powens", user.token)
        return user

    def deliver(self, event: str, body: dict[str, Any]) -> str:
        """POST the body, signed as Powens signs, to the event's URL; return the receiver's status. Its
        amounts (Decimal) are JSON numbers, as Powens writes them, not strings."""
        raw = render_json(body).encode()
        response = self.receiver.post(powens_url(event), **powens_signed(event, raw))
        assert response.status_code == 200, response.text
        self.acknowledged.append(str(response.json()["event_id"]))
        return str(response.json()["status"])

    # -- comparing with the fake's ground truth ---------------------------------------------------

    def powens_tables(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Our live Powens rows, in the fake's ids."""
        out: dict[str, dict[int, dict[str, Any]]] = {"items": {}, "accounts": {}, "transactions": {}}
        for item_id, state, status in self.rows(
            "SELECT id, status_code_info, status FROM items WHERE provider = 'powens' AND deleted_at IS NULL"
        ):
            out["items"][-int(item_id)] = {"state": state or None, "usable": status == 0}
        accounts = self.reader.select(
            "accounts",
            ["id", "item_id", "name", "balance", "iban", "data_access"],
            "provider = 'powens' AND deleted_at IS NULL",
        )
        for a in accounts:
            out["accounts"][-int(a["id"])] = {
                "connection": -int(a["item_id"]), "name": a["name"], "balance": dec(a["balance"]),
                "iban": a["iban"], "disabled": a["data_access"] == "disabled",
            }  # fmt: skip
        # As Bridge's (Harness.tables): a deleted item's or account's transactions keep their rows.
        live = (
            "id < 0 AND deleted_at IS NULL AND account_id IN "
            "(SELECT id FROM accounts WHERE provider = 'powens' AND deleted_at IS NULL)"
        )
        for t in self.reader.select("transactions", ["id", "account_id", "amount", "date", "future"], live):
            out["transactions"][-int(t["id"])] = {
                "account": -int(t["account_id"]), "amount": dec(t["amount"]), "date": str(t["date"])[:10],
                "coming": bool(t["future"]),
            }  # fmt: skip
        return out

    def powens_truth(self, connections: set[int] | None = None) -> dict[str, dict[int, dict[str, Any]]]:
        """The fake's live objects of ``connections`` (all by default), in the same shape."""
        world = self.pworld
        chosen = set(world.connections) if connections is None else connections
        out: dict[str, dict[int, dict[str, Any]]] = {"items": {}, "accounts": {}, "transactions": {}}
        for c in world.connections.values():
            if c.id in chosen:
                out["items"][c.id] = {"state": c.state or None, "usable": not c.state}
        for a in world.accounts.values():
            if a.id_connection in chosen and a.deleted is None:
                out["accounts"][a.id] = {
                    "connection": a.id_connection, "name": a.name, "balance": dec(a.balance),
                    "iban": a.iban, "disabled": a.disabled is not None,
                }  # fmt: skip
        for t in world.transactions.values():
            account = world.accounts.get(t.id_account)
            if (
                account is None
                or t.deleted is not None
                or account.id not in out["accounts"]
                or account.disabled
            ):
                continue
            out["transactions"][t.id] = {
                "account": t.id_account, "amount": dec(t.value), "date": t.day.isoformat(),
                "coming": t.coming,
            }  # fmt: skip
        return out

    def item(self, connection_id: int) -> dict[str, Any]:
        [row] = self.rows(
            "SELECT status, status_code_info, needs_user_action, deleted_at, provider, last_try_refresh "
            "FROM items WHERE id = %s",
            (stored_id(connection_id),),
        )
        keys = ("status", "state", "needs_user_action", "deleted_at", "provider", "last_try_refresh")
        return dict(zip(keys, (*row[:5], ts(row[5])), strict=True))
