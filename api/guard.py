"""The door of the API: a body over 16 KiB is a 413, a ``/v1`` call without one of ``API_TOKENS`` a 401.

Plain ASGI in front of Starlette. The body is read here, whole and bounded (a client that sends more
than the limit, with or without ``Content-Length``, is answered 413 without the rest being read),
and handed on to the route. Tokens are compared in constant time, each configured one against the
presented one, every time, so that timing tells nothing of which, or of how much, matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from service.settings import Secret

MAX_BODY_BYTES = 16 * 1024


class Guard:
    def __init__(self, app: ASGIApp, tokens: Sequence[Secret]) -> None:
        self.app = app
        self._tokens = [t.reveal().encode() for t in tokens]

    def _authorised(self, scope: Scope) -> bool:
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, presented = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
        presented = presented.strip()
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        return matched and bool(presented)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            answer = error_response(400, "invalid_request", "Content-Length is not a number")
            await answer(scope, receive, send)
            return
        if int(length) > MAX_BODY_BYTES:
            await error_response(413, "body_too_large", f"bodies are at most {MAX_BODY_BYTES} bytes")(
                scope, receive, send
            )
            return
        if scope["path"].startswith("/v1/") and not self._authorised(scope):
            answer = error_response(401, "unauthorized", "send Authorization: Bearer <one of API_TOKENS>",
                                    {"WWW-Authenticate": "Bearer"})  # fmt: skip
            await answer(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                await error_response(413, "body_too_large", f"bodies are at most {MAX_BODY_BYTES} bytes")(
                    scope, receive, send
                )
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
