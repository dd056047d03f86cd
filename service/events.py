"""What a Bridge webhook body must look like, and which job handles each event type.

A body is ``{"type": str, "content": {...}, "timestamp": int}``. Type names are matched
case-insensitively and older uppercase names (``ITEM_REFRESHED``) are normalised to the
dotted form. Types we process map to a job function named by dotted path in ``workers``
(the receiver never imports the workers); every other type is accepted and archived.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Event type -> RQ job function (dotted path). The receiver only names them.
JOB_FUNCTIONS: dict[str, str] = {
    "item.created": "workers.jobs.item_created",
    "item.refreshed": "workers.jobs.item_refreshed",
    "item.account.created": "workers.jobs.account_created",
    "item.account.updated": "workers.jobs.account_updated",
    "item.account.deleted": "workers.jobs.account_deleted",
    "item.deleted": "workers.jobs.item_deleted",
    "user.deleted": "workers.jobs.user_deleted",
}

# Content fields each processed type must carry, with the JSON type they must have.
_ID = (int,)
_UUID = (str,)
REQUIRED_CONTENT: dict[str, dict[str, tuple[type, ...]]] = {
    "item.created": {"item_id": _ID, "user_uuid": _UUID},
    "item.refreshed": {"item_id": _ID, "user_uuid": _UUID},
    "item.account.created": {"item_id": _ID, "account_id": _ID, "user_uuid": _UUID},
    "item.account.updated": {"item_id": _ID, "account_id": _ID, "user_uuid": _UUID},
    "item.account.deleted": {"item_id": _ID, "account_id": _ID, "user_uuid": _UUID},
    "item.deleted": {"item_id": _ID, "user_uuid": _UUID},
    "user.deleted": {"user_uuid": _UUID},
}
# Optional fields we read, checked only when present (2025-01-15 omits nulls).
OPTIONAL_CONTENT: dict[str, tuple[type, ...]] = {
    "status_code": (int,),
    "status_code_info": (str,),
    "full_refresh": (bool,),
    "account_types": (str, list),
    "nb_new_transactions": (int,),
    "nb_updated_transactions": (int,),
    "nb_deleted_transactions": (int,),
}


_OPTIONAL_KEYS = frozenset(OPTIONAL_CONTENT)
_TOP: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("type", (str,)),
    ("content", (dict,)),
    ("timestamp", (int,)),
)


class MalformedEvent(ValueError):
    """The body is signed but is not a Bridge event we can read; the message says why."""


def normalise_type(name: str) -> str:
    """``ITEM_ACCOUNT_UPDATED`` and ``Item.Account.Updated`` both become ``item.account.updated``."""
    return name.strip().lower().replace("_", ".")


_NAMES = {int: "an integer", str: "a string", dict: "an object", bool: "a boolean", list: "a list"}


def _refuse_constant(name: str) -> Any:
    raise MalformedEvent(f"the body holds {name}, which is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise MalformedEvent("the body holds a number past a double's range")
    return value


# NaN, Infinity and numbers past a double's range are refused: Python's json reads and writes them,
# but they are not JSON (RFC 8259), and strict readers and PostgreSQL's jsonb would refuse the
# stored body. Bridge sends none.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite)

# Bridge's events nest three deep (content.account_types). Past this depth a body is refused: a
# body nested near the interpreter's recursion limit parses, then cannot be encoded again for the job.
MAX_DEPTH = 32


def _load(body: bytes) -> Any:
    """The body as JSON, which between systems is UTF-8 (RFC 8259): strictly decoded, so that
    UTF-16, UTF-32 and encoded surrogates (all of which ``json.loads(bytes)`` would accept, and a
    worker could not read back from the job) are refused. The usual body, an object, goes straight
    to the decoder; anything else, or anything left after the object, through ``decode``."""
    text = body.decode("utf-8")
    if text[:2] == '{"':
        value, end = _DECODER.raw_decode(text)
        if end != len(text):
            value = _DECODER.decode(text)
    else:
        value = _DECODER.decode(text)
    # Fewer brackets than the limit cannot nest past it: a count in C spares the usual body the walk.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise MalformedEvent(f"the body nests deeper than {MAX_DEPTH} levels")
    return value


def _depth(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if type(node) is dict else node if type(node) is list else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


# Identifiers a job stores or uses in keys are checked for their form at the door: a NUL, an
# empty or 60 KB value, or ``../../x`` would be queued, then fail in the database or be cut short.
UUID_FORM = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TYPE_FORM = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")  # after normalise_type; archived as such

# Past these a worker cannot store the value: ids are int64 (BIGINT), times end in year 9999.
_MAX_ID = 2**63 - 1
_MAX_TIMESTAMP = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z in milliseconds


def load_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object under the rules of :func:`_load`; MalformedEvent otherwise."""
    try:
        event = _load(body)
    except MalformedEvent:
        raise
    except (ValueError, RecursionError):
        # ValueError covers invalid UTF-8, bad JSON and integers past Python's digit limit.
        raise MalformedEvent("the body is not valid JSON") from None
    if type(event) is not dict:
        raise MalformedEvent("the body is not a JSON object")
    return event


def parse(body: bytes) -> dict[str, Any]:
    """The event as a dict with its ``type`` normalised; MalformedEvent if it is not one."""
    return parse_delivery(body)[0]


def parse_delivery(body: bytes) -> tuple[dict[str, Any], bool]:
    """The event, and whether the body is it verbatim (an object whose type needed no normalising)."""
    event = load_object(body)
    for key, types in _TOP:
        if key not in event:
            raise MalformedEvent(f"the event has no {key!r}")
        # json makes exact dicts, lists, strs, ints, floats, bools and None: the exact type is the
        # check, and a bool (an int to Python, never a Bridge id) is never taken for an int.
        if type(event[key]) not in types:
            raise MalformedEvent(f"the event's {key!r} is not {_NAMES[types[0]]}")
    event_type = normalise_type(event["type"])
    if not event_type:
        raise MalformedEvent("the event's 'type' is empty")
    if event["timestamp"] < 0:
        raise MalformedEvent("the event's 'timestamp' is negative")
    if event["timestamp"] > _MAX_TIMESTAMP:
        raise MalformedEvent("the event's 'timestamp' is past the year 9999")
    if not _TYPE_FORM.fullmatch(event_type):
        raise MalformedEvent("the event's 'type' is not a type name (letters, digits, '.', '_'; at most 100)")
    content = event["content"]
    required = REQUIRED_CONTENT.get(event_type)
    if required is not None:
        for key, types in required.items():
            if key not in content:
                raise MalformedEvent(f"a {event_type} event needs content.{key}")
            value = content[key]
            if type(value) not in types:
                raise MalformedEvent(f"content.{key} is not {_NAMES[types[0]]}")
            if types is _ID and not 0 < value <= _MAX_ID:
                raise MalformedEvent(f"content.{key} is not a positive 64-bit id")
            if types is _UUID and not UUID_FORM.fullmatch(value):
                raise MalformedEvent(f"content.{key} is not a UUID")
        for key in _OPTIONAL_KEYS.intersection(content):
            if type(content[key]) not in OPTIONAL_CONTENT[key]:
                raise MalformedEvent(f"content.{key} has the wrong type")
    verbatim = event_type == event["type"] and body[:1] == b"{"
    event["type"] = event_type
    return event, verbatim


def job_function(event_type: str) -> str | None:
    """The dotted path of the job for a normalised type, or None if we only archive it."""
    return JOB_FUNCTIONS.get(event_type)
