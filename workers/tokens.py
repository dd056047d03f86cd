"""A Powens user's permanent token, stored encrypted in ``user_tokens`` like bank data.

Bridge's user tokens last two hours and are renewed from the user's uuid (workers.bridge keeps them
in Redis). Powens's never expire: ``POST /auth/init`` gives one when the user is created, and it is
the only way to read that user's data, so it is kept in the database under the encryption keys
(``ENCRYPTION_KEYS``, rotated by ``bridgehook keys rotate`` with the rest), and never logged.

Each token's SHA-256 is also published in Redis (:func:`publish`), for the receiver's bearer mode,
which has neither the database nor the keys (service/bearer.py says why a plain digest is enough):
whoever stores a token publishes it once the transaction has committed, a deletion unpublishes it,
and each reconciliation sweep publishes them all again (:func:`republish`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import redis
from redis.typing import EncodableT, FieldT

from service import bearer
from workers.codec import Codec
from workers.db import Tx
from workers.errors import PermanentError
from workers.providers import powens_user_id, provider_of_user

COLUMN = "user_tokens.token"  # the encrypted column (workers.codec.ENCRYPTED_COLUMNS)


class MissingToken(PermanentError):
    """We hold no token for the user: their data cannot be read until one is stored, and no retry
    will store it (the job goes to the dead letters at once, to be replayed once it is)."""


def store(tx: Tx, codec: Codec, user_uuid: str, provider: str, token: str) -> None:
    tx.execute(
        "INSERT INTO user_tokens (user_uuid, provider, token, updated_at) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (user_uuid) DO UPDATE SET token = excluded.token, updated_at = excluded.updated_at",
        (user_uuid, provider, codec.encode(token, COLUMN), datetime.now(UTC)),
    )


def load(tx: Tx, codec: Codec, user_uuid: str) -> str:
    """The user's token; :class:`MissingToken` if we hold none."""
    row = tx.execute("SELECT token FROM user_tokens WHERE user_uuid = %s", (user_uuid,)).fetchone()
    token = None if row is None else codec.decode(row[0], COLUMN)
    if not token:
        raise MissingToken(f"no token is stored for {user_uuid}: create the user through the API")
    return str(token)


def forget(tx: Tx, user_uuid: str) -> None:
    tx.execute("DELETE FROM user_tokens WHERE user_uuid = %s", (user_uuid,))


def publish(connection: redis.Redis, user_uuid: str, token: str) -> None:
    """The token's digest where the receiver checks it (a Powens user's; after the commit)."""
    connection.hset(bearer.KEY, str(powens_user_id(user_uuid)), bearer.digest(token.encode()))


def unpublish(connection: redis.Redis, user_uuid: str) -> None:
    """The receiver no longer accepts the user's token (nothing for a Bridge user)."""
    if provider_of_user(user_uuid) == "powens":
        connection.hdel(bearer.KEY, str(powens_user_id(user_uuid)))


def published(connection: redis.Redis) -> set[str]:
    """The users (``id_user``) whose digest is published: read before :func:`republish`'s tokens."""
    return {name.decode() if isinstance(name, bytes) else str(name) for name in connection.hkeys(bearer.KEY)}


def republish(connection: redis.Redis, held: Mapping[str, str], before: set[str]) -> None:
    """Publish every token we hold (``held``: user uuid -> token), in one round trip, and unpublish
    those published ``before`` we read them that we no longer hold (a deletion whose own unpublish
    failed). A user created since we read them is not in ``before`` (Powens never reuses an id), so
    it is never unpublished here; one deleted since may be published again, until the next sweep."""
    digests: dict[FieldT, EncodableT] = {
        str(powens_user_id(uuid)): bearer.digest(token.encode()) for uuid, token in held.items()
    }
    pipe = connection.pipeline(transaction=True)
    if digests:
        pipe.hset(bearer.KEY, mapping=digests)
    stale = before.difference(digests)
    if stale:
        pipe.hdel(bearer.KEY, *stale)
    pipe.execute()
