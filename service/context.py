"""Plain ASGI middleware: one request id per request, bound to every log line, then cleared.

An ``X-Request-Id`` from our own ingress is kept when it looks like an id; otherwise we
make one. The id is echoed in the response so that a delivery can be found in the logs.
"""

from __future__ import annotations

import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_HEADER = b"x-request-id"


def _valid(value: bytes) -> bool:
    return 0 < len(value) <= 64 and value.replace(b"-", b"").replace(b"_", b"").isalnum()


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = next((v for k, v in scope["headers"] if k == _HEADER and _valid(v)), None)
        rid = request_id.decode() if request_id else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        raw = rid.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (_HEADER, raw)]
            await send(message)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=rid, path=scope["path"])
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.clear_contextvars()
