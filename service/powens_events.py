"""What a Powens webhook body must look like, and which job handles each event type.

Unlike Bridge's, a Powens body does not say which event it is: each event type is registered in
Powens's console with its own URL, so the type is the last segment of the path,
``/webhooks/powens/<event>`` (``connection_synced`` for ``CONNECTION_SYNCED``), and it is signed
with the path. The body is the event's own object (``{"user", "connection"}`` for
CONNECTION_SYNCED, the connection for CONNECTION_DELETED, the account for ACCOUNT_DISABLED…) with
an integer ``id_webhook_data`` that identifies the delivery.

The job receives an envelope shaped like a Bridge event, ``{"type", "content", "timestamp"}``
plus ``provider`` and ``id_webhook_data``, with the body as ``content``. The job functions are
named by dotted path in ``workers.powens_jobs`` (the receiver never imports the workers); every
other documented or future type is accepted and archived with no job.

The JSON rules are Bridge's (service/events.py): strict UTF-8, no NaN, at most 32 levels deep; a
number with a fraction (an amount) reaches the job as its text, ``"-23.8"``, never as a float.
"""

from __future__ import annotations

import re
from typing import Any

from service.events import MalformedEvent, load_object

PROVIDER = "powens"

# Event type -> RQ job function (dotted path). ACCOUNT_ENABLED and ACCOUNT_DISABLED carry the user's
# consent; ACCOUNT_FOUND, an account found at the bank, which stays disabled until the user consents:
# CONNECTION_SYNCED carries the activated accounts only, so that is where we learn of the others.
# ACCOUNTS_FETCHED adds nothing those do not, and is archived only, like every other type.
JOB_FUNCTIONS: dict[str, str] = {
    "CONNECTION_SYNCED": "workers.powens_jobs.connection_synced",
    "CONNECTION_DELETED": "workers.powens_jobs.connection_deleted",
    "ACCOUNT_DISABLED": "workers.powens_jobs.account_disabled",
    "ACCOUNT_ENABLED": "workers.powens_jobs.account_enabled",
    "ACCOUNT_FOUND": "workers.powens_jobs.account_found",
    "USER_DELETED": "workers.powens_jobs.user_deleted",
}

# Ids a job needs, by path in the body: each a positive int64 (Powens's ids are integers).
REQUIRED_IDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "CONNECTION_SYNCED": (("user", "id"), ("connection", "id")),
    "CONNECTION_DELETED": (("id",),),
    "ACCOUNT_DISABLED": (("id",), ("id_connection",)),
    "ACCOUNT_ENABLED": (("id",), ("id_connection",)),
    "ACCOUNT_FOUND": (("id",), ("id_connection",)),
    "USER_DELETED": (("id",),),
}

# An event segment of the path: letters, digits, '_' or '-'; archived upper-cased as Powens names it.
_EVENT_FORM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_MAX_ID = 2**63 - 1


def event_type(segment: str) -> str | None:
    """``connection_synced`` or ``CONNECTION-SYNCED`` -> ``CONNECTION_SYNCED``; None if not a name."""
    if not _EVENT_FORM.fullmatch(segment):
        return None
    return segment.upper().replace("-", "_")


def job_function(name: str) -> str | None:
    """The dotted path of the job for an event type, or None if we only archive it."""
    return JOB_FUNCTIONS.get(name)


def _is_id(value: Any) -> bool:
    return type(value) is int and 0 < value <= _MAX_ID


def parse(name: str, body: bytes) -> dict[str, Any]:
    """The body as a dict; MalformedEvent if it is not one, or a processed type lacks an id it needs."""
    # Amounts (balance, coming, a transaction's value) as their text: the job's JSON cannot carry a
    # Decimal, and a float is not the amount Powens wrote (workers.powens_rows reads the text exactly).
    event = load_object(body, fractions_as_text=True)
    if "id_webhook_data" in event and not _is_id(event["id_webhook_data"]):
        raise MalformedEvent("id_webhook_data is not a positive 64-bit id")
    for path in REQUIRED_IDS.get(name, ()):
        node: Any = event
        for key in path:
            node = node.get(key) if type(node) is dict else None
        if not _is_id(node):
            raise MalformedEvent(f"a {name} event needs {'.'.join(path)}, a positive 64-bit id")
    if name == "CONNECTION_SYNCED":
        _check_accounts(event["connection"])
    return event


def _check_accounts(connection: dict[str, Any]) -> None:
    """The accounts and new transactions a CONNECTION_SYNCED carries, written with no fetch."""
    state = connection.get("state")
    if state is not None and type(state) is not str:
        raise MalformedEvent("connection.state is not a string or null")
    for account in _rows(connection.get("accounts", []), "connection.accounts"):
        _rows(account.get("transactions", []), "an account's transactions")


def _rows(value: Any, what: str) -> list[dict[str, Any]]:
    """``value`` if it is a list of objects, each with an id; MalformedEvent otherwise."""
    if type(value) is not list:
        raise MalformedEvent(f"{what} is not a list")
    for row in value:
        if type(row) is not dict or not _is_id(row.get("id")):
            raise MalformedEvent(f"each of {what} needs an id, a positive 64-bit id")
    return value


def envelope(name: str, event: dict[str, Any], received_at_ms: int) -> dict[str, Any]:
    """What the job receives: Bridge's event shape around Powens's body."""
    return {
        "type": name,
        "provider": PROVIDER,
        "id_webhook_data": event.get("id_webhook_data"),
        "content": event,
        "timestamp": received_at_ms,
    }
