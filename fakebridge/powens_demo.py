"""The fake Powens's demo: the user, connection, accounts and transactions that the Powens fixtures
(``bridgehook/fixtures/powens/``) talk about, with their ids, as Bridge's ``seed_demo`` holds what
Bridge's fixtures name.

Those fixtures tell one user's story: user 1093 connects (connection 4102), Powens finds a current
account (7311, consented) and a Livret A (7312, awaiting consent), syncs two transactions, then the
Livret A is enabled and disabled, the connection and the user deleted. The world is as it stands
after the sync, so that a worker given ``connection.synced`` lists from the fake what the body says,
field for field (a listing rewrites the body's rows: it must not change them).
"""

from __future__ import annotations

import secrets
from datetime import date
from decimal import Decimal

from fakebridge.powens_world import PAccount, PConnection, PowensWorld, PTransaction, PUser, read_powens_time

USER, CONNECTION, CURRENT, SAVINGS = 1093, 4102, 7311, 7312
SYNCED = read_powens_time("2026-12-07 08:14:02")  # the connection's sync: its and its rows' last_update
FOUND = read_powens_time("2026-12-07 08:13:58")  # when the Livret A was found, disabled


def demo_world() -> PowensWorld:
    """A world at the end of the fixtures' sync; its clock there, so that any change comes after."""
    world = PowensWorld(start=SYNCED)
    seed_demo(world)
    return world


def seed_demo(world: PowensWorld) -> PUser:
    """Add the fixtures' user and everything under it to ``world``; return the user (its token is
    new: whoever reads as that user must be given it)."""
    user = PUser(USER, secrets.token_urlsafe(24))
    world.users[USER] = user
    world.connections[CONNECTION] = PConnection(
        CONNECTION, USER, last_update=SYNCED, expire=read_powens_time("2027-06-05 08:13:40")
    )
    world.accounts[CURRENT] = PAccount(
        CURRENT, CONNECTION, USER, "Compte chèque", "FR7630004000031234567890143", Decimal("1523.47"),
        coming=Decimal("-42.5"), last_update=SYNCED,
    )  # fmt: skip
    world.accounts[SAVINGS] = PAccount(
        SAVINGS, CONNECTION, USER, "Livret A", "FR7630004000039876543210987", Decimal("310.0"),
        type="savings", disabled=FOUND, last_update=FOUND,
    )  # fmt: skip
    for transaction in (
        PTransaction(
            900117, CURRENT, date(2026, 12, 5), Decimal("-23.8"), "CB CARREFOUR CITY 04/12",
            last_update=SYNCED,
            shown={"rdate": "2026-12-04", "simplified_wording": "CARREFOUR CITY",
                   "wording": "Carrefour City"},
        ),
        PTransaction(
            900118, CURRENT, date(2026, 12, 8), Decimal("-42.5"), "PRLV SEPA EDF", coming=True,
            last_update=SYNCED,
            shown={"rdate": "2026-12-07", "vdate": None, "type": "order", "simplified_wording": "EDF",
                   "wording": "EDF"},
        ),
    ):  # fmt: skip
        world.transactions[transaction.id] = transaction
    return user
