"""``POST /webhooks/powens/<event>``: Powens's deliveries, under Bridge's guarantees.

The request's life cycle is Bridge's view's (service/webhooks.py): one request id, one answer
``{"error", "detail"}`` per refusal, counted and logged the same way, the body read within the
read timeout and the limit, the same archive, de-duplication window and 503 when Redis cannot
confirm. What differs:

| check                                         | answer                                   |
|-----------------------------------------------|------------------------------------------|
| source not in POWENS_ALLOWED_IPS (when set)   | 403 forbidden_source                     |
| event segment not a name                      | 404 unknown_event                        |
| body (or its decompressed form) over the limit| 413 body_too_large                       |
| Content-Encoding other than gzip or identity  | 415 unsupported_content_encoding         |
| two BI-Signature headers / over 1 KiB         | 400 duplicate_signature / 431            |
| no BI-Signature / no BI-Signature-Date        | 401 missing_signature / missing_signature_date |
| no secret signs the path, date and body       | 401 invalid_signature                    |
| signed, but dated more than 5 minutes away    | 401 signature_date_out_of_window         |
| a gzip body that is not gzip                  | 400 malformed_encoding                   |
| not JSON, or a processed type without its ids | 400 malformed_event                      |

With ``POWENS_WEBHOOK_AUTH=bearer`` (service/bearer.py) the three signature rows are instead:

| check                                         | answer                                   |
|-----------------------------------------------|------------------------------------------|
| two Authorization headers / over 1 KiB        | 400 duplicate_signature / 431            |
| no ``Authorization: Bearer <token>``          | 401 missing_token                        |
| the body names no user (by its event type)    | 401 missing_user_id                      |
| not the token we hold for that user, or a user| 401 invalid_token (one answer: no one    |
| we hold none for                              | learns which users exist)                |
| Redis does not answer the token's digest      | 503 queue_unavailable                    |

and no date is checked (a token is not dated): a captured delivery can be replayed once the
de-duplication window ends, which HMAC's date window prevents. The archive's signature is ``bearer``.

**Signature.** ``BI-Signature`` is base64(HMAC-SHA256(secret, ``POST.<path>.<date>.<body>``)),
the path being the one Powens calls (ours, unless an ingress rewrites it). Every secret of
``POWENS_WEBHOOK_SECRETS`` is tried, every comparison runs (constant time, no early exit).

**Replay window.** Powens documents none. A valid signature is valid for ever, so a captured
delivery could be replayed after our de-duplication window (3 days) ends. We refuse a
``BI-Signature-Date`` more than ``POWENS_SIGNATURE_MAX_AGE_SECONDS`` (5 minutes) from our clock, as
Stripe and Standard Webhooks do. This assumes, as those do, that each attempt is signed when it is
sent: Powens does not say whether a retry keeps its first attempt's date. If it did, every retry
later than the window would be refused for good (a 401 Powens retries in vain): the refusals are
counted and logged under their own reason, and the window is a setting so that an operator who sees
them can widen it. The window is checked after the signature, so that a refusal for the date is a
genuine delivery (a clock, or that assumption), never a forgery.

**Compressed bodies.** With ``Content-Encoding: gzip`` the body is inflated by one
``zlib.decompressobj`` told never to produce more than the limit: a bomb is a 413 after at most
the limit's worth of output, never memory exhaustion. Whether Powens signs the compressed or the
inflated bytes is not documented; both are accepted. Either was produced by Powens with the
secret, so accepting both weakens nothing, and the guess is never a reason to drop a delivery.

**Memory.** A body near the limit is held as few times as the checks allow: read once (its chunks
joined), inflated once, signed without a copy (the HMAC is fed the body after the signed prefix),
read by msgspec for its ids only and spliced as it came into the job's envelope
(service/powens_events.py, :func:`~service.powens_events.read`); the queue sends it to Redis in a
call of its own without joining it to anything (service/queue.py).

**Source.** Powens publishes no source addresses: ``POWENS_ALLOWED_IPS`` is empty by default and
the signature is the only gate. **De-duplication** uses ``id_webhook_data`` (Powens's event id),
the SHA-256 of the inflated body where it is missing, under the event type:
``powens-<event>-<id>``. The archive keeps the inflated body (what a replay parses) and, as its
signature, ``<date> <BI-Signature>``.

**Bank data in Redis.** A Powens body carries IBANs, names and transactions: with
``BODY_SEAL_PUBLIC_KEY`` set (``bridgehook serve`` requires it where Powens is served, unless
``ALLOW_PLAINTEXT_STORAGE``), the archive and the job hold it sealed to the workers' key
(service/sealing.py), which this process cannot open.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import time
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime

from starlette.types import Receive, Scope

from service import bearer, logs, powens_events
from service.events import MalformedEvent
from service.metrics import REQUESTS
from service.queue import ArchivedDelivery, EventQueue, QueueUnavailable
from service.rejections import Rejections
from service.sealing import Sealer
from service.settings import Secret, Settings
from service.sources import SourcePolicy
from service.webhooks import _TWICE, MAX_SIGNATURE_BYTES, Deadlines, Rejected, WebhookView, door

log = logs.get_logger("bridgehook.powens")

PATH_PREFIX = "/webhooks/powens/"
SIGNATURE = b"bi-signature"
SIGNATURE_DATE = b"bi-signature-date"
_ENCODING = b"content-encoding"
AUTHORIZATION = b"authorization"
_WANTED = (b"content-length", b"content-type", _ENCODING, SIGNATURE, SIGNATURE_DATE, b"x-request-id")
_WANTED_BEARER = (b"content-length", b"content-type", _ENCODING, AUTHORIZATION, b"x-request-id")
_BEARER = b"bearer"  # the archive's signature in bearer mode: never the token
_SEAL_INLINE = 64 * 1024  # smaller bodies are sealed on the event loop (about 0.1 ms each)


def sign(path: str, date: str, body: bytes, secret: str) -> str:
    """``BI-Signature`` for a delivery, as Powens computes it."""
    message = b"POST.%s.%s.%s" % (path.encode(), date.encode(), body)
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def signature_date(at: float | None = None) -> str:
    """``BI-Signature-Date`` as Powens writes it: UTC ISO-8601 with microseconds and a ``Z``."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PowensVerifier:
    """Checks ``BI-Signature`` against every secret and every candidate body, in constant time."""

    def __init__(self, secrets: Iterable[Secret]) -> None:
        self._keys = [s.reveal().encode() for s in secrets]
        if not self._keys:
            raise ValueError("at least one Powens webhook secret is required")

    def __repr__(self) -> str:
        return f"PowensVerifier(<{len(self._keys)} secret(s)>)"

    def matches(self, path: str, date: bytes, signature: bytes, bodies: Iterable[bytes]) -> bool:
        try:
            given = base64.b64decode(signature.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        matched = False
        head = b"POST.%s.%s." % (path.encode(), date)  # then the body, fed as it is (never copied)
        for body in bodies:
            for key in self._keys:
                mac = hmac.new(key, head, hashlib.sha256)
                mac.update(body)
                matched |= hmac.compare_digest(mac.digest(), given)
        return matched


def parse_date(value: bytes) -> float | None:
    """Seconds since the epoch of a UTC ISO-8601 date (a date without a zone is UTC); None if not one,
    such as the space-separated form Python would also read but Powens never writes."""
    try:
        text = value.decode("ascii").strip()
        moment = datetime.fromisoformat(text)
    except (UnicodeDecodeError, ValueError):
        return None
    if "T" not in text:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def gunzip(raw: bytes, limit: int) -> bytes:
    """The inflated body, never more than ``limit`` bytes of it held (413 past it)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing only
    try:
        plain = inflater.decompress(raw, limit + 1)
    except zlib.error:
        raise Rejected(400, "malformed_encoding", "the body is not valid gzip") from None
    if len(plain) > limit:
        raise Rejected(413, "body_too_large", f"the inflated body is over the limit of {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise Rejected(400, "malformed_encoding", "the gzip stream is truncated or followed by other data")
    return plain


class PowensView(WebhookView):
    """The endpoint; sharing the Bridge view's rejection counts and read deadlines."""

    provider = "powens"
    wanted: tuple[bytes, ...] = _WANTED
    signature_header = SIGNATURE

    def __init__(
        self, settings: Settings, queue: EventQueue, rejections: Rejections, deadlines: Deadlines
    ) -> None:
        self.settings = settings
        self.queue = queue
        allowed = settings.powens_allowed_ips
        self.powens_sources = SourcePolicy(allowed) if allowed else None
        self.bearer = settings.powens_webhook_auth == "bearer"
        if self.bearer:  # the Authorization header instead of BI-Signature's two
            self.wanted, self.signature_header = _WANTED_BEARER, AUTHORIZATION
        self.powens_verifier = None if self.bearer else PowensVerifier(settings.powens_webhook_secrets)
        key = settings.body_seal_public_key
        self.sealer = None if key is None else Sealer(key.reveal())
        self.deadlines = deadlines
        self.rejections = rejections

    async def _handle(
        self, scope: Scope, receive: Receive, headers: dict[bytes, bytes], request_id: bytes
    ) -> tuple[int, bytes, tuple[bytes, bytes]]:
        client = scope["client"][0] if scope.get("client") else None
        if self.powens_sources is not None and not self.powens_sources.allows(client):
            raise Rejected(403, "forbidden_source", "this address may not post webhooks", client=client)
        path: str = scope["path"]
        name = powens_events.event_type(path[len(PATH_PREFIX) :])
        if name is None:
            raise Rejected(404, "unknown_event", f"post to {PATH_PREFIX}<event>, e.g. connection_synced")
        limit = self.settings.powens_max_body_bytes
        door(scope, headers, limit)
        encoding = headers.get(_ENCODING, b"identity").strip().lower()
        if encoding not in (b"gzip", b"identity"):
            raise Rejected(415, "unsupported_content_encoding", "send gzip or identity")
        signature, date = headers.get(self.signature_header), headers.get(SIGNATURE_DATE)
        header = "Authorization" if self.bearer else "BI-Signature"
        if signature is _TWICE:
            raise Rejected(400, "duplicate_signature", f"send one {header} header", client=client)
        if signature is not None and len(signature) > MAX_SIGNATURE_BYTES:
            raise Rejected(431, "signature_too_large", f"{header} is over {MAX_SIGNATURE_BYTES} bytes")
        raw = await self._read_body(scope, receive, limit)
        if self.bearer:
            plain = gunzip(raw, limit) if encoding == b"gzip" else raw
            del raw
            await self._check_token(name, plain, signature, client)
            return await self._accept(name, plain, _BEARER, client, request_id)
        assert self.powens_verifier is not None
        if signature is None or not signature.strip():
            raise Rejected(401, "missing_signature", "the BI-Signature header is missing", client=client)
        if date is None or not date.strip():
            raise Rejected(401, "missing_signature_date", "the BI-Signature-Date header is missing")
        plain = gunzip(raw, limit) if encoding == b"gzip" else raw
        if not self.powens_verifier.matches(
            path, date, signature, (raw, plain) if plain is not raw else (raw,)
        ):
            raise Rejected(401, "invalid_signature", "no POWENS_WEBHOOK_SECRETS secret signs this delivery",
                           client=client, size=len(raw))  # fmt: skip
        del raw  # the inflated body is what is kept: the compressed one is not held while it is queued
        self._check_date(date)
        return await self._accept(name, plain, date + b" " + signature, client, request_id)

    async def _check_token(self, name: str, body: bytes, header: bytes | None, client: str | None) -> None:
        """Bearer mode: the token is the one we hold for the user the body names (service/bearer.py).
        An unknown user and a wrong token get one answer, so that no one learns which users exist."""
        token = bearer.presented(header)
        if token is None:
            raise Rejected(401, "missing_token", "the Authorization: Bearer <token> header is missing",
                           client=client)  # fmt: skip
        id_user = bearer.user_id(name, body)
        if id_user is None:
            raise Rejected(
                401,
                "missing_user_id",
                f"bearer mode checks the token of the user the body names, and this {name} body names "
                "none (user.id, id_user, or USER_DELETED's id): such events need POWENS_WEBHOOK_AUTH=hmac",
                client=client,
            )
        if not bearer.matches(token, await self._token_digest(id_user)):
            raise Rejected(401, "invalid_token", "the token is not the user's", client=client)

    async def _token_digest(self, id_user: int) -> bytes | None:
        try:
            return await self.queue.field(bearer.KEY, str(id_user))
        except QueueUnavailable as exc:
            raise Rejected(503, "queue_unavailable", "the queue is unavailable; retry later",
                           error=str(exc)) from None  # fmt: skip

    def _check_date(self, date: bytes) -> None:
        sent_at = parse_date(date)
        window = self.settings.powens_signature_max_age_seconds
        if sent_at is None or abs(time.time() - sent_at) > window:
            raise Rejected(
                401,
                "signature_date_out_of_window",
                f"BI-Signature-Date is over {window} s from our clock (a replay, or a clock off)",
                date=date[:64].decode("latin-1"),
            )

    async def _accept(
        self, name: str, body: bytes, signed: bytes, client: str | None, request_id: bytes
    ) -> tuple[int, bytes, tuple[bytes, bytes]]:
        """``signed``: what the archive keeps as the delivery's signature."""
        try:
            id_webhook_data = powens_events.read(name, body)
        except MalformedEvent as exc:
            raise Rejected(400, "malformed_event", str(exc), type=name) from None
        webhook_id = id_webhook_data or hashlib.sha256(body).hexdigest()
        event_id = f"{powens_events.PROVIDER}-{name.lower()}-{webhook_id}"
        received_at = time.time_ns() // 1_000_000
        if self.sealer is not None:  # bank data: Redis holds it sealed (service/sealing.py)
            # zlib and AES-GCM let go of the GIL: a first sync's MBs are sealed beside the event loop.
            seal = self.sealer.seal
            body = seal(body) if len(body) < _SEAL_INLINE else await asyncio.to_thread(seal, body)
        archive = ArchivedDelivery(
            name.encode(), b"%d" % received_at, client.encode() if client else b"",
            signed, request_id, body,
        )  # fmt: skip
        function = powens_events.job_function(name)
        argument = (
            powens_events.envelope_json(
                name, id_webhook_data, body, received_at, sealed=self.sealer is not None
            )
            if function
            else None
        )
        del body  # held by the archive and the argument until the queue has sent them
        outcome = await self._enqueue(event_id, function, {"type": name}, archive, argument=argument)
        REQUESTS.labels(outcome, self.provider).inc()
        if logs.enabled(logging.DEBUG):
            log.debug(
                "webhook.accepted",
                request_id=request_id.decode(),
                outcome=outcome,
                event_id=event_id,
                type=name,
            )
        answer = b'{"status":"%s","event_id":"%s"}' % (outcome.encode(), event_id.encode())
        return 200, answer, (b"content-length", b"%d" % len(answer))
