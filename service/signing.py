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
from typing import Any

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
    """Checks ``v1`` elements against every secret, in constant time.

    The HMAC is RFC 2104's construction on hashlib's SHA-256, the way ``hmac.HMAC`` builds it
    without OpenSSL's HMAC: the key schedule (the hash states after ``key ^ ipad`` and
    ``key ^ opad``) runs once per secret, and a request costs two state copies and two
    updates. OpenSSL 3's own HMAC (``hmac.new``, ``hmac.digest``) fetches its algorithm for
    each message and cost twice as much for Bridge's few-hundred-byte bodies; ``sign()``
    keeps using it, and the tests hold the two equal.
    """

    def __init__(self, secrets: Iterable[Secret]) -> None:
        self._pads = [_pads(s.reveal().encode()) for s in secrets]
        if not self._pads:
            raise ValueError("at least one webhook secret is required")

    def __repr__(self) -> str:
        return f"SignatureVerifier(<{len(self._pads)} secret(s)>)"

    def verify(self, header: str | None, body: bytes) -> None:
        """Return if ``header`` carries a valid signature of ``body``; raise SignatureError otherwise."""
        if header is None or not header.strip():
            raise SignatureError("missing_signature", "the BridgeApi-Signature header is missing")
        candidates = _v1_values(header)
        if not candidates:
            raise SignatureError("invalid_signature", "the BridgeApi-Signature header has no v1= element")
        expected = []
        for inner_pad, outer_pad in self._pads:
            inner = inner_pad.copy()
            inner.update(body)
            outer = outer_pad.copy()
            outer.update(inner.digest())
            expected.append(outer.hexdigest().encode())
        matched = False
        for candidate in candidates:
            for digest in expected:
                # No early exit: every comparison runs whatever matches.
                matched |= hmac.compare_digest(digest, candidate)
        if not matched:
            raise SignatureError("invalid_signature", "no v1 signature matches a configured secret")


def _pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states after absorbing ``key ^ ipad`` and ``key ^ opad`` (RFC 2104, block of 64 bytes)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


_BLOCK = hashlib.sha256().block_size
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


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
