"""``POST /webhooks/bridge``: source → size → type → signature → shape → enqueue → answer.

Each rejection answers ``{"error": <machine code>, "detail": <human text>}`` with its own
status, logs one line and counts in ``bridgehook_webhook_requests_total{outcome=<code>}``.

| check                                    | answer                                        |
|------------------------------------------|-----------------------------------------------|
| source address not allowed               | 403 forbidden_source                          |
| method other than POST                   | 405 method_not_allowed                        |
| body over the limit (declared or read)   | 413 body_too_large                            |
| Content-Type present and not JSON        | 415 unsupported_media_type                    |
| body not received in time                | 408 request_timeout                           |
| no BridgeApi-Signature                   | 401 missing_signature                         |
| no v1 element matching a secret          | 401 invalid_signature                         |
| not a Bridge event                       | 400 malformed_event                           |
| Redis down or write unconfirmed          | 503 queue_unavailable (Bridge retries)        |
| processed type, first delivery           | 200 {"status": "queued"}                      |
| same body within the dedupe window       | 200 {"status": "duplicate"}                   |
| any other type (payments, TEST_EVENT…)   | 200 {"status": "ignored"} (archived, no job)  |
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from service import events
from service.logs import get_logger
from service.metrics import ENQUEUE_SECONDS, REQUESTS
from service.queue import EventQueue, QueueUnavailable
from service.settings import Settings
from service.signing import HEADER as SIGNATURE_HEADER
from service.signing import SignatureError, SignatureVerifier
from service.sources import SourcePolicy

log = get_logger("bridgehook.webhooks")

_JSON_TYPES = ("application/json",)


class BodyTooLarge(Exception):
    pass


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type in _JSON_TYPES or media_type.endswith("+json")


class WebhookView:
    """The endpoint, holding what it needs; built once per app, not per request."""

    def __init__(self, settings: Settings, queue: EventQueue) -> None:
        self.settings = settings
        self.queue = queue
        self.sources = SourcePolicy(settings.allowed_ips)
        self.verifier = SignatureVerifier(settings.webhook_secrets)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Plain ASGI, so that every method reaches us and gets our own JSON 405."""
        response = await self.handle(Request(scope, receive))
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        client = request.client.host if request.client else None
        if not self.sources.allows(client):
            return _reject(403, "forbidden_source", "this address may not post webhooks", client=client)
        if request.method != "POST":
            return _reject(
                405, "method_not_allowed", "use POST", method=request.method, headers={"Allow": "POST"}
            )

        headers = request.headers
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return _reject(
                413,
                "body_too_large",
                f"the limit is {self.settings.max_body_bytes} bytes",
                declared=int(declared),
            )
        content_type = headers.get("content-type")
        if content_type is not None and not _is_json(content_type):
            return _reject(
                415, "unsupported_media_type", "send application/json", content_type=content_type[:100]
            )
        try:
            with anyio.fail_after(self.settings.read_timeout_seconds):
                body = await self._read_body(request)
        except BodyTooLarge:
            return _reject(413, "body_too_large", f"the limit is {self.settings.max_body_bytes} bytes")
        except TimeoutError:
            return _reject(408, "request_timeout", "the body did not arrive in time")
        except ClientDisconnect:
            return _reject(400, "client_disconnected", "the client left before sending the whole body")

        try:
            self.verifier.verify(headers.get(SIGNATURE_HEADER), body)
        except SignatureError as exc:
            return _reject(401, exc.reason, exc.detail, client=client, size=len(body))

        event_id = hashlib.sha256(body).hexdigest()
        event: dict[str, Any] | None
        try:
            event = events.parse(body)
        except events.MalformedEvent as exc:
            return _reject(400, "malformed_event", str(exc), event_id=event_id)
        function = events.job_function(event["type"])

        archive = {
            "id": event_id,
            "type": event["type"],
            "received_at": str(int(time.time() * 1000)),
            "client": client or "",
            "signature": headers.get(SIGNATURE_HEADER, ""),
            "request_id": request.scope.get("state", {}).get("request_id", ""),
            "body": body,
        }
        started = time.perf_counter()
        try:
            outcome = await self.queue.submit(event_id, function, event if function else None, archive)
        except QueueUnavailable as exc:
            return _reject(
                503,
                "queue_unavailable",
                "the queue is unavailable; retry later",
                event_id=event_id,
                error=str(exc),
            )
        ENQUEUE_SECONDS.observe(time.perf_counter() - started)
        REQUESTS.labels(outcome).inc()
        content = event["content"]
        log.info(
            "webhook.accepted",
            outcome=outcome,
            event_id=event_id,
            type=event["type"],
            item_id=content.get("item_id"),
            account_id=content.get("account_id"),
        )
        return JSONResponse({"status": outcome, "event_id": event_id})

    async def _read_body(self, request: Request) -> bytes:
        """The whole body, refusing to buffer more than the limit (chunked bodies included)."""
        limit = self.settings.max_body_bytes
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge
        return bytes(body)


def _reject(
    status: int, reason: str, detail: str, headers: dict[str, str] | None = None, **fields: Any
) -> Response:
    REQUESTS.labels(reason).inc()
    level = log.error if status >= 500 else log.warning
    level("webhook.rejected", status=status, reason=reason, detail=detail, **fields)
    return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=headers)
