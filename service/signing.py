"""Bridge's webhook signature: ``BridgeApi-Signature: v1=<HEX>[,v1=<HEX>…]``.

HEX is the HMAC-SHA256 of the raw request body keyed with the webhook secret. During a
rotation Bridge sends one ``v1`` element per valid secret, and we may hold several
secrets too: any element matching any secret is enough. Elements of other schemes are
ignored. Hex is compared case-insensitively and in constant time.

A different provider (Powens signs ``POST.<path>.<date>.<body>`` in base64) would be a
second verifier with the same ``verify(headers, body)`` shape; the queue never changes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from service.settings import Secret

HEADER = "bridgeapi-signature"
SCHEME = "v1"
MAX_ELEMENTS = 8  # Bridge sends one or two; a header with dozens is not a rotation


class SignatureError(Exception):
    """The request is not signed by Bridge. ``reason`` is the machine code we answer with."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def sign(body: bytes, secret: str) -> str:
    """The HEX part of a ``v1`` element, uppercase as Bridge sends it."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().upper()


def signature_header(body: bytes, secrets: Iterable[str]) -> str:
    """A full header value, one ``v1`` element per secret (what Bridge sends in a rotation)."""
    return ",".join(f"{SCHEME}={sign(body, secret)}" for secret in secrets)


class SignatureVerifier:
    def __init__(self, secrets: Iterable[Secret]) -> None:
        # One keyed HMAC state per secret, copied per request: the key schedule runs once.
        self._macs = [hmac.new(s.reveal().encode(), digestmod=hashlib.sha256) for s in secrets]
        if not self._macs:
            raise ValueError("at least one webhook secret is required")

    def __repr__(self) -> str:
        return f"SignatureVerifier(<{len(self._macs)} secret(s)>)"

    def verify(self, header: str | None, body: bytes) -> None:
        """Return if ``header`` carries a valid signature of ``body``; raise SignatureError otherwise."""
        if header is None or not header.strip():
            raise SignatureError("missing_signature", "the BridgeApi-Signature header is missing")
        candidates = _v1_values(header)
        if not candidates:
            raise SignatureError("invalid_signature", "the BridgeApi-Signature header has no v1= element")
        expected = []
        for mac in self._macs:
            m = mac.copy()
            m.update(body)
            expected.append(m.hexdigest().encode())
        matched = False
        for candidate in candidates:
            for digest in expected:
                # No early exit: every comparison runs whatever matches.
                matched |= hmac.compare_digest(digest, candidate)
        if not matched:
            raise SignatureError("invalid_signature", "no v1 signature matches a configured secret")


def _v1_values(header: str) -> list[bytes]:
    values = []
    for element in header.split(",", MAX_ELEMENTS)[:MAX_ELEMENTS]:
        scheme, sep, value = element.strip().partition("=")
        if sep and scheme.strip().lower() == SCHEME:
            try:
                values.append(value.strip().lower().encode("ascii"))
            except UnicodeEncodeError:
                continue  # not hex, cannot match; keep checking the others
    return values
