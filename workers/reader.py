"""The read side for applications: accounts and transactions with their bank data decrypted.

The tables are plain SQL and an application may query them directly, except for the columns in
:data:`workers.codec.ENCRYPTED_COLUMNS`, which hold ciphertext. This module reads rows and
decrypts those columns with the same ``ENCRYPTION_KEYS`` the workers use::

    from workers.reader import Reader

    with Reader.from_env() as reader:
        account = reader.account(20000001)          # {"id": …, "name": "Compte courant", "iban": "FR76…", …}
        recent = reader.transactions(20000001, limit=50)

Live rows only by default: rows Bridge deleted keep a ``deleted_at`` and stay readable with
``include_deleted=True``. A value that cannot be decrypted raises :class:`workers.codec.CodecError`
(a missing key, a tampered value), never returns garbage.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from service.settings import Settings
from workers.codec import ENCRYPTED_COLUMNS, Codec, codec_from_settings
from workers.db import Database

ACCOUNT_COLUMNS = (
    "id", "item_id", "name", "iban", "type", "currency_code", "balance", "accounting_balance",
    "instant_balance", "data_access", "last_refresh_status", "pro", "provider_id", "bridge_updated_at",
    "deleted_at",
)  # fmt: skip
TRANSACTION_COLUMNS = (
    "id", "account_id", "amount", "currency_code", "date", "booking_date", "transaction_date", "value_date",
    "clean_description", "provider_description", "category_id", "operation_type", "future",
    "bridge_updated_at", "deleted_at",
)  # fmt: skip


class Reader:
    """Decrypted reads of the tables (one database, one codec)."""

    def __init__(self, db: Database, codec: Codec) -> None:
        self.db = db
        self.codec = codec

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Reader:
        """From DATABASE_URL and ENCRYPTION_KEYS, as the workers read them."""
        settings = settings or Settings.from_env()
        codec = codec_from_settings(settings)
        return cls(Database.from_url(settings.database_url), codec)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.db.close()

    def __repr__(self) -> str:
        return f"Reader({self.db!r}, {self.codec!r})"

    def select(
        self, table: str, columns: Sequence[str], where: str = "", params: Sequence[Any] = ()
    ) -> list[dict[str, Any]]:
        """Rows of ``table`` as dicts, encrypted columns decrypted. ``table`` and ``columns`` are
        names from this code, never input; values go through ``params``."""
        secret = set(ENCRYPTED_COLUMNS.get(table, ()))
        sql = f"SELECT {', '.join(columns)} FROM {table}" + (f" WHERE {where}" if where else "")  # noqa: S608
        with self.db.transaction() as tx:
            rows = tx.execute(sql + " ORDER BY 1", tuple(params)).fetchall()
        decode = self.codec.decode
        return [
            {
                name: decode(value, f"{table}.{name}") if name in secret else value
                for name, value in zip(columns, row, strict=True)
            }
            for row in rows
        ]

    def account(self, account_id: int) -> dict[str, Any] | None:
        rows = self.select("accounts", ACCOUNT_COLUMNS, "id = %s", (account_id,))
        return rows[0] if rows else None

    def accounts(
        self, *, item_id: int | None = None, user_uuid: str | None = None, include_deleted: bool = False
    ) -> list[dict[str, Any]]:
        where: list[str] = [] if include_deleted else ["deleted_at IS NULL"]
        params: list[Any] = []
        if item_id is not None:
            where.append("item_id = %s")
            params.append(item_id)
        if user_uuid is not None:
            where.append("item_id IN (SELECT id FROM items WHERE user_uuid = %s)")
            params.append(user_uuid)
        return self.select("accounts", ACCOUNT_COLUMNS, " AND ".join(where), params)

    def transactions(
        self, account_id: int, *, limit: int = 100, include_deleted: bool = False
    ) -> list[dict[str, Any]]:
        """The account's latest transactions (by date, then id), newest first."""
        where = ["account_id = %s"] + ([] if include_deleted else ["deleted_at IS NULL"])
        ids = f"SELECT id FROM transactions WHERE {' AND '.join(where)} ORDER BY date DESC, id DESC LIMIT %s"  # noqa: S608
        rows = self.select("transactions", TRANSACTION_COLUMNS, f"id IN ({ids})", [account_id, limit])
        return sorted(rows, key=lambda t: (str(t["date"]), t["id"]), reverse=True)
