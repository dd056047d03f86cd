"""RQ job functions, one per processed Bridge event type, importable by dotted path.

The receiver enqueues ``workers.jobs.<name>(event)`` with the event dict (JSON
serializer, job id = SHA-256 of the raw body). What each job does arrives with the
worker issue; until then a job logs what it received and returns.
"""

from __future__ import annotations

from typing import Any

import structlog

log = structlog.stdlib.get_logger("bridgehook.jobs")

Event = dict[str, Any]


def _accept(event: Event) -> dict[str, Any]:
    content = event.get("content", {})
    log.info("job.received", type=event.get("type"), item_id=content.get("item_id"))
    return {"type": event.get("type"), "item_id": content.get("item_id")}


def item_created(event: Event) -> dict[str, Any]:
    return _accept(event)


def item_refreshed(event: Event) -> dict[str, Any]:
    return _accept(event)


def account_created(event: Event) -> dict[str, Any]:
    return _accept(event)


def account_updated(event: Event) -> dict[str, Any]:
    return _accept(event)


def account_deleted(event: Event) -> dict[str, Any]:
    return _accept(event)


def item_deleted(event: Event) -> dict[str, Any]:
    return _accept(event)


def user_deleted(event: Event) -> dict[str, Any]:
    return _accept(event)
