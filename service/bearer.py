"""Powens's bearer mode: a delivery carries ``Authorization: Bearer <the user's permanent token>``.

Powens offers it as the default authentication of its webhooks (``POWENS_WEBHOOK_AUTH=bearer``):
the receiver compares the token with the one we hold for the user the body names. We hold the
tokens encrypted in the database (workers/tokens.py), and the receiver has, by design, neither a
database connection nor the encryption keys: its only dependency is Redis. So whoever stores a
token (the API's ``PUT /v1/users/{id}?provider=powens``, ``make run``) also publishes its SHA-256 in
one Redis hash, :data:`KEY` (field: Powens's ``id_user``, value: the hex digest); a deletion removes
the field, and the reconciliation sweep publishes every token again (workers/powens_reconcile.py),
so a Redis rebuilt from scratch is right again after one sweep. A check is one ``HGET``.

A plain SHA-256, with no salt or key stretching, is enough: the tokens are random and long (Powens
makes them, tens of characters of a large alphabet), so a digest cannot be reversed by guessing,
and one that leaks from Redis does not give the token. The comparison runs in constant time, and an
unknown user is compared with a digest no token has, so that it answers as a wrong token does.

Which user a body names depends on its type (service/powens_events.USER_PATHS, which the ledger's
reading of a parsed body follows too): ``user.id`` in ``CONNECTION_SYNCED`` (and
``ACCOUNTS_FETCHED``, the same shape), ``id_user`` in the connection or account of
``CONNECTION_DELETED`` and ``ACCOUNT_*``, ``id`` in ``USER_DELETED``; any other type, ``id_user``
or ``user.id``, whichever it has. The body is read for that id only (msgspec skips the rest): its
other checks come after authentication (service/powens_events.py). Powens sends no token for an
event without a user, so bearer mode cannot receive those: they need ``POWENS_WEBHOOK_AUTH=hmac``
(the mode is the deployment's, one at a time).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

import msgspec

from service.powens_events import USER_PATHS

KEY = "bridgehook:powens:token-sha256"

_Id = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
_NOBODY = b"-" * 64  # compared with for an unknown user: no hex digest equals it


class _User(msgspec.Struct, gc=False):
    id: _Id


class _ByUser(msgspec.Struct, gc=False):
    user: _User


class _ByIdUser(msgspec.Struct, gc=False):
    id_user: _Id


class _ById(msgspec.Struct, gc=False):
    id: _Id


class _Either(msgspec.Struct, kw_only=True, gc=False):
    id_user: _Id | None = None
    user: _User | None = None


# A Struct for each place a body names its user (service/powens_events.USER_PATHS says which, by type).
_AT: dict[tuple[str, ...], type[msgspec.Struct]] = {
    ("user", "id"): _ByUser,
    ("id_user",): _ByIdUser,
    ("id",): _ById,
}
_SHAPES = {name: _AT[path] for name, path in USER_PATHS.items()}
_DECODERS = {name: msgspec.json.Decoder(shape) for name, shape in _SHAPES.items()}
_ANY = msgspec.json.Decoder(_Either)


def digest(token: bytes) -> str:
    """What :data:`KEY` holds for a token: its SHA-256, in hex."""
    return hashlib.sha256(token).hexdigest()


def user_id(name: str, body: bytes) -> int | None:
    """The Powens ``id_user`` a body of this event type names; None if it names none."""
    try:
        event = _DECODERS.get(name, _ANY).decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(event, _ByUser):
        return event.user.id
    if isinstance(event, _ByIdUser):
        return event.id_user
    if isinstance(event, _ById):
        return event.id
    if isinstance(event, _Either):
        return event.id_user or (event.user.id if event.user is not None else None)
    return None


def presented(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header; None without one."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def matches(token: bytes, stored: bytes | None) -> bool:
    """Whether ``token`` is the one whose digest is ``stored`` (None: an unknown user), in constant time."""
    same = hmac.compare_digest(digest(token).encode(), _NOBODY if stored is None else stored)
    return same and stored is not None
