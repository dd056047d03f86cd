"""``POST /webhooks/bridge``: source → size → type → signature → shape → enqueue → answer.

Each rejection answers ``{"error": <machine code>, "detail": <human text>}`` with its own
status, logs one line and counts in ``bridgehook_webhook_requests_total{outcome=<code>}`` and,
in memory until the next flush, in Redis for ``bridgehook status`` (see service.rejections).

| check                                    | answer                                        |
|------------------------------------------|-----------------------------------------------|
| source address not allowed               | 403 forbidden_source                          |
| method other than POST                   | 405 method_not_allowed                        |
| body over the limit (declared or read)   | 413 body_too_large                            |
| Content-Type present and not JSON        | 415 unsupported_media_type                    |
| body not received in time                | 408 request_timeout                           |
| two BridgeApi-Signature headers          | 400 duplicate_signature                       |
| BridgeApi-Signature over 1 KiB           | 431 signature_too_large                       |
| no BridgeApi-Signature                   | 401 missing_signature                         |
| no v1 element matching a secret          | 401 invalid_signature                         |
| not a Bridge event (or nested > 32 deep, | 400 malformed_event                           |
| NaN, a malformed UUID, …)                |                                               |
| Redis down or write unconfirmed          | 503 queue_unavailable (Bridge retries)        |
| processed type, first delivery           | 200 {"status": "queued"}                      |
| same body within the dedupe window       | 200 {"status": "duplicate"}                   |
| any other type (payments, TEST_EVENT…)   | 200 {"status": "ignored"} (archived, no job)  |

The view is a plain ASGI app on the hot path: it reads the headers it needs in one pass,
the body straight from ``receive`` and answers with two ``send`` calls. Each request gets a
request id (our ingress's ``X-Request-Id`` when it looks like one), on its log lines (bound
with structlog's context variables while a rejection is logged) and in the response. Rejections
log at warning (503 at error); accepted deliveries log at debug, since each one is already
in the archive stream (with its request id) and in the metrics, and a line per delivery
would cost the receiver a sixth of its throughput (and the debug call itself is skipped
unless debug is on: see ``logs.enabled``). Accepted answers are assembled from bytes
prepared once per outcome: only the event id varies.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from prometheus_client import Counter
from starlette.types import Receive, Scope, Send

from service import events, logs
from service.metrics import REQUESTS
from service.queue import ArchivedDelivery, EventQueue, QueueUnavailable
from service.rejections import Rejections
from service.settings import Settings
from service.signing import SignatureError, SignatureVerifier
from service.sources import SourcePolicy

log = logs.get_logger("bridgehook.webhooks")

_OUTCOMES = {name: REQUESTS.labels(name, "bridge") for name in ("queued", "duplicate", "ignored")}
_WANTED = (b"content-length", b"content-type", b"bridgeapi-signature", b"x-request-id")
_CONTENT_TYPE = (b"content-type", b"application/json")
# Refused before the whole body was read: the connection closes after the answer (see
# service/connections.py), and says so, so that a client does not send its next request down it.
_BODY_READ = "bridgehook.body_read"  # set in the request's scope by _read_body once it has it all
_CLOSE = (b"connection", b"close")
_SIGNATURE = b"bridgeapi-signature"
_TWICE = b"\0twice"  # never a header value: h11 and httptools refuse NUL in headers
# Bridge sends one or two ``v1=`` elements of 67 bytes; the header is archived with each delivery.
MAX_SIGNATURE_BYTES = 1024


class Rejected(Exception):
    def __init__(self, status: int, reason: str, detail: str, **fields: Any) -> None:
        self.status, self.reason, self.detail, self.fields = status, reason, detail, fields


def _is_json(content_type: bytes) -> bool:
    if content_type == b"application/json":
        return True
    media_type = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


_PROCESS = uuid.uuid4().hex[:16].encode()  # request ids: unique per process, then a counter
_counter = itertools.count(1)


def _request_id(value: bytes | None) -> bytes:
    if value and len(value) <= 64 and value.replace(b"-", b"").replace(b"_", b"").isalnum():
        return value
    return b"%s%016x" % (_PROCESS, next(_counter))


def _accepted(outcome: str) -> tuple[bytes, tuple[bytes, bytes], Counter]:
    """The body around the event id (64 hex digits), its length header and the outcome's counter."""
    prefix = b'{"status":"%s","event_id":"' % outcome.encode()
    length = len(prefix) + 64 + len(b'"}')
    return prefix, (b"content-length", str(length).encode()), _OUTCOMES[outcome]


