"""A fake Powens's ground truth: users, connections, accounts and transactions, and its webhook bodies.

Its own clock (``now``, UTC) moves one second at each change, so that every change has a
``last_update`` strictly after the previous one, as the delta listing (``last_update`` = updated *after*)
needs. Times are written as Powens writes them, ``YYYY-MM-DD HH:MM:SS`` without a zone, in Europe/Paris
time (what the one production connector we know of reads them as; Powens documents only its
``*datetime`` fields, as UTC), and a ``last_update`` filter is read the same way. Accounts start
disabled, as at Powens, until the user consents (:meth:`PowensWorld.enable_account`); disabling one
deletes its transactions, as Powens does.
"""

from __future__ import annotations

import random
import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from fakebridge.world import Budgets, Faults

CURRENCY = {"id": "EUR", "name": "Euro", "precision": 2, "symbol": "€"}
WORDINGS = ("CB CARREFOUR CITY", "PRLV SEPA EDF", "VIR SEPA SALAIRE", "CB SNCF", "RETRAIT DAB", "CB FNAC")


PARIS = ZoneInfo("Europe/Paris")
SANDBOX_USER_BUDGET = (30, 60.0)  # Powens's sandbox: 30 calls a minute (per user)


def powens_time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(PARIS).strftime("%Y-%m-%d %H:%M:%S")


