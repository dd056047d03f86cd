"""The public schema and its versioned migrations (``bridgehook db upgrade``).

Applications read these tables, so they change only by appending a migration here. All
pending migrations run in one transaction, after taking a lock that serialises concurrent
upgrades (``pg_advisory_xact_lock`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite): running
it twice, or from two pods at once, applies each version exactly once. The workers and the scheduler
only read which versions are applied (:func:`require_current`), without DDL and without that lock,
so that they can run as a role that may change rows and not the schema (docs/deploy.md).

Types differ only where SQLite has no exact equivalent: money is ``NUMERIC`` on PostgreSQL
and text on SQLite (exact decimal strings), timestamps ``TIMESTAMPTZ`` / ISO 8601 UTC text,
dates ``DATE`` / ISO text, booleans ``BOOLEAN`` / 0-1.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from workers.db import Database, Dialect, Tx

TYPES: dict[Dialect, dict[str, str]] = {
    "postgresql": {
        "ts": "TIMESTAMPTZ",
        "money": "NUMERIC",
        "date": "DATE",
        "bool": "BOOLEAN",
        "false": "FALSE",
    },
    "sqlite": {"ts": "TEXT", "money": "TEXT", "date": "TEXT", "bool": "INTEGER", "false": "0"},
}

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "users, items, accounts, transactions, webhook_events",
        [
            """CREATE TABLE users (
                uuid TEXT PRIMARY KEY,
                external_user_id TEXT,
                deleted_at {ts},
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL)""",
            """CREATE TABLE items (
                id BIGINT PRIMARY KEY,
                user_uuid TEXT NOT NULL,
                status INTEGER,
                status_code_info TEXT,
                status_code_description TEXT,
                provider_id BIGINT,
                needs_user_action {bool} NOT NULL DEFAULT {false},
                authentication_expires_at {ts},
                last_successful_refresh {ts},
                last_try_refresh {ts},
                last_synced_at {ts},
                deleted_at {ts},
                updated_at {ts} NOT NULL)""",
            "CREATE INDEX items_user_uuid ON items (user_uuid)",
            """CREATE TABLE accounts (
                id BIGINT PRIMARY KEY,
                item_id BIGINT NOT NULL,
                name TEXT,
                type TEXT,
                currency_code TEXT,
                balance {money},
                accounting_balance {money},
                instant_balance {money},
                iban TEXT,
                data_access TEXT,
                last_refresh_status TEXT,
                pro {bool},
                provider_id BIGINT,
                bridge_updated_at {ts},
                transactions_cursor {ts},
                deleted_at {ts})""",
            "CREATE INDEX accounts_item_id ON accounts (item_id)",
            """CREATE TABLE transactions (
                id BIGINT PRIMARY KEY,
                account_id BIGINT NOT NULL,
                amount {money},
                currency_code TEXT,
                date {date},
                booking_date {date},
                transaction_date {date},
                value_date {date},
                clean_description TEXT,
                provider_description TEXT,
                category_id BIGINT,
                operation_type TEXT,
                future {bool},
                bridge_updated_at {ts},
                deleted_at {ts})""",
            "CREATE INDEX transactions_account_date ON transactions (account_id, date)",
            """CREATE TABLE webhook_events (
                id TEXT PRIMARY KEY,
                type TEXT NOT NULL,
                item_id BIGINT,
                received_at {ts} NOT NULL,
                processed_at {ts},
                status TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                body TEXT NOT NULL)""",
            "CREATE INDEX webhook_events_status ON webhook_events (status, received_at)",
        ],
    ),
    (
        2,
        "items.status_changed_at: how long an item has been in its status (1003 alerts)",
        [
            "ALTER TABLE items ADD COLUMN status_changed_at {ts}",
            "UPDATE items SET status_changed_at = updated_at",
            "CREATE INDEX items_status ON items (status, status_changed_at)",
        ],
    ),
    (
        3,
        "transactions_future: an account's live future transactions without reading its whole history",
        [
            # IF NOT EXISTS: an operator may have built it beforehand with CREATE INDEX CONCURRENTLY
            # (see the README), which, unlike this transaction, does not hold writes back.
            "CREATE INDEX IF NOT EXISTS transactions_future ON transactions (account_id, id) "
            "WHERE future = TRUE AND deleted_at IS NULL",
        ],
    ),
    (
        4,
        "accounts.listing: where an unfinished listing of transactions stopped, to resume it",
        ["ALTER TABLE accounts ADD COLUMN listing TEXT"],
    ),
    (
        5,
        "the application API: users by external id, Connect outcomes, erased users, ledger rows by user",
        [
            "CREATE INDEX users_external_user_id ON users (external_user_id)",
            # The end of Connect as the user's browser reported it (untrusted hints: see the receiver).
            """CREATE TABLE connect_sessions (
                id TEXT PRIMARY KEY,
                user_uuid TEXT NOT NULL,
                item_id BIGINT,
                success {bool} NOT NULL,
                step TEXT,
                context TEXT,
                returned_at {ts} NOT NULL)""",
            "CREATE INDEX connect_sessions_item ON connect_sessions (item_id, returned_at)",
            "CREATE INDEX connect_sessions_user ON connect_sessions (user_uuid)",
            # Users whose data was purged: what keeps a late webhook from bringing a row of theirs
            # back, and DELETE idempotent. Only ids are kept: Bridge's uuid, a hash of the app's id.
            """CREATE TABLE erased_users (
                uuid TEXT PRIMARY KEY,
                external_user_id_hash TEXT,
                erased_at {ts} NOT NULL)""",
            "CREATE INDEX erased_users_external ON erased_users (external_user_id_hash)",
            "ALTER TABLE webhook_events ADD COLUMN user_uuid TEXT",
            "CREATE INDEX webhook_events_user ON webhook_events (user_uuid)",
            "CREATE INDEX webhook_events_item ON webhook_events (item_id)",
        ],
    ),
    (
        6,
        "a second provider: users, items, accounts and events say whose they are; Powens user tokens",
        [
            # Each provider's rows keep their own id space (docs/design.md, Two providers): Bridge's
            # ids as Bridge gives them, Powens's negated, a Powens user "powens-<id>". So no key
            # changes, and these columns, whose constant default PostgreSQL and SQLite both add
            # without rewriting the table, are all today's rows need: every one of them is Bridge's.
            "ALTER TABLE users ADD COLUMN provider TEXT NOT NULL DEFAULT 'bridge'",
            "ALTER TABLE items ADD COLUMN provider TEXT NOT NULL DEFAULT 'bridge'",
            "ALTER TABLE accounts ADD COLUMN provider TEXT NOT NULL DEFAULT 'bridge'",
            "ALTER TABLE webhook_events ADD COLUMN provider TEXT NOT NULL DEFAULT 'bridge'",
            # A Powens user's permanent token (Bridge's last two hours and stay in Redis), encrypted.
            """CREATE TABLE user_tokens (
                user_uuid TEXT PRIMARY KEY,
                provider TEXT NOT NULL,
                token TEXT NOT NULL,
                updated_at {ts} NOT NULL)""",
        ],
    ),
]

_LOCK_ID = 0x62726964  # "brid": the advisory lock all bridgehook upgrades share


def _prepare(tx: Tx) -> set[int]:
    if tx.dialect == "postgresql":
        tx.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
        f"applied_at {TYPES[tx.dialect]['ts']} NOT NULL)"
    )
    return {row[0] for row in tx.execute("SELECT version FROM schema_migrations").fetchall()}


class SchemaNotReady(Exception):
    """The database lacks migrations this code needs, or this role may not read which it has; the
    message says what to do."""


def pending(db: Database) -> list[int]:
    """The versions this code needs that the database lacks, read without DDL and without the
    upgrades' lock: the runtime role needs no DDL rights, and a process that starts during a long
    upgrade gets its answer at once (the upgrade's versions are pending until it commits) instead of
    waiting for it. An upgrade locks ``schema_migrations`` for writes only, which reads ignore."""
    with db.transaction(read_only=True) as tx:
        if tx.dialect == "postgresql":
            found = tx.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        else:
            found = tx.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone()
        rows = tx.execute("SELECT version FROM schema_migrations").fetchall() if found and found[0] else []
    applied = {row[0] for row in rows}
    return [version for version, _, _ in MIGRATIONS if version not in applied]


def require_current(db: Database) -> None:
    """What the worker and the scheduler check before they start: SchemaNotReady unless every
    migration this code knows is applied (a newer schema is fine: migrations only expand it)."""
    try:
        missing = pending(db)
    except psycopg.errors.InsufficientPrivilege as exc:  # the role's grants are missing (DATABASE_URL's)
        raise SchemaNotReady(
            f"the database refused to read the schema's version ({exc.diag.message_primary}): "
            "grant DATABASE_URL's role the runtime privileges of docs/deploy.md, Database roles"
        ) from None
    if missing:
        raise SchemaNotReady(f"the database lacks migrations {missing}: run `bridgehook db upgrade` first")


def upgrade(db: Database) -> list[int]:
    """Apply every migration not yet applied; return the versions applied now."""
    done = []
    with db.transaction() as tx:
        applied = _prepare(tx)
        for version, description, statements in MIGRATIONS:
            if version in applied:
                continue
            for statement in statements:
                tx.execute(statement.format(**TYPES[tx.dialect]))
            tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (%s, %s, %s)",
                (version, description, datetime.now(UTC)),
            )
            done.append(version)
    return done
