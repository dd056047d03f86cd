"""Whose a row is: Bridge's or Powens's, and the id spaces that keep the two apart in one set of tables.

Bridge's and Powens's integer ids overlap (both count from small numbers), so each provider's rows keep
an id space of their own, in the same tables:

=============  ==============================  ===================================
row            Bridge                          Powens
=============  ==============================  ===================================
user           ``uuid``: Bridge's user uuid    ``uuid``: ``powens-<id_user>``
item           ``id``: the item's id           ``id``: minus the connection's id
account        ``id``: the account's id        ``id``: minus the account's id
transaction    ``id``: the transaction's id    ``id``: minus the transaction's id
=============  ==============================  ===================================

and users, items, accounts and ``webhook_events`` have a ``provider`` column (``bridge`` or
``powens``). Keys, indexes and every statement keyed by an id stay as they are: Bridge's ids are
positive, so no Powens row can take one, and the migration that brought Powens in (6) only added
columns whose default, ``bridge``, is true of every row already there (docs/design.md, Two
providers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from service import powens_events

Provider = Literal["bridge", "powens"]
PROVIDERS: tuple[Provider, ...] = ("bridge", "powens")
POWENS_USER_PREFIX = "powens-"


def stored_id(powens_native: Any) -> int:
    """Where a Powens id N (a connection's, an account's, a transaction's) is stored: -N."""
    return -int(powens_native)


def native_id(stored: int) -> int:
    """The Powens id of a stored (negative) id: the inverse of :func:`stored_id`."""
    return -int(stored)


def powens_user(id_user: Any) -> str:
    return f"{POWENS_USER_PREFIX}{int(id_user)}"


def powens_user_id(user_uuid: str) -> int:
    """The Powens ``id_user`` of a stored user uuid (``powens-42`` -> 42)."""
    return int(user_uuid.removeprefix(POWENS_USER_PREFIX))


def provider_of_user(user_uuid: str) -> Provider:
    return "powens" if user_uuid.startswith(POWENS_USER_PREFIX) else "bridge"


def provider_of_id(stored: int) -> Provider:
    return "powens" if int(stored) < 0 else "bridge"


class Subject(NamedTuple):
    """What an event is about, as the ledger records it (the erasure of a user finds its rows by it)."""

    provider: Provider
    item_id: int | None
    user_uuid: str | None


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def subject(event: Mapping[str, Any]) -> Subject:
    """Bridge's events name ``item_id`` and ``user_uuid`` in their content; a Powens body names its
    connection and user by where it sits in the body (service/powens_events.py, USER_PATHS)."""
    content = event.get("content") or {}
    provider: Provider = "powens" if event.get("provider") == "powens" else "bridge"
    if provider == "bridge" or "item_id" in content:  # Bridge's events, and our own tasks (replay.py)
        user = content.get("user_uuid")
        return Subject(provider, content.get("item_id"), user if isinstance(user, str) else None)
    kind, body = str(event.get("type")), content if isinstance(content, dict) else {}
    cid, uid = _int(powens_events.connection_of(kind, body)), _int(powens_events.user_of(kind, body))
    return Subject(
        "powens", None if cid is None else stored_id(cid), None if uid is None else powens_user(uid)
    )