def read_powens_time(text: str) -> datetime:
    """The inverse of :func:`powens_time` (ValueError if ``text`` is not ``YYYY-MM-DD HH:MM:SS``)."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=PARIS).astimezone(UTC)


class PRequest(NamedTuple):
    method: str
    path: str
    query: str
    status: int


@dataclass
class PUser:
    id: int
    token: str = field(repr=False)
    deleted: bool = False


@dataclass
class PConnection:
    id: int
    id_user: int
    state: str | None = None
    error_message: str | None = None
    last_update: datetime | None = None
    expire: datetime | None = None


@dataclass
class PAccount:
    id: int
    id_connection: int
    id_user: int
    name: str
    iban: str
    balance: Decimal
    type: str = "checking"
    coming: Decimal | None = None
    disabled: datetime | None = None
    deleted: datetime | None = None
    last_update: datetime | None = None


@dataclass
class PTransaction:
    id: int
    id_account: int
    day: date
    value: Decimal
    wording: str
    coming: bool = False
    deleted: datetime | None = None
    last_update: datetime | None = None
    # Fields rendered as given rather than made up (``rdate``, ``vdate``, ``type``, wordings): a
    # transaction that must read as a fixture says (fakebridge.powens_demo).
    shown: dict[str, Any] = field(default_factory=dict)


class PowensWorld:
    """What the fake Powens knows; every change goes through a method that ticks the clock."""

    def __init__(self, seed: int = 7, start: datetime | None = None) -> None:
        self.random = random.Random(seed)  # noqa: S311 - test data
        self.now = start or datetime(2026, 12, 1, 8, 0, 0, tzinfo=UTC)
        self.client_id, self.client_secret = "fake-powens-client", "fake-powens-secret-0123456789"
        self.users: dict[int, PUser] = {}
        self.connections: dict[int, PConnection] = {}
        self.accounts: dict[int, PAccount] = {}
        self.transactions: dict[int, PTransaction] = {}
        # Served requests, injected faults (one-shot, ratios, latency) and request budgets (kinds "app",
        # "user"; unlimited until set, see :meth:`sandbox_budgets`), as the fake Bridge has them.
        lock = threading.RLock()
        self.requests: list[PRequest] = []
        self.faults = Faults(lock)
        self.budgets = Budgets(lock)
        self.retry_after_header = True  # whether a 429 says when to come back (Powens does not document it)
        self._next = {
            "user": 1000,
            "connection": 4000,
            "account": 7000,
            "transaction": 900_000,
            "webhook": 5_537_000,
        }

    def sandbox_budgets(self, user: tuple[int, float] = SANDBOX_USER_BUDGET) -> None:
        """Refuse a user's calls past Powens's sandbox budget (429), as the real sandbox does."""
        self.budgets.set(user=user)

    def _id(self, kind: str) -> int:
        self._next[kind] += 1
        return self._next[kind]

    def tick(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now

    # -- changes -------------------------------------------------------------------------------------

    def add_user(self) -> PUser:
        user = PUser(self._id("user"), secrets.token_urlsafe(24))
        self.users[user.id] = user
        return user

    def add_connection(self, user_id: int, accounts: int = 2, transactions: int = 5) -> PConnection:
        at = self.tick()
        connection = PConnection(
            self._id("connection"), user_id, last_update=at, expire=at + timedelta(days=180)
        )
        self.connections[connection.id] = connection
        for _ in range(accounts):
            self.add_account(connection.id, transactions)
        return connection

    def add_account(self, connection_id: int, transactions: int = 0) -> PAccount:
        """An account found at the bank: disabled until the user consents, as Powens has them."""
        at, connection = self.tick(), self.connections[connection_id]
        n = sum(1 for a in self.accounts.values() if a.id_connection == connection_id)
        account = PAccount(
            self._id("account"),
            connection_id,
            connection.id_user,
            ("Compte chèque", "Livret A")[n % 2],
            f"FR76300040000{self.random.randrange(10**14):014d}",
            Decimal(self.random.randrange(-5000, 500000)) / 100,
            type=("checking", "savings")[n % 2],
            disabled=at,
            last_update=at,
        )
        self.accounts[account.id] = account
        for _ in range(transactions):
            self.add_transaction(account.id)
        return account

    def add_transaction(
        self, account_id: int, value: Decimal | None = None, coming: bool = False
    ) -> PTransaction:
        at = self.tick()
        amount = value if value is not None else Decimal(self.random.randrange(-20000, 20000)) / 100
        transaction = PTransaction(
            self._id("transaction"),
            account_id,
            at.date() - timedelta(days=self.random.randrange(30)),
            amount,
            self.random.choice(WORDINGS),
            coming=coming,
            last_update=at,
        )
        self.transactions[transaction.id] = transaction
        return transaction

    def update_transaction(self, transaction_id: int, **changes: Any) -> PTransaction:
        transaction = self.transactions[transaction_id]
        for name, value in changes.items():
            setattr(transaction, name, value)
        transaction.last_update = self.tick()
        return transaction

    def delete_transaction(self, transaction_id: int) -> PTransaction:
        at = self.tick()
        transaction = self.transactions[transaction_id]
        transaction.deleted = transaction.last_update = at
        return transaction

    def enable_account(self, account_id: int) -> PAccount:
        account = self.accounts[account_id]
        account.disabled, account.last_update = None, self.tick()
        return account

    def disable_account(self, account_id: int) -> PAccount:
        """The user withdraws consent: Powens deletes the account's transactions."""
        at = self.tick()
        account = self.accounts[account_id]
        account.disabled = account.last_update = at
        for transaction in self.transactions.values():
            if transaction.id_account == account_id and transaction.deleted is None:
                transaction.deleted = transaction.last_update = at
        return account

    def set_state(self, connection_id: int, state: str | None, message: str | None = None) -> PConnection:
        """The outcome of a sync: ``last_update`` is the last *successful* one (Powens's spec), so it
        moves only when the state is back to null; a failed sync leaves it where it was."""
        connection = self.connections[connection_id]
        connection.state, connection.error_message = state, message
        if state is None:
            connection.last_update = self.tick()
        return connection

    def delete_connection(self, connection_id: int) -> PConnection:
        """A hard (GDPR) delete: the connection, its accounts and their transactions are gone."""
        connection = self.connections.pop(connection_id)
        gone = {a.id for a in self.accounts.values() if a.id_connection == connection_id}
        self.accounts = {k: a for k, a in self.accounts.items() if k not in gone}
        self.transactions = {k: t for k, t in self.transactions.items() if t.id_account not in gone}
        return connection

    def delete_user(self, user_id: int) -> PUser:
        for connection in [c for c in self.connections.values() if c.id_user == user_id]:
            self.delete_connection(connection.id)
        user = self.users.pop(user_id)
        user.deleted = True
        return user

    # -- views, as the API renders them ----------------------------------------------------------------

    def user_by_token(self, token: str) -> PUser | None:
        return next((u for u in self.users.values() if secrets.compare_digest(u.token, token)), None)

    def render_connection(self, connection: PConnection) -> dict[str, Any]:
        return {
            "id": connection.id,
            "id_user": connection.id_user,
            "id_connector": 59,
            "state": connection.state,
            "error": connection.state,
            "error_message": connection.error_message,
            "active": True,
            "last_update": powens_time(connection.last_update),
            "expire": powens_time(connection.expire),
            "next_try": None,
        }

    def render_account(self, account: PAccount) -> dict[str, Any]:
        return {
            "id": account.id,
            "id_connection": account.id_connection,
            "id_user": account.id_user,
            "id_source": account.id_connection + 1000,
            "name": account.name,
            "original_name": account.name.upper(),
            "number": account.iban[-11:],
            "iban": account.iban,
            "balance": account.balance,
            "coming": account.coming,
            "currency": CURRENCY,
            "type": account.type,
            "id_type": 2,
            "usage": "PRIV",
            "display": True,
            "bookmarked": False,
            "disabled": powens_time(account.disabled),
            "deleted": powens_time(account.deleted),
            "last_update": powens_time(account.last_update),
        }

    def render_transaction(self, transaction: PTransaction) -> dict[str, Any]:
        day = transaction.day.isoformat()
        return {
            "id": transaction.id,
            "id_account": transaction.id_account,
            "date": day,
            "rdate": day,
            "vdate": day,
            "datetime": None,
            "value": transaction.value,
            "type": "card",
            "original_wording": transaction.wording,
            "simplified_wording": transaction.wording.split(" ", 1)[-1],
            "wording": transaction.wording.title(),
            "coming": transaction.coming,
            "active": True,
            "counterparty": None,
            "date_scraped": day,
            **transaction.shown,
            "deleted": powens_time(transaction.deleted),
            "last_update": powens_time(transaction.last_update),
        }

    def user_accounts(self, user_id: int, include_all: bool) -> list[PAccount]:
        return [
            a
            for a in self.accounts.values()
            if a.id_user == user_id and (include_all or (a.disabled is None and a.deleted is None))
        ]

    # -- webhook bodies ------------------------------------------------------------------------------

    def synced(self, connection_id: int, new: list[int] | None = None) -> dict[str, Any]:
        """A sync of the connection that found ``new`` (and whatever changed since the last one): its
        ``last_update`` moves to now, and the body of the CONNECTION_SYNCED Powens sends after it."""
        self.connections[connection_id].last_update = self.tick()
        return self.connection_synced(connection_id, new)

    def connection_synced(self, connection_id: int, new: list[int] | None = None) -> dict[str, Any]:
        """CONNECTION_SYNCED: the connection, its activated accounts and their ``new`` transactions
        (all of an account's live ones when ``new`` is None)."""
        connection = self.connections[connection_id]
        accounts = []
        for account in self.user_accounts(connection.id_user, include_all=False):
            if account.id_connection != connection_id:
                continue
            rendered = self.render_account(account)
            rendered["transactions"] = [
                self.render_transaction(t)
                for t in self.transactions.values()
                if t.id_account == account.id and t.deleted is None and (new is None or t.id in new)
            ]
            accounts.append(rendered)
        body = {"user": {"id": connection.id_user}, "connection": self.render_connection(connection)}
        body["connection"]["accounts"] = accounts
        return self.webhook(body)

    def webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body with a fresh ``id_webhook_data``, as every Powens delivery carries one."""
        return {**body, "id_webhook_data": self._id("webhook")}
