"""In-memory state of the fake Bridge: users, items, accounts, transactions, tokens, faults, request
budgets (rate limits), request log.

Everything is guarded by one re-entrant lock (``World.lock``). Internal records keep the API fields
(``None`` meaning "omitted when rendered") plus bookkeeping; ``snapshot()`` and the ``api_*`` views
render them exactly as the HTTP API does.
"""

# ruff: noqa: S311 - seeded, reproducible pseudo-randomness is the point of a fake

from __future__ import annotations

import bisect
import json
import math
import random
import secrets
import threading
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

__all__ = [
    "BUDGET_KINDS",
    "Budgets",
    "Fault",
    "Faults",
    "Limit",
    "Refusal",
    "RequestRecord",
    "World",
    "iso_ms",
    "parse_iso_ms",
    "render_json",
    "seed_demo",
]

OBFUSCATED = "XXXX"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- rendering ---------------------------------------------------------------------------------------
def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds and Z: 2026-11-25T21:00:00.123Z."""
    moment = _EPOCH + timedelta(milliseconds=ms)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def parse_iso_ms(text: str) -> int:
    """ISO 8601 (with or without fraction, Z / +00:00 / other offset, naive = UTC) to epoch ms, floored.
    A "+" turned into a space by form decoding is put back."""
    text = text.strip()
    if len(text) > 10 and text[-6] == " ":
        text = f"{text[:-6]}+{text[-5:]}"
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def render(data: dict[str, Any]) -> dict[str, Any]:
    """API rendering of version 2025-01-15: keys whose value is None are omitted."""
    return {k: v for k, v in data.items() if v is not None}


def render_json(obj: Any) -> str:
    """Compact JSON where Decimal is written literally (-12.30 stays -12.30)."""
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            raise ValueError(f"cannot render {obj} as JSON")
        return format(obj, "f")
    if isinstance(obj, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{render_json(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ",".join(render_json(v) for v in obj) + "]"
    return json.dumps(obj, allow_nan=False)


def _decimal(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


# -- deterministic transaction content ---------------------------------------------------------------
# (clean description, provider description, category id, operation type, min cents, max cents)
_TEMPLATES = [
    ("Carrefour Market", "CB CARREFOUR MKT {d} PARIS 15", 273, "card", -15000, -350),
    ("Monoprix", "CB MONOPRIX {d} PARIS", 273, "card", -8000, -199),
    ("SNCF", "CB SNCF INTERNET {d}", 197, "card", -12000, -1500),
    ("Total Energies", "CB TOTAL MARKETING {d} LYON", 87, "card", -9000, -2000),
    ("Restaurant Le Petit Zinc", "CB LE PETIT ZINC {d}", 83, "card", -6500, -1200),
    ("Netflix", "PRLV SEPA NETFLIX.COM", 319, "direct_debit", -1799, -1099),
    ("EDF", "PRLV SEPA EDF CLIENTS PARTICULIERS", 217, "direct_debit", -14000, -4000),
    ("Retrait DAB", "RETRAIT DAB {d} BNP PARIS", 85, "withdrawal", -20000, -2000),
    ("Salaire ACME", "VIR SEPA ACME SAS SALAIRE", 230, "transfer", 180000, 320000),
    ("Remboursement Alice", "VIR INST M ALICE MARTIN", 283, "transfer", 1000, 9000),
    ("Chèque 0012345", "CHEQUE 0012345", 1, "check", -30000, -2500),
]


def _generate_transaction(rng: random.Random, today: date, future: bool) -> dict[str, Any]:
    clean, provider, category, operation, low, high = rng.choice(_TEMPLATES)
    cents = rng.randint(low, high) or -1
    if future:  # a deferred debit card line, booked at the end of the month
        operation, cents = "deferred_debit_card", -abs(cents)
        booked = today + timedelta(days=rng.randint(1, 30))
        made = today - timedelta(days=rng.randint(0, 3))
    else:
        booked = today - timedelta(days=rng.randint(0, 90))
        made = booked - timedelta(days=rng.randint(0, 2))
    return {
        "clean_description": clean,
        "provider_description": provider.format(d=f"{made:%d/%m}"),
        "amount": Decimal(cents).scaleb(-2),
        "date": booked.isoformat(),
        "booking_date": booked.isoformat(),
        "transaction_date": made.isoformat(),
        "value_date": (booked + timedelta(days=rng.randint(0, 1))).isoformat(),
        "category_id": category,
        "future": future,
        "operation_type": operation,
    }


# -- faults ------------------------------------------------------------------------------------------
class Fault(NamedTuple):
    status: int
    retry_after: int | None = None


class Faults:
    """Injected failures; the app consults them for every request (item faults inside the routes)."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._queue: deque[Fault] = deque()
        self._items: dict[int, int] = {}
        self._delay = 0.0
        self._latency = (0.0, 0.0)  # (mean, jitter) seconds
        self._latency_rng = random.Random(0)
        self._p500 = self._p429 = 0.0
        self._ratio_retry_after = 0
        self._rng = random.Random(0)

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._queue.extend([Fault(status)] * n)

    def rate_limit_next(self, n: int, retry_after: int = 1) -> None:
        with self._lock:
            self._queue.extend([Fault(429, retry_after)] * n)

    def set_ratios(self, p500: float = 0.0, p429: float = 0.0, retry_after: int = 0, seed: int = 0) -> None:
        with self._lock:
            self._p500, self._p429, self._ratio_retry_after = p500, p429, retry_after
            self._rng = random.Random(seed)

    def fail_item(self, item_id: int, status: int = 500) -> None:
        with self._lock:
            self._items[item_id] = status

    def unfail_item(self, item_id: int) -> None:
        with self._lock:
            self._items.pop(item_id, None)

    def delay(self, seconds: float) -> None:
        with self._lock:
            self._delay = seconds

    def latency(self, mean: float, jitter: float = 0.0, seed: int = 0) -> None:
        """Realistic latency: each request waits a uniform draw in ``mean ± jitter`` seconds (on top of
        ``delay``); ``mean=0`` turns it off. Its own seeded generator, so that switching latency on does
        not change the sequence of ratio faults. ``jitter <= mean`` keeps the mean the real mean."""
        if not 0 <= jitter <= mean:
            raise ValueError(f"latency needs 0 <= jitter <= mean, not mean={mean} jitter={jitter}")
        with self._lock:
            self._latency = (mean, jitter)
            self._latency_rng = random.Random(seed)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._items.clear()
            self._delay = self._p500 = self._p429 = 0.0
            self._latency = (0.0, 0.0)
            self._ratio_retry_after = 0

    @property
    def delay_seconds(self) -> float:
        with self._lock:
            return self._delay

    @property
    def latency_seconds(self) -> tuple[float, float]:
        """(mean, jitter) of the latency option, (0.0, 0.0) when off."""
        with self._lock:
            return self._latency

    def next_delay(self) -> float:
        """Seconds the next request waits before it is handled: the fixed delay plus a latency draw."""
        with self._lock:
            mean, jitter = self._latency
            drawn = self._latency_rng.uniform(mean - jitter, mean + jitter) if mean > 0 else 0.0
            return self._delay + drawn

    def take(self) -> Fault | None:
        """The fault for the next request, if any: queued one-shot faults first, then the ratios."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self._p500 or self._p429:
                draw = self._rng.random()
                if draw < self._p500:
                    return Fault(500)
                if draw < self._p500 + self._p429:
                    return Fault(429, self._ratio_retry_after)
            return None

    def item_status(self, item_id: int | None) -> int | None:
        with self._lock:
            return None if item_id is None else self._items.get(item_id)


# -- request budgets (rate limits) -------------------------------------------------------------------
BUDGET_KINDS = ("app", "user", "token")
Limit = tuple[int, float]  # (N, S): at most N requests per S seconds


class Refusal(NamedTuple):
    """Why a request gets a 429: the budget that refused it, whole seconds until it admits one more."""

    kind: str
    retry_after: int


class Budgets:
    """Bridge's documented rate limits: N requests per S seconds per application (the client id), per user
    (bearer token requests, by user uuid) and per user's token requests (POST /authorization/token).

    An exact sliding window, a log of the admitted requests' times per key: a fixed window would let a
    client burst twice its budget around the window's edge, which the real API does not allow, and a
    client tuned against such a fake would be throttled in production. A request is admitted by all its
    budgets or by none: a refused one is logged nowhere, so a client retrying too early does not push its
    own window further out. Every budget is unlimited (and logs nothing) until ``set``."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._limits: dict[str, Limit | None] = dict.fromkeys(BUDGET_KINDS)
        self._admitted: dict[tuple[str, str], deque[float]] = {}  # (kind, key) -> admission times
        self._refused = dict.fromkeys(BUDGET_KINDS, 0)

    def set(self, *, app: Limit | None = None, user: Limit | None = None, token: Limit | None = None) -> None:
        """Replace all three budgets (None: unlimited) and start them full: logs of the previous
        configuration do not carry over, so a test's budget is its own. The refusal counters stay."""
        limits = {"app": app, "user": user, "token": token}
        for kind, limit in limits.items():
            if limit is not None and (limit[0] < 1 or limit[1] <= 0):
                raise ValueError(f"the {kind} budget needs N >= 1 requests per S > 0 seconds, not {limit}")
        with self._lock:
            self._limits = limits
            self._admitted.clear()

    def clear(self) -> None:
        """Unlimited again, with logs and refusal counters forgotten."""
        with self._lock:
            self.set()
            self._refused = dict.fromkeys(BUDGET_KINDS, 0)

    @property
    def limits(self) -> dict[str, Limit | None]:
        with self._lock:
            return dict(self._limits)

    @property
    def refused(self) -> dict[str, int]:
        """429s answered for budget reasons, by kind; each counted once, under the kind it names."""
        with self._lock:
            return dict(self._refused)

    def admit(self, keys: dict[str, str], now: float | None = None) -> Refusal | None:
        """Charge a request to ``keys`` (kind -> key: client id, user uuid, ...). None when every limited
        budget has room, the request then logged in each; otherwise nothing is logged and the Refusal names
        the budget with the longest wait (the request needs them all), which is counted."""
        with self._lock:
            now = time.monotonic() if now is None else now
            logs: list[deque[float]] = []
            refusal: Refusal | None = None
            for kind, key in keys.items():
                limit = self._limits[kind]
                if limit is None:
                    continue
                count, window = limit
                log = self._admitted.setdefault((kind, key), deque())
                while log and log[0] <= now - window:
                    log.popleft()
                if len(log) >= count:  # room again once the oldest entries beyond count - 1 have expired
                    wait = max(1, math.ceil(log[len(log) - count] + window - now))
                    if refusal is None or wait > refusal.retry_after:
                        refusal = Refusal(kind, wait)
                logs.append(log)
            if refusal is not None:
                self._refused[refusal.kind] += 1
                return refusal
            for log in logs:
                log.append(now)
            return None


