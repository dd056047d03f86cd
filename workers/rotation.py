"""Key rotation: re-encrypt every encrypted column under the current key, batch by batch.

To rotate: put the new key first in ``ENCRYPTION_KEYS`` (``NEW,OLD``) everywhere and restart the
workers, so new writes use it; run ``bridgehook keys rotate``; then drop ``OLD``. The same command
encrypts plaintext rows left from before encryption was turned on.

Resumable by construction: each batch commits on its own, and every scan selects only the values
not yet under the current key, so an interrupted run simply runs again. A row a worker rewrites
during the rotation is written under the current key anyway; the update is conditional on the
values it read (no lost write), and a final scan picks up anything left behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from workers.codec import ENCRYPTED_COLUMNS, PREFIX, AESGCMCodec, CodecError
from workers.db import Database

KEYS = {"accounts": "id", "transactions": "id", "webhook_events": "id", "user_tokens": "user_uuid"}
Progress = Callable[[str, int], None]  # (table, rows rotated by this batch)


class RotationError(CodecError):
    """A value could not be read back; names the table and row, never the value."""


class Rotation:
    def __init__(self, db: Database, codec: AESGCMCodec, batch_size: int = 500) -> None:
        self.db = db
        self.codec = codec
        self.batch_size = batch_size
        current = f"{PREFIX}{codec.current_key_id}:"
        assert re.fullmatch(r"bh1:[0-9a-f]{8}:", current)  # inlined below as a literal
        self._current = current

    def _stale(self, table: str) -> str:
        """SQL: the row holds a value not under the current key (plaintext or an older key)."""
        n = len(self._current)
        return " OR ".join(
            f"({c} IS NOT NULL AND substr({c}, 1, {n}) <> '{self._current}')"
            for c in ENCRYPTED_COLUMNS[table]
        )

    def pending(self) -> dict[str, int]:
        """How many rows of each table still need rotating."""
        counts = {}
        with self.db.transaction() as tx:
            for table in ENCRYPTED_COLUMNS:
                stale = self._stale(table)
                [(n,)] = tx.execute(f"SELECT count(*) FROM {table} WHERE {stale}").fetchall()  # noqa: S608
                counts[table] = int(n)
        return counts

    def run(self, progress: Progress = lambda table, n: None, passes: int = 3) -> int:
        """Rotate everything; the number of rows rewritten. A few passes collect rows that
        changed under a batch (their conditional update did not apply)."""
        total = 0
        for _ in range(passes):
            done = sum(self._table(table, progress) for table in ENCRYPTED_COLUMNS)
            total += done
            if not any(self.pending().values()):
                break
        return total

    def check(self, progress: Progress = lambda table, n: None) -> int:
        """Decrypt every value :meth:`run` would rewrite, in its order, and change nothing: raises the
        RotationError that ``run`` would meet first (what ``keys rotate --dry-run`` reports)."""
        return sum(self._table(table, progress, write=False) for table in ENCRYPTED_COLUMNS)

    def _table(self, table: str, progress: Progress, write: bool = True) -> int:
        key, columns = KEYS[table], ENCRYPTED_COLUMNS[table]
        select = (
            f"SELECT {key}, {', '.join(columns)} FROM {table} "  # noqa: S608
            f"WHERE {key} > %s AND ({self._stale(table)}) ORDER BY {key} LIMIT {int(self.batch_size)}"
        )
        done, last = 0, _first_key(table)
        while True:
            with self.db.transaction() as tx:
                rows = tx.execute(select, (last,)).fetchall()
                if not rows:
                    return done
                for row in rows:
                    changed = self._reencrypted(table, key, columns, row)
                    done += self._rewrite(tx, table, key, row[0], changed) if write else len(changed) > 0
                last = rows[-1][0]
            progress(table, len(rows))

    def _reencrypted(
        self, table: str, key: str, columns: tuple[str, ...], row: tuple[Any, ...]
    ) -> dict[str, tuple[str, str]]:
        """Each value of ``row`` not under the current key, with what replaces it."""
        changed: dict[str, tuple[str, str]] = {}
        for column, old in zip(columns, row[1:], strict=True):
            if old is None or self.codec.is_current(old):
                continue
            name = f"{table}.{column}"
            try:
                value = self.codec.decode(old, name)
            except CodecError as exc:
                raise RotationError(f"{table} {key}={row[0]}: {exc}") from None
            changed[column] = (old, self.codec.encode(value, name) or "")
        return changed

    def _rewrite(
        self, tx: Any, table: str, key: str, row_key: Any, changed: dict[str, tuple[str, str]]
    ) -> int:
        if not changed:
            return 0
        sets = ", ".join(f"{c} = %s" for c in changed)
        guard = " AND ".join(f"{c} = %s" for c in changed)
        params = [new for _, new in changed.values()] + [row_key] + [old for old, _ in changed.values()]
        tx.execute(f"UPDATE {table} SET {sets} WHERE {key} = %s AND {guard}", tuple(params))  # noqa: S608
        return int(tx.rowcount)


def _first_key(table: str) -> Any:
    """Below every key of the table: ids are integers (Powens's negated: far above -2**62), event ids
    and user uuids non-empty text."""
    return "" if KEYS[table] == "user_uuid" or table == "webhook_events" else -(2**62)
