"""How to read a Powens row: its JSON as the Bridge-shaped dicts the rest of the pipeline stores.

Pure functions, no I/O: a connection becomes an item dict (:meth:`workers.storage.Storage.upsert_item`),
an account an account dict (:meth:`~workers.storage.Storage.upsert_accounts`), a transaction a
transaction dict (:meth:`workers.writer.Writer.page`). Powens's rows share Bridge's tables in an id space
of their own (:mod:`workers.providers`): a Powens id N is stored as -N, its user as ``powens-<id_user>``;
a connection's ``state`` becomes the Bridge status that asks the same of the user
(:func:`workers.actions.powens_status`). Connector ids (``provider_id``) are kept as Powens gives them:
they name a bank, no row of ours.

Money stays exact: the client parses JSON numbers as ``Decimal`` (never float) and they go on as they
are; a webhook body's arrive as floats, read back as the decimal Powens wrote (:func:`_money`).

**Times.** Powens writes ``YYYY-MM-DD HH:MM:SS`` without a zone. Its documentation says only that the
``*datetime`` fields (a transaction's ``datetime``) are UTC; the one production connector we know of
(Formance's) reads the others (``last_update``, ``expire``, ``disabled``, ``deleted``) as Europe/Paris
time, and so do we (:func:`read_time`), for three reasons: that connector was written against the real
API, a Paris reading is at most two hours off if Powens means UTC (a consent's end, a refresh time: no
decision here turns on hours), and, above all, the delta cursor goes back to Powens through the inverse
function (:func:`powens_time`), so whatever Powens means, ``last_update=<cursor>`` names the instant
Powens wrote: no transaction is skipped either way. In the autumn hour that Paris lives twice, a naive
time is read as its first occurrence (``fold=0``), the earlier instant: a cursor can only move back (a
longer overlap), never past a change. Dates (``date``, ``rdate``, ``vdate``) are days, kept as Powens
writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from workers.actions import powens_status
from workers.providers import stored_id

PARIS = ZoneInfo("Europe/Paris")


def read_time(value: Any, zone: tzinfo = PARIS) -> datetime | None:
    """A naive Powens time as the aware instant (UTC) it means: Europe/Paris time (see the module's
    docstring), or ``zone``'s (UTC for a ``*datetime`` field: :func:`read_utc_time`); one with an
    offset as it says; None for null or ""."""
    if value is None or value == "":
        return None
    parsed = datetime.fromisoformat(str(value))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=zone)).astimezone(UTC)


def read_utc_time(value: Any) -> datetime | None:
    """A ``*datetime`` field, which Powens documents as UTC."""
    return read_time(value, UTC)


def powens_time(moment: datetime) -> str:
    """An instant as Powens writes it (the inverse of :func:`read_time`), to the second below: a filter
    ``last_update=<this>`` (updated *after*) so floored can only list more, never less."""
    if moment.tzinfo is None:
        raise ValueError("powens_time needs an aware datetime")
    return moment.astimezone(PARIS).strftime("%Y-%m-%d %H:%M:%S")


def _iso(value: Any) -> str | None:
    moment = read_time(value)
    return None if moment is None else moment.isoformat()


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


# Powens writes amounts as JSON numbers, and the job carries the body as it came (service/powens_events.py):
# RQ's JSON decodes them as floats. A double gives back any decimal of at most 15 significant digits
# (DBL_DIG) as the shortest text that reads as it, so such a float is exactly the amount Powens wrote.
EXACT_DIGITS = 15


def _money(value: Any) -> Decimal | int | None:
    """An amount, exact: the decimal Powens wrote. A float with more than :data:`EXACT_DIGITS`
    significant digits may not be, and is refused (a ValueError: the job fails, nothing is rounded)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        amount = Decimal(repr(value))
        if not amount.is_finite() or len(amount.as_tuple().digits) > EXACT_DIGITS:
            raise ValueError(f"the amount {value!r} has more than {EXACT_DIGITS} significant digits")
        return amount
    return value if isinstance(value, Decimal | int) else Decimal(str(value))


def item(connection: Mapping[str, Any]) -> dict[str, Any]:
    """A connection as the item Storage.upsert_item takes. ``last_update`` (Powens's last successful
    sync) is both refresh times: the upsert's guard (``last_try_refresh``: an older body never overwrites
    a newer row) and the refresh a complete sync records (``last_successful_refresh``)."""
    state, refreshed = connection.get("state"), _iso(connection.get("last_update"))
    return {
        "id": stored_id(connection["id"]),
        "status": powens_status(_text(state)),
        "status_code_info": _text(state),
        "status_code_description": _text(connection.get("error_message")),
        "provider_id": connection.get("id_connector"),
        "authentication_expires_at": _iso(connection.get("expire")),
        "last_successful_refresh": refreshed,
        "last_try_refresh": refreshed,
    }


def account(row: Mapping[str, Any]) -> dict[str, Any]:
    """An account as Storage.upsert_accounts takes it, and ``deleted_at``: when Powens stopped finding it
    at the bank (its ``deleted``, an aware datetime), None while it is there; the caller marks it
    (Storage.mark_account_deleted). ``balance`` is Powens's (booked); ``instant_balance`` adds its
    ``coming`` (operations not yet booked) when Powens gives one. Disabled (no consent, or withdrawn):
    ``data_access`` "disabled", as Bridge says it."""
    currency = row.get("currency")
    balance, coming = _money(row.get("balance")), _money(row.get("coming"))
    return {
        "id": stored_id(row["id"]),
        "item_id": stored_id(row["id_connection"]),
        "name": _text(row.get("name")),
        "type": _text(row.get("type")),
        "currency_code": currency.get("id") if isinstance(currency, Mapping) else _text(currency),
        "balance": balance,
        "accounting_balance": balance,
        "instant_balance": balance + coming if balance is not None and coming is not None else None,
        "iban": _text(row.get("iban")),
        "data_access": "disabled" if row.get("disabled") else "enabled",
        "pro": row.get("usage") == "ORGA" if row.get("usage") is not None else None,
        "updated_at": _iso(row.get("last_update")),
        "deleted_at": read_time(row.get("deleted")),
    }


# Bridge's text fields of a transaction, each from Powens's: its debit day is Bridge's date and booking
# date, its real day (``rdate``) the day the transaction was made, ``vdate`` its value date.
_TRANSACTION_TEXTS = (
    ("date", "date"), ("booking_date", "date"), ("transaction_date", "rdate"), ("value_date", "vdate"),
    ("provider_description", "original_wording"), ("operation_type", "type"),
)  # fmt: skip


def transaction(row: Mapping[str, Any]) -> dict[str, Any]:
    """A transaction as Writer.page takes it (the keys of workers.bridge.Transaction). ``coming`` (not
    yet booked) is Bridge's ``future``; a ``deleted`` one is written deleted as of its ``last_update``."""
    texts = {ours: _text(row.get(theirs)) for ours, theirs in _TRANSACTION_TEXTS}
    return {
        "id": stored_id(row["id"]),
        "account_id": stored_id(row["id_account"]),
        "amount": _money(row.get("value")),
        "currency_code": None,
        **texts,
        "clean_description": _text(row.get("simplified_wording")) or _text(row.get("wording")),
        "category_id": None,
        "future": bool(row.get("coming")),
        "deleted": bool(row.get("deleted")),
        "updated_at": _iso(row.get("last_update")),
    }