_ITEM_FIELDS = ("status_code_info", "status_code_description", "provider_id", "authentication_expires_at")
_AMOUNT_FIELDS = ("amount", "balance", "accounting_balance", "instant_balance")
_TXN_ORDER = (
    "id",
    "clean_description",
    "provider_description",
    "amount",
    "date",
    "booking_date",
    "transaction_date",
    "value_date",
    "updated_at",
    "currency_code",
    "category_id",
    "account_id",
    "deleted",
    "future",
    "operation_type",
)
_TXN_FIELDS = frozenset(_TXN_ORDER) - {"id", "updated_at", "account_id"}


class RequestRecord(NamedTuple):
    method: str
    path: str
    query: str
    status: int
    user_uuid: str | None
    time: float  # time.monotonic() when the request arrived


@dataclass
class _Rec:
    data: dict[str, Any]
    created_ms: int
    updated_ms: int
    owner: str = ""  # the user uuid, for items
    deleted: bool = False


class World:
    def __init__(
        self,
        *,
        client_id: str = "fake-client-id",
        client_secret: str = "fake-client-secret",  # noqa: S107 - a fake's well-known default
        token_ttl_seconds: float = 7200,
        page_limit_max: int = 500,
        page_size: int | None = None,
        seed: int = 0,
    ) -> None:
        """``page_size``: at most this many resources a page, whatever ``limit`` asks (Bridge may serve
        fewer than asked): small histories then span pages, as Bridge's long ones do."""
        self.lock = threading.RLock()
        self.client_id, self.client_secret = client_id, client_secret
        self.token_ttl_seconds, self.page_limit_max, self.seed = token_ttl_seconds, page_limit_max, seed
        self.page_size = page_size
        self.faults = Faults(self.lock)
        self.budgets = Budgets(self.lock)
        self.requests: list[RequestRecord] = []
        self._rng = random.Random(seed)
        self._clock_ms = int(time.time() * 1000)
        self._users: dict[str, _Rec] = {}
        self._items: dict[int, _Rec] = {}
        self._accounts: dict[int, _Rec] = {}
        self._txns: dict[int, _Rec] = {}
        # Indexes over what never changes once created (an item's owner, an account's item, a
        # transaction's account; records are never removed): each request looks at its user's objects
        # only, not at the whole world.
        self._user_items: dict[str, list[int]] = {}
        self._item_accounts: dict[int, list[int]] = {}
        self._account_txns: dict[int, list[int]] = {}  # sorted
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (user uuid, expiry epoch seconds)
        self._next_id = {"item": 4_000_001, "account": 20_000_001, "txn": 50_000_001}
        self._event_marks: dict[int, int] = {}  # account id -> clock at its last item.account.updated
        # Where the fake Connect page delivers the webhooks it causes (fakebridge.connect), e.g.
        # ``WebhookSender(url, secret).send``; None sends none.
        self.webhooks: Callable[[str, dict[str, Any]], object] | None = None

    # -- clock and ids -------------------------------------------------------------------------------
    def _tick(self) -> int:
        """Advance the fake clock by at least 1 ms (it never falls behind real time) and return it."""
        self._clock_ms = max(self._clock_ms + 1, int(time.time() * 1000))
        return self._clock_ms

    def now_iso(self) -> str:
        with self.lock:
            return iso_ms(self._clock_ms)

    def _take_id(self, kind: str, wanted: int | None, table: dict[int, _Rec]) -> int:
        new_id = self._next_id[kind] if wanted is None else wanted
        if new_id in table:
            raise ValueError(f"{kind} {new_id} already exists")
        self._next_id[kind] = max(self._next_id[kind], new_id + 1)
        return new_id

    # -- lookups (internal) --------------------------------------------------------------------------
    def _live_user(self, user_uuid: str) -> _Rec:
        rec = self._users.get(user_uuid)
        if rec is None or rec.deleted:
            raise KeyError(f"no user {user_uuid}")
        return rec

    def _live(self, table: dict[int, _Rec], key: int, kind: str) -> _Rec:
        rec = table.get(key)
        if rec is None or rec.deleted:
            raise KeyError(f"no {kind} {key}")
        return rec

    def _item_status(self, item_id: int) -> int:
        return int(self._items[item_id].data["status"])

    def _account_obfuscated(self, account: _Rec) -> bool:
        return self._item_status(account.data["item_id"]) == 1100

    # -- users, items, accounts ----------------------------------------------------------------------
    def add_user(self, external_user_id: str | None = None, uuid: str | None = None) -> str:
        with self.lock:
            uuid = uuid or str(uuidlib.UUID(int=self._rng.getrandbits(128), version=4))
            if uuid in self._users:
                raise ValueError(f"user {uuid} already exists")
            if external_user_id is not None and self._find_external(external_user_id) is not None:
                raise ValueError(f"external_user_id {external_user_id!r} already used")
            now = self._tick()
            self._users[uuid] = _Rec({"uuid": uuid, "external_user_id": external_user_id}, now, now)
            return uuid

    def user_by_external_id(self, external_user_id: str) -> str | None:
        """The uuid of the live user with this external_user_id, if any."""
        with self.lock:
            return self._find_external(external_user_id)

    def _find_external(self, external_user_id: str) -> str | None:
        for key, rec in self._users.items():
            if not rec.deleted and rec.data["external_user_id"] == external_user_id:
                return key
        return None

    def add_item(
        self,
        user_uuid: str,
        *,
        item_id: int | None = None,
        status: int = 0,
        status_code_info: str | None = None,
        status_code_description: str | None = None,
        provider_id: int = 574,
        authentication_expires_at: str | None = None,
    ) -> int:
        with self.lock:
            self._live_user(user_uuid)
            item_id = self._take_id("item", item_id, self._items)
            now = self._tick()
            data = {
                "id": item_id,
                "status": status,
                "status_code_info": status_code_info,
                "status_code_description": status_code_description,
                "provider_id": provider_id,
                "last_successful_refresh": iso_ms(now) if status == 0 else None,
                "last_try_refresh": iso_ms(now),
                "authentication_expires_at": authentication_expires_at,
            }
            self._items[item_id] = _Rec(data, now, now, owner=user_uuid)
            self._user_items.setdefault(user_uuid, []).append(item_id)
            return item_id

    def add_account(
        self,
        item_id: int,
        *,
        account_id: int | None = None,
        name: str = "Compte courant",
        type: str = "checking",
        currency_code: str = "EUR",
        balance: str | Decimal = "1000.00",
        iban: str | None = "FR7630006000011234567890189",
        data_access: str = "enabled",
        pro: bool = False,
        **extra: Any,
    ) -> int:
        with self.lock:
            item = self._live(self._items, item_id, "item")
            account_id = self._take_id("account", account_id, self._accounts)
            now = self._tick()
            data: dict[str, Any] = {
                "id": account_id,
                "name": name,
                "balance": _decimal(balance),
                "accounting_balance": _decimal(balance),
                "instant_balance": _decimal(balance),
                "updated_at": iso_ms(now),
                "last_refresh_status": "ok",
                "type": type,
                "currency_code": currency_code,
                "item_id": item_id,
                "provider_id": item.data["provider_id"],
                "data_access": data_access,
                "pro": pro,
                "iban": iban,
            }
            data.update(
                {k: _decimal(v) if k in _AMOUNT_FIELDS and v is not None else v for k, v in extra.items()}
            )
            self._accounts[account_id] = _Rec(data, now, now)
            self._item_accounts.setdefault(item_id, []).append(account_id)
            self._event_marks[account_id] = now
            return account_id

    def update_account(self, account_id: int, **fields: Any) -> None:
        with self.lock:
            rec = self._live(self._accounts, account_id, "account")
            if {"id", "updated_at", "item_id"} & fields.keys():
                raise ValueError("id, item_id and updated_at cannot be set")
            rec.data.update(
                {k: _decimal(v) if k in _AMOUNT_FIELDS and v is not None else v for k, v in fields.items()}
            )
            rec.updated_ms = self._tick()
            rec.data["updated_at"] = iso_ms(rec.updated_ms)

    def delete_account(self, account_id: int) -> None:
        with self.lock:
            rec = self._live(self._accounts, account_id, "account")
            rec.deleted, rec.updated_ms = True, self._tick()

    def set_item_status(
        self,
        item_id: int,
        status: int,
        status_code_info: str | None = None,
        status_code_description: str | None = None,
    ) -> None:
        """A refresh attempt: bumps last_try_refresh; on success (0) also last_successful_refresh and
        the updated_at of the item's enabled accounts (so that updated_at >= last_try_refresh)."""
        with self.lock:
            rec = self._live(self._items, item_id, "item")
            now = self._tick()
            rec.updated_ms = now
            rec.data.update(status=status, status_code_info=status_code_info)
            rec.data.update(status_code_description=status_code_description, last_try_refresh=iso_ms(now))
            if status == 0:
                rec.data["last_successful_refresh"] = iso_ms(now)
                for acc_id in self._item_account_ids(item_id):
                    if self._accounts[acc_id].data.get("data_access") != "disabled":
                        self.update_account(acc_id)

    def _item_account_ids(self, item_id: int) -> list[int]:
        return sorted(k for k in self._item_accounts.get(item_id, ()) if not self._accounts[k].deleted)

    def delete_item(self, item_id: int) -> None:
        with self.lock:
            rec = self._live(self._items, item_id, "item")
            for acc_id in self._item_account_ids(item_id):
                self.delete_account(acc_id)
            rec.deleted, rec.updated_ms = True, self._tick()

    def delete_user(self, user_uuid: str) -> None:
        """Deletes the user, its items and accounts, and revokes its tokens."""
        with self.lock:
            rec = self._live_user(user_uuid)
            for item_id in sorted(
                k for k, i in self._items.items() if not i.deleted and i.owner == user_uuid
            ):
                self.delete_item(item_id)
            rec.deleted, rec.updated_ms = True, self._tick()
            self._tokens = {t: v for t, v in self._tokens.items() if v[0] != user_uuid}

    # -- transactions --------------------------------------------------------------------------------
    def add_transactions(
        self, account_id: int, count: int, *, future: bool = False, start_id: int | None = None
    ) -> list[int]:
        """``count`` transactions with content derived from (seed, transaction id); future ones are dated
        1-30 days ahead, past ones up to 90 days back. Ids are consecutive from ``start_id`` if given."""
        with self.lock:
            account = self._live(self._accounts, account_id, "account")
            first = self._next_id["txn"] if start_id is None else start_id
            ids = list(range(first, first + count))
            if any(i in self._txns for i in ids):
                raise ValueError(f"transaction ids {ids[0]}..{ids[-1]} overlap existing ones")
            today = (_EPOCH + timedelta(milliseconds=self._clock_ms)).date()
            for txn_id in ids:
                self._take_id("txn", txn_id, self._txns)
                now = self._tick()
                data = _generate_transaction(random.Random(f"{self.seed}:{txn_id}"), today, future)
                data.update(
                    id=txn_id,
                    updated_at=iso_ms(now),
                    currency_code=account.data["currency_code"],
                    account_id=account_id,
                    deleted=False,
                )
                self._txns[txn_id] = _Rec({k: data[k] for k in _TXN_ORDER}, now, now)
                bisect.insort(self._account_txns.setdefault(account_id, []), txn_id)
            return ids

    def update_transaction(self, transaction_id: int, **fields: Any) -> None:
        with self.lock:
            rec = self._live(self._txns, transaction_id, "transaction")
            unknown = fields.keys() - _TXN_FIELDS
            if unknown:
                raise ValueError(f"cannot set {sorted(unknown)} on a transaction")
            rec.data.update({k: _decimal(v) if k == "amount" else v for k, v in fields.items()})
            rec.updated_ms = self._tick()
            rec.data["updated_at"] = iso_ms(rec.updated_ms)

    def delete_transaction(self, transaction_id: int) -> None:
        self.update_transaction(transaction_id, deleted=True)

    # -- ground truth --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Live entities rendered as the API renders them (without 1100 obfuscation), transactions of live
        accounts including deleted ones; ``deleted`` lists the ids of deleted users, items and accounts."""
        with self.lock:
            live_accounts = {k for k, a in self._accounts.items() if not a.deleted}
            return {
                "users": {k: render(u.data) for k, u in sorted(self._users.items()) if not u.deleted},
                "items": {k: render(i.data) for k, i in sorted(self._items.items()) if not i.deleted},
                "accounts": {k: render(a.data) for k, a in sorted(self._accounts.items()) if not a.deleted},
                "transactions": {
                    k: render(t.data)
                    for k, t in sorted(self._txns.items())
                    if t.data["account_id"] in live_accounts
                },
                "deleted": {
                    "users": sorted(k for k, u in self._users.items() if u.deleted),
                    "items": sorted(k for k, i in self._items.items() if i.deleted),
                    "accounts": sorted(k for k, a in self._accounts.items() if a.deleted),
                },
            }

    def reset_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    def record_request(self, record: RequestRecord) -> None:
        with self.lock:
            self.requests.append(record)

    # -- tokens --------------------------------------------------------------------------------------
    def issue_token(
        self, user_uuid: str | None = None, external_user_id: str | None = None
    ) -> dict[str, Any] | None:
        """The body of a token response, or None when the user is unknown or deleted."""
        with self.lock:
            if user_uuid is None and external_user_id is not None:
                user_uuid = self._find_external(external_user_id)
            user = self._users.get(user_uuid or "")
            if user is None or user.deleted:
                return None
            token, expires = secrets.token_urlsafe(32), time.time() + self.token_ttl_seconds
            self._tokens[token] = (user.data["uuid"], expires)
            return {
                "access_token": token,
                "expires_at": iso_ms(int(expires * 1000)),
                "user": render(user.data),
            }

    def token_user(self, token: str) -> str | None:
        """The user uuid of a valid (known, unexpired, real wall-clock) token, else None."""
        with self.lock:
            entry = self._tokens.get(token)
            return entry[0] if entry is not None and entry[1] > time.time() else None

    def issued_tokens(self) -> list[str]:
        """Every access token handed out and not revoked (tests search logs for them)."""
        with self.lock:
            return list(self._tokens)

    def expire_tokens(self) -> None:
        with self.lock:
            past = time.time() - 1
            self._tokens = {t: (u, past) for t, (u, _) in self._tokens.items()}

    # -- API views (what a user's token can see), rendered, sorted by id -----------------------------
    def _user_accounts(self, user_uuid: str) -> dict[int, _Rec]:
        """The live accounts of the user's live items, by id (in no particular order)."""
        return {
            k: self._accounts[k]
            for item in self._user_items.get(user_uuid, ())
            if not self._items[item].deleted
            for k in self._item_accounts.get(item, ())
            if not self._accounts[k].deleted
        }

    def _render_account(self, rec: _Rec) -> dict[str, Any]:
        out = render(rec.data)
        if self._account_obfuscated(rec):
            out.update({k: OBFUSCATED for k in ("iban", "name") if k in out})
        return out

    def api_items(self, user_uuid: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                render(i.data)
                for k, i in sorted(self._items.items())
                if not i.deleted and i.owner == user_uuid
            ]

    def api_item(self, user_uuid: str, item_id: int) -> dict[str, Any] | None:
        with self.lock:
            rec = self._items.get(item_id)
            return render(rec.data) if rec and not rec.deleted and rec.owner == user_uuid else None

    def api_accounts(self, user_uuid: str, item_id: int | None = None) -> list[dict[str, Any]] | None:
        """None when ``item_id`` is given but is not one of the user's live items."""
        with self.lock:
            if item_id is not None and self.api_item(user_uuid, item_id) is None:
                return None
            accounts = self._user_accounts(user_uuid)
            return [
                self._render_account(a)
                for k, a in sorted(accounts.items())
                if item_id is None or a.data["item_id"] == item_id
            ]

    def api_account(self, user_uuid: str, account_id: int) -> dict[str, Any] | None:
        with self.lock:
            rec = self._user_accounts(user_uuid).get(account_id)
            return None if rec is None else self._render_account(rec)

    def api_transactions(
        self, user_uuid: str, account_id: int | None = None, since_ms: int | None = None
    ) -> list[dict[str, Any]] | None:
        """Without ``since_ms`` the non-deleted transactions; with it, those updated strictly after it,
        deleted ones included. None when ``account_id`` is given but is not one of the user's accounts."""
        with self.lock:
            accounts = self._user_accounts(user_uuid)
            if account_id is not None:
                if account_id not in accounts:
                    return None
                accounts = {account_id: accounts[account_id]}
            ids = [t for a in accounts for t in self._account_txns.get(a, ())]
            if len(accounts) > 1:
                ids.sort()  # by id, as each account's own list is
            out = []
            for txn_id in ids:
                txn = self._txns[txn_id]
                account = accounts[txn.data["account_id"]]
                if since_ms is None and txn.data["deleted"]:
                    continue
                if since_ms is not None and txn.updated_ms <= since_ms:
                    continue
                rendered = render(txn.data)
                if self._account_obfuscated(account):
                    rendered.update(
                        {
                            k: OBFUSCATED
                            for k in ("clean_description", "provider_description")
                            if k in rendered
                        }
                    )
                out.append(rendered)
            return out

    def item_of_account(self, account_id: int) -> int | None:
        with self.lock:
            rec = self._accounts.get(account_id)
            return None if rec is None else int(rec.data["item_id"])

    # -- webhook contents ----------------------------------------------------------------------------
    def event_item_created(self, item_id: int) -> tuple[str, dict[str, Any]]:
        with self.lock:
            return "item.created", {"item_id": item_id, "user_uuid": self._items[item_id].owner}

    def event_item_refreshed(
        self, item_id: int, *, full_refresh: bool = False, refresh_trigger: str = "scheduled"
    ) -> tuple[str, dict[str, Any]]:
        with self.lock:
            item = self._items[item_id]
            content: dict[str, Any] = {
                "item_id": item_id,
                "user_uuid": item.owner,
                "status_code": item.data["status"],
            }
            if item.data["status_code_info"] is not None:
                content["status_code_info"] = item.data["status_code_info"]
            content.update(
                full_refresh=full_refresh, refresh_trigger=refresh_trigger, account_types="payment"
            )
            if item.data["authentication_expires_at"] is not None:
                content["authentication_expires_at"] = item.data["authentication_expires_at"]
            return "item.refreshed", content

    def event_account(
        self,
        account_id: int,
        kind: str = "updated",
        *,
        nb_new_transactions: int | None = None,
        nb_updated_transactions: int | None = None,
        nb_deleted_transactions: int | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """``item.account.<kind>``; for ``updated`` the nb_* counts default to the transactions of the
        account created / updated / deleted since its previous ``updated`` event (or its creation)."""
        if kind not in ("created", "updated", "deleted"):
            raise ValueError(f"unknown account event kind {kind!r}")
        with self.lock:
            account = self._accounts[account_id]
            item_id = account.data["item_id"]
            content: dict[str, Any] = {"item_id": item_id, "account_id": account_id}
            if kind != "deleted":
                content["balance"] = account.data["balance"]
            content["user_uuid"] = self._items[item_id].owner
            if kind == "updated":
                mark = self._event_marks.get(account_id, account.created_ms)
                new = upd = dele = 0
                for txn in self._txns.values():
                    if txn.data["account_id"] != account_id or txn.updated_ms <= mark:
                        continue
                    is_new, is_del = txn.created_ms > mark, bool(txn.data["deleted"])
                    new += is_new and not is_del
                    upd += not is_new and not is_del
                    dele += is_del and not is_new
                self._event_marks[account_id] = self._clock_ms
                content["nb_new_transactions"] = new if nb_new_transactions is None else nb_new_transactions
                content["nb_updated_transactions"] = (
                    upd if nb_updated_transactions is None else nb_updated_transactions
                )
                content["nb_deleted_transactions"] = (
                    dele if nb_deleted_transactions is None else nb_deleted_transactions
                )
            return f"item.account.{kind}", content

    def event_item_deleted(self, item_id: int) -> tuple[str, dict[str, Any]]:
        with self.lock:
            return "item.deleted", {"item_id": item_id, "user_uuid": self._items[item_id].owner}

    def event_user_deleted(self, user_uuid: str) -> tuple[str, dict[str, Any]]:
        with self.lock:
            if user_uuid not in self._users:
                raise KeyError(f"no user {user_uuid}")
            return "user.deleted", {"user_uuid": user_uuid}


DEMO_USER = "766b2f5d-a942-492c-9ea7-2e5aa88cb672"
DEMO_USER_2 = "16369a41-6d2b-4750-85cd-60e366fbdcb8"


def seed_demo(world: World) -> None:
    """The world our webhook fixtures talk about (see the module docstring of fakebridge)."""
    with world.lock:
        consent = iso_ms(world._clock_ms + 180 * 86_400_000)
        world.add_user("demo-user", uuid=DEMO_USER)
        world.add_item(DEMO_USER, item_id=4568477, authentication_expires_at=consent)
        world.add_account(4568477, account_id=22908770, balance="1678.12")
        world.add_transactions(22908770, 115)
        world.add_transactions(22908770, 5, future=True)
        world.add_account(
            4568477,
            account_id=22908771,
            name="Livret A",
            type="savings",
            balance="5230.50",
            iban="FR7630006000019876543210128",
        )
        world.add_transactions(22908771, 30)
        world.add_item(
            DEMO_USER,
            item_id=4568565,
            status=1003,
            provider_id=408,
            status_code_description="The bank is temporarily unavailable",
        )
        world.add_account(4568565, account_id=22908780, balance="-45.20", iban="FR7610278060310002003540147")
        world.add_transactions(22908780, 10)
        world.add_user("demo-user-2", uuid=DEMO_USER_2)
        world.add_item(DEMO_USER_2, item_id=6365343, authentication_expires_at=consent)
        world.add_account(6365343, account_id=16623323, balance="312.00", iban="FR7617515900000800123456781")
        world.add_transactions(16623323, 20)