_ACCEPTED = {outcome: _accepted(outcome) for outcome in _OUTCOMES}


def door(scope: Scope, headers: dict[bytes, bytes], limit: int) -> None:
    """The checks every provider's endpoint makes before reading a body: the method, the declared
    size and the content type (Rejected with 405, 413 or 415)."""
    if scope["method"] != "POST":
        raise Rejected(405, "method_not_allowed", "use POST", method=scope["method"])
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "body_too_large", f"the limit is {limit} bytes", declared=int(declared))
    content_type = headers.get(b"content-type")
    if content_type is not None and not _is_json(content_type):
        raise Rejected(
            415,
            "unsupported_media_type",
            "send application/json",
            content_type=content_type[:100].decode("latin-1"),
        )


class WebhookView:
    """The endpoint, holding what it needs; built once per app, not per request.

    Another provider's view (service/powens.py) subclasses it for the request's life cycle (the
    headers it reads, the request id, the answer, the logging and counting of rejections, the
    body's read) and brings its own ``_handle``.
    """

    provider = "bridge"  # its label in bridgehook_webhook_requests_total
    wanted: tuple[bytes, ...] = _WANTED  # the headers _handle reads
    signature_header: bytes = _SIGNATURE  # refused when sent twice

    def __init__(self, settings: Settings, queue: EventQueue) -> None:
        self.settings = settings
        self.queue = queue
        self.sources = SourcePolicy(settings.allowed_ips)
        self.verifier = SignatureVerifier(settings.webhook_secrets)
        self.deadlines = Deadlines(settings.read_timeout_seconds)
        self.rejections = Rejections()  # flushed to Redis by the app's lifespan, not per request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, bytes] = {}
        wanted, signature = self.wanted, self.signature_header
        for name, value in scope["headers"]:
            if name in wanted:
                if name in headers and name == signature:
                    value = _TWICE  # refused in _handle: only one of them would be checked
                headers[name] = value
        request_id = _request_id(headers.get(b"x-request-id"))
        try:
            status, body, length = await self._handle(scope, receive, headers, request_id)
            extra = []
        except Rejected as r:
            REQUESTS.labels(r.reason, self.provider).inc()
            self.rejections.count(r.reason)
            with structlog.contextvars.bound_contextvars(request_id=request_id.decode()):
                (log.error if r.status >= 500 else log.warning)(
                    "webhook.rejected", status=r.status, reason=r.reason, detail=r.detail, **r.fields
                )
            status = r.status
            body = json.dumps({"error": r.reason, "detail": r.detail}, separators=(",", ":")).encode()
            length = (b"content-length", str(len(body)).encode())
            extra = [(b"allow", b"POST")] if r.status == 405 else []
            if _BODY_READ not in scope:
                extra.append(_CLOSE)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [_CONTENT_TYPE, length, (b"x-request-id", request_id), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _handle(
        self, scope: Scope, receive: Receive, headers: dict[bytes, bytes], request_id: bytes
    ) -> tuple[int, bytes, tuple[bytes, bytes]]:
        client = scope["client"][0] if scope.get("client") else None
        if not self.sources.allows(client):
            raise Rejected(403, "forbidden_source", "this address may not post webhooks", client=client)
        limit = self.settings.max_body_bytes
        door(scope, headers, limit)
        signature = headers.get(_SIGNATURE)
        if signature is _TWICE:
            raise Rejected(400, "duplicate_signature", "send one BridgeApi-Signature header", client=client)
        if signature is not None and len(signature) > MAX_SIGNATURE_BYTES:
            raise Rejected(
                431,
                "signature_too_large",
                f"the BridgeApi-Signature header is over {MAX_SIGNATURE_BYTES} bytes",
                client=client,
                size=len(signature),
            )
        body = await self._read_body(scope, receive, limit)
        try:
            self.verifier.verify(signature.decode("latin-1") if signature is not None else None, body)
        except SignatureError as exc:
            raise Rejected(401, exc.reason, exc.detail, client=client, size=len(body)) from None

        event_id = hashlib.sha256(body).hexdigest()
        try:
            event, verbatim = events.parse_delivery(body)
        except events.MalformedEvent as exc:
            raise Rejected(400, "malformed_event", str(exc), event_id=event_id) from None
        event_type = event["type"]
        archive = ArchivedDelivery(
            event_type.encode(),
            b"%d" % (time.time_ns() // 1_000_000),
            client.encode() if client else b"",
            signature or b"",
            request_id,
            body,
        )
        function = events.job_function(event_type)
        outcome = await self._enqueue(
            event_id, function, event, archive, argument=(body,) if verbatim else None
        )
        prefix, length, counter = _ACCEPTED[outcome]
        counter.inc()
        if logs.enabled(logging.DEBUG):  # every delivery is in the archive stream and the metrics
            content = event["content"]
            log.debug(
                "webhook.accepted",
                request_id=request_id.decode(),
                outcome=outcome,
                event_id=event_id,
                type=event_type,
                item_id=content.get("item_id"),
                account_id=content.get("account_id"),
            )
        return 200, b'%s%s"}' % (prefix, event_id.encode()), length

    async def _enqueue(
        self,
        event_id: str,
        function: str | None,
        event: Mapping[str, Any],
        archive: ArchivedDelivery,
        *,
        argument: Sequence[bytes] | None = None,
    ) -> str:
        """The queue's outcome for the delivery; Rejected with 400 if the event cannot be encoded for
        the job, 503 if Redis did not confirm the write. ``argument``: the job's argument as JSON
        already, in pieces (EventQueue.submit)."""
        try:
            submitted = self.queue.submit(event_id, function, event, archive, argument=argument)
        except (ValueError, TypeError, RecursionError) as exc:
            raise Rejected(400, "malformed_event", "the event cannot be encoded", event_id=event_id) from exc
        try:
            return await submitted
        except QueueUnavailable as exc:
            raise Rejected(
                503,
                "queue_unavailable",
                "the queue is unavailable; retry later",
                event_id=event_id,
                error=str(exc),
            ) from None

    async def _read_body(self, scope: Scope, receive: Receive, limit: int) -> bytes:
        """The whole body within the read timeout, never buffering more than the limit (chunked too);
        the request's scope notes that it was read whole (see _BODY_READ)."""
        task = asyncio.current_task()
        assert task is not None
        self.deadlines.watch(task)
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise Rejected(
                        400, "client_disconnected", "the client left before sending the whole body"
                    )
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise Rejected(413, "body_too_large", f"the limit is {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    scope[_BODY_READ] = True
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except asyncio.CancelledError:
            if not self.deadlines.expired(task):
                raise  # a real cancellation (shutdown), not our deadline
            task.uncancel()
            raise Rejected(408, "request_timeout", "the body did not arrive in time") from None
        finally:
            self.deadlines.forget(task)


class Deadlines:
    """Body reads that must finish in time, all watched by one ticker.

    A timer per request (``asyncio.timeout``) cost more than every other check of the view
    together; for a limit of seconds, a look every quarter of it is precise enough.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._due: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None

    def watch(self, task: asyncio.Task[Any]) -> None:
        if self._ticker is None or self._ticker.done() or self._ticker.get_loop() is not task.get_loop():
            self._ticker = task.get_loop().create_task(self._tick())
        self._due[task] = time.monotonic() + self.seconds

    def expired(self, task: asyncio.Task[Any]) -> bool:
        return task in self._expired

    def forget(self, task: asyncio.Task[Any]) -> None:
        self._due.pop(task, None)
        self._expired.discard(task)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self.seconds / 4))
            now = time.monotonic()
            for task, due in list(self._due.items()):
                if due <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
