"""A Powens user's permanent token, stored encrypted in ``user_tokens`` like bank data.

Bridge's user tokens last two hours and are renewed from the user's uuid (workers.bridge keeps them
in Redis). Powens's never expire: ``POST /auth/init`` gives one when the user is created, and it is
the only way to read that user's data, so it is kept in the database under the encryption keys
(``ENCRYPTION_KEYS``, rotated by ``bridgehook keys rotate`` with the rest), and never logged.
"""

from __future__ import annotations

from datetime import UTC, datetime

from workers.codec import Codec
from workers.db import Tx
from workers.errors import PermanentError

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
