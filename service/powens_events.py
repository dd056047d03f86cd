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

The JSON rules are Bridge's (service/events.py): strict UTF-8, no NaN, at most 32 levels deep.
Amounts travel as Powens wrote them, JSON numbers, which RQ's JSON decodes as floats in the worker:
workers.powens_rows reads each back as the decimal Powens wrote (a float keeps 15 significant
digits exactly, and an amount with more is refused, not rounded).

**Large bodies.** A CONNECTION_SYNCED may be 8 MiB (a connection's first sync). ``json.loads``
would make it Python objects several times its size, and ``json.dumps`` of the envelope another
copy: about 120 MB for one delivery. The receiver therefore reads a body with :func:`read`: msgspec
Structs that declare only the ids a type needs (msgspec checks the syntax and skips every other
field without building it), the rest of our rules checked on the bytes (service/raw_json.py); and
the job's envelope is :func:`envelope_json`, the body spliced in as it came, which the worker
decodes to exactly :func:`envelope`'s dict. A body that way cannot vouch for (a lone surrogate, an
id given twice, ``1e999`` in a string…) is judged by :func:`parse`, the rules' exact form: the
Structs only ever spare memory, never change a decision (tests/test_powens_bodies.py holds the two
equal).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import msgspec

from service import raw_json
from service.events import MAX_DEPTH, MalformedEvent, load_object

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

# Whom a body is about, by where it names them (the receiver's bearer mode reads the user on the
# bytes, service/bearer.py; the ledger both, on the parsed body, workers/providers.subject). Any
# other type: the user at ``id_user``, else ``user.id``; the connection at ``id_connection``.
USER_PATHS: dict[str, tuple[str, ...]] = {
    "CONNECTION_SYNCED": ("user", "id"),
    "ACCOUNTS_FETCHED": ("user", "id"),  # CONNECTION_SYNCED's shape
    "CONNECTION_DELETED": ("id_user",),
    "ACCOUNT_DISABLED": ("id_user",),
    "ACCOUNT_ENABLED": ("id_user",),
    "ACCOUNT_FOUND": ("id_user",),
    "USER_DELETED": ("id",),
}
CONNECTION_PATHS: dict[str, tuple[str, ...]] = {
    "CONNECTION_SYNCED": ("connection", "id"),
    "ACCOUNTS_FETCHED": ("connection", "id"),
    "CONNECTION_DELETED": ("id",),
    "USER_DELETED": (),  # none
}


def at(body: Any, path: tuple[str, ...]) -> Any:
    """What ``body`` (a parsed body) holds at ``path``; None where a step is missing (or no path)."""
    node = body if path else None
    for key in path:
        node = node.get(key) if type(node) is dict else None
    return node


def user_of(name: str, body: dict[str, Any]) -> Any:
    """The ``id_user`` a parsed body of this type names (unchecked: the caller's to read as an id)."""
    if name in USER_PATHS:
        return at(body, USER_PATHS[name])
    return body.get("id_user") if body.get("id_user") is not None else at(body, ("user", "id"))


def connection_of(name: str, body: dict[str, Any]) -> Any:
    """The connection id a parsed body of this type names (unchecked)."""
    return at(body, CONNECTION_PATHS.get(name, ("id_connection",)))


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
    event = load_object(body)
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


_Id = Annotated[int, msgspec.Meta(gt=0, le=_MAX_ID)]


class _Event(msgspec.Struct, kw_only=True, gc=False):
    """Every type: the delivery's id, when it has one (null is not one)."""

    id_webhook_data: _Id | msgspec.UnsetType = msgspec.UNSET


class _Row(msgspec.Struct, gc=False):
    id: _Id


class _Account(_Row, kw_only=True, gc=False):
    transactions: list[_Row] = []


class _Connection(_Row, kw_only=True, gc=False):
    state: str | None = None
    accounts: list[_Account] = []


class _ConnectionSynced(_Event, kw_only=True, gc=False):
    user: _Row
    connection: _Connection


class _WithId(_Event, kw_only=True, gc=False):
    id: _Id


class _WithConnection(_WithId, kw_only=True, gc=False):
    id_connection: _Id


# The REQUIRED_IDS and _check_accounts of parse, as types (tests/test_powens_bodies.py checks them).
_SHAPES: dict[str, type[_Event]] = {
    "CONNECTION_SYNCED": _ConnectionSynced,
    "CONNECTION_DELETED": _WithId,
    "ACCOUNT_DISABLED": _WithConnection,
    "ACCOUNT_ENABLED": _WithConnection,
    "ACCOUNT_FOUND": _WithConnection,
    "USER_DELETED": _WithId,
}
_DECODERS = {name: msgspec.json.Decoder(shape) for name, shape in _SHAPES.items()}
_ANY = msgspec.json.Decoder(_Event)


def read(name: str, body: bytes) -> int | None:
    """The delivery's ``id_webhook_data`` (None without one) once the body passes :func:`parse`'s
    checks, for which it builds no more than the ids; MalformedEvent if it does not."""
    try:
        event = _DECODERS.get(name, _ANY).decode(body)
    except (msgspec.DecodeError, RecursionError):  # a ValidationError is a DecodeError
        event = None
    if event is not None and raw_json.plain(body, MAX_DEPTH):
        return event.id_webhook_data if isinstance(event.id_webhook_data, int) else None
    del event
    found: int | None = parse(name, body).get("id_webhook_data")  # the exact rules decide
    return found


def envelope_json(
    name: str, id_webhook_data: int | None, body: bytes, received_at_ms: int, *, sealed: bool = False
) -> tuple[bytes, ...]:
    """:func:`envelope` as JSON in pieces, around the body as it came: a body :func:`read` accepted
    is JSON under our rules, so the worker's ``json.loads`` makes of it exactly what ``json.dumps``
    of the parsed body would have given, without the body built or encoded again. ``sealed``: the
    body is sealed (service/sealing.py, ASCII), and goes in as the string ``sealed`` instead of
    ``content``, which the worker opens."""
    webhook = b"null" if id_webhook_data is None else b"%d" % id_webhook_data
    head = b'{"type": %s, "provider": "%s", "id_webhook_data": %s, %s' % (
        json.dumps(name).encode(),
        PROVIDER.encode(),
        webhook,
        b'"sealed": "' if sealed else b'"content": ',
    )
    return head, body, b'%s, "timestamp": %d}' % (b'"' if sealed else b"", received_at_ms)


def envelope(name: str, event: dict[str, Any], received_at_ms: int) -> dict[str, Any]:
    """What the job receives: Bridge's event shape around Powens's body."""
    return {
        "type": name,
        "provider": PROVIDER,
        "id_webhook_data": event.get("id_webhook_data"),
        "content": event,
        "timestamp": received_at_ms,
    }
