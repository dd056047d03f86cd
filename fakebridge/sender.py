"""Sign and deliver Bridge-style webhooks to a receiver."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from fakebridge.world import render_json


def sign(body: bytes, secret: str) -> str:
    """Uppercase hex HMAC-SHA256 of the raw body, keyed with the webhook secret."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().upper()


def signature_header(body: bytes, secrets: Sequence[str]) -> str:
    """``v1=<HEX>`` per secret, comma-separated (two during a secret rotation)."""
    return ",".join(f"v1={sign(body, secret)}" for secret in secrets)


def webhook_body(event_type: str, content: Mapping[str, Any], timestamp_ms: int | None = None) -> bytes:
    """``{"content":...,"timestamp":...,"type":...}`` as compact JSON (Decimal written literally)."""
    timestamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return render_json({"content": dict(content), "timestamp": timestamp, "type": event_type}).encode()


class WebhookSender:
    """POSTs signed webhook bodies to ``receiver_url``; ``secret`` may be a list (all sign each body)."""

    def __init__(
        self, receiver_url: str, secret: str | Sequence[str], client: httpx.Client | None = None
    ) -> None:
        self.receiver_url = receiver_url
        self.secrets = [secret] if isinstance(secret, str) else list(secret)
        self._owns_client = client is None
        self.client = httpx.Client(timeout=10.0) if client is None else client

    def send(
        self,
        event_type: str,
        content: Mapping[str, Any],
        timestamp_ms: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        return self.send_body(webhook_body(event_type, content, timestamp_ms), headers)

    def send_body(self, body: bytes, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """POST ``body`` as is, signed; ``headers`` are added (e.g. X-Forwarded-For) or override."""
        sent = {
            "Content-Type": "application/json",
            "BridgeApi-Signature": signature_header(body, self.secrets),
        }
        sent.update(headers or {})
        return self.client.post(self.receiver_url, content=body, headers=sent)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> WebhookSender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
