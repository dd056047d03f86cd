"""``GET /connect/callback``: where Bridge sends the user's browser at the end of Connect.

Bridge appends ``user_uuid`` (or ``uuid``), ``item_id``, ``success``, ``step`` and ``context`` to the
``callback_url`` the API gave the session (``CONNECT_CALLBACK_URL``). Nothing in them is signed:
anyone can call this URL with anything, so they are hints, never facts. The receiver only checks
their form and hands them to a job (``workers.jobs.connect_returned``), which records the outcome in
``connect_sessions`` for a user we know and, when ``success=true`` and the item is the user's (ours,
or Bridge's answer to the user's own token), syncs it; the webhooks that follow remain the source of
truth. The receiver writes only Redis, as for webhooks: the job goes through the same enqueue script,
so it is numbered like them and its sync coalesces with theirs (the item's lock and watermark).

The browser is answered 303 to ``CONNECT_RETURN_URL`` with ``item_id``, ``success``, ``step`` and
``context``, the checked values only, URL-encoded; a malformed or missing one gets
``error=invalid_callback`` instead, and more than ``CONNECT_CALLBACK_RATE_LIMIT`` callbacks in its
window (all clients together) ``error=busy``, so that the URL cannot be used to flood the queue. No
answer is a page, none repeats raw input, none is a 500: an unreachable Redis still sends the user
back (the outcome is then lost, the webhooks are not).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from urllib.parse import urlencode, urlsplit

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from service.events import UUID_FORM
from service.logs import get_logger
from service.queue import KEY_PREFIX, ArchivedDelivery, EventQueue, QueueUnavailable
from service.settings import Settings

log = get_logger("bridgehook.connect")

CALLBACK_PATH = "/connect/callback"
CONNECT_JOB = "workers.jobs.connect_returned"
EVENT_TYPE = "bridgehook.connect"
RATE_KEY = f"{KEY_PREFIX}:connect-callbacks:"
CONTEXT_MAX = 100
_STEP = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ITEM = re.compile(r"[1-9][0-9]{0,18}")
_MAX_ID = 2**63 - 1


class Invalid(ValueError):
    pass


def _one(request: Request, *names: str) -> str | None:
    """The parameter's one value (under any of ``names``), None if absent; twice is invalid."""
    values = [v for name in names for v in request.query_params.getlist(name)]
    if len(values) > 1:
        raise Invalid(f"{names[0]} given twice")
    return values[0] if values else None


def outcome(request: Request) -> dict[str, object]:
    """The callback's parameters, checked: the content of the job's event. Invalid if any is malformed."""
    user = _one(request, "user_uuid", "uuid")
    item, success = _one(request, "item_id"), _one(request, "success")
    step, context = _one(request, "step"), _one(request, "context")
    if user is None or not UUID_FORM.fullmatch(user):
        raise Invalid("user_uuid")
    if success not in ("true", "false"):
        raise Invalid("success")
    if item is not None and (not _ITEM.fullmatch(item) or int(item) > _MAX_ID):
        raise Invalid("item_id")
    if step is not None and not _STEP.fullmatch(step):
        raise Invalid("step")
    if context is not None and (len(context) > CONTEXT_MAX or not context.isprintable()):
        raise Invalid("context")
    content: dict[str, object] = {"user_uuid": user.lower(), "success": success == "true"}
    if item is not None:
        content["item_id"] = int(item)
    content.update((k, v) for k, v in (("step", step), ("context", context)) if v is not None)
    return content


class ConnectCallback:
    def __init__(self, settings: Settings, queue: EventQueue) -> None:
        self.settings = settings
        self.queue = queue

    def _back(self, params: dict[str, str]) -> Response:
        target = str(self.settings.connect_return_url)
        separator = "&" if urlsplit(target).query else "?"
        return RedirectResponse(target + separator + urlencode(params), status_code=303)

    async def endpoint(self, request: Request) -> Response:
        if self.settings.connect_return_url is None:
            return JSONResponse({"error": "not_configured", "detail": "CONNECT_RETURN_URL is not set"}, 404)
        try:
            content = outcome(request)
        except Invalid as exc:
            log.info("connect.invalid_callback", parameter=str(exc))
            return self._back({"error": "invalid_callback"})
        back: dict[str, str] = {k: str(content[k]).lower() if k == "success" else str(content[k])
                for k in ("item_id", "success", "step", "context") if k in content}  # fmt: skip
        try:
            if not await self._admit():
                log.warning("connect.rate_limited")
                return self._back({"error": "busy"})
            await self._enqueue(request, content)
        except (RedisError, OSError, QueueUnavailable) as exc:
            log.warning("connect.not_recorded", error=type(exc).__name__)
        return self._back(back)

    async def _admit(self) -> bool:
        """One more callback in the current window of CONNECT_CALLBACK_RATE_LIMIT, if it has room."""
        count, seconds = self.settings.connect_callback_rate
        key = RATE_KEY + str(int(time.time()) // seconds)
        pipe = self.queue.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, seconds + 1)
        taken, _ = await pipe.execute()
        return int(taken) <= count

    async def _enqueue(self, request: Request, content: dict[str, object]) -> None:
        now = time.time_ns() // 1_000_000
        event = {"type": EVENT_TYPE, "content": content, "timestamp": now}
        body = json.dumps(event, sort_keys=True, separators=(",", ":")).encode()
        client = request.client.host if request.client else ""
        archive = ArchivedDelivery(EVENT_TYPE.encode(), b"%d" % now, client.encode(), b"", b"", body)
        decision = await self.queue.submit(hashlib.sha256(body).hexdigest(), CONNECT_JOB, event, archive)
        log.info("connect.callback", decision=decision, success=content["success"],
                 item_id=content.get("item_id"))  # fmt: skip
