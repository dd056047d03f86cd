"""Encryption at rest of the columns that hold bank data.

Storage writes those columns as ``codec.encode(value, column)`` and everything that reads them
back goes through ``codec.decode(value, column)``; ``column`` is one of :data:`ENCRYPTED_COLUMNS`.

Scheme: AES-256-GCM (``cryptography``'s AESGCM, authenticated), a random 96-bit nonce per value
and the column's name as associated data, so a ciphertext copied into another column does not
decrypt. A stored value is text::

    bh1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>

The key id is the first 8 hex digits of SHA-256(key): each value names the key that wrote it
(rotation needs to know) without revealing anything of the key. ``ENCRYPTION_KEYS`` lists keys
newest first: the first encrypts, all decrypt. Random nonces are safe for about 2**32 values per
key (NIST SP 800-38D); rotating keys yearly keeps a large deployment far below that.

Errors are explicit, never garbage: a value written with a key that is not configured raises
:class:`UnknownKeyError` naming its key id; a value that does not authenticate (altered, or moved
to another column) raises :class:`TamperedValueError`; an encrypted value read without any key
raises :class:`UnknownKeyError` too. Values without the ``bh1:`` prefix are plaintext written
before encryption was turned on (or under ``ALLOW_PLAINTEXT_STORAGE``): they read as they are,
and ``bridgehook keys rotate`` encrypts them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.settings import Settings

PREFIX = "bh1:"
ENCRYPTED_COLUMNS: dict[str, tuple[str, ...]] = {
    "accounts": ("name", "iban"),
    "transactions": ("clean_description", "provider_description"),
    "webhook_events": ("body",),
    "user_tokens": ("token",),
}
_NONCE = 12


class CodecError(Exception):
    """A stored value cannot be turned back into what was written."""


class UnknownKeyError(CodecError):
    """The value was written with a key that ENCRYPTION_KEYS does not list."""


class TamperedValueError(CodecError):
    """The value does not authenticate: altered, truncated, or moved from another column."""


class Codec(Protocol):
    def encode(self, value: str | None, column: str) -> str | None: ...

    def decode(self, value: str | None, column: str) -> str | None: ...

    def is_current(self, value: str | None) -> bool:
        """Whether ``value`` is already stored as this codec writes it (nothing to rotate)."""
        ...


def generate_key() -> str:
    """A new 256-bit key, as ENCRYPTION_KEYS takes it (urlsafe base64, 44 characters)."""
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode()


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def _key_id_of(value: str) -> str | None:
    """The key id of an encrypted value, None for plaintext."""
    if not value.startswith(PREFIX):
        return None
    kid, sep, _ = value[len(PREFIX) :].partition(":")
    if not sep:
        raise TamperedValueError("an encrypted value without its key id")
    return kid


class PlainCodec:
    """Bank data in clear (``ALLOW_PLAINTEXT_STORAGE=1``); refuses to pass ciphertext off as data."""

    def encode(self, value: str | None, column: str) -> str | None:
        return value

    def decode(self, value: str | None, column: str) -> str | None:
        if value is not None and (kid := _key_id_of(value)) is not None:
            raise UnknownKeyError(f"{column} holds a value encrypted with key {kid}; set ENCRYPTION_KEYS")
        return value

    def is_current(self, value: str | None) -> bool:
        return value is None or _key_id_of(value) is None

    def __repr__(self) -> str:
        return "PlainCodec()"


class AESGCMCodec:
    """AES-256-GCM under the first of ``keys``; any of them decrypts."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key")
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        if len(self._keys) != len(keys):
            raise ValueError("the same key is listed twice")
        self.current_key_id = key_id(keys[0])
        self._aead = self._keys[self.current_key_id]
        self._prefix = f"{PREFIX}{self.current_key_id}:"
        self._aad: dict[str, bytes] = {}

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def _associated(self, column: str) -> bytes:
        aad = self._aad.get(column)
        if aad is None:
            aad = self._aad[column] = column.encode()
        return aad

    def encode(self, value: str | None, column: str) -> str | None:
        if value is None:
            return None
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, value.encode(), self._associated(column))
        return self._prefix + base64.b64encode(nonce + sealed).decode()

    def decode(self, value: str | None, column: str) -> str | None:
        if value is None:
            return None
        kid = _key_id_of(value)
        if kid is None:
            return value  # written before encryption was on; `bridgehook keys rotate` encrypts it
        aead = self._keys.get(kid)
        if aead is None:
            raise UnknownKeyError(
                f"{column} holds a value encrypted with key {kid}, which ENCRYPTION_KEYS does not list "
                f"(it lists {', '.join(self._keys)})"
            )
        try:
            raw = base64.b64decode(value[len(PREFIX) + len(kid) + 1 :], validate=True)
            return aead.decrypt(raw[:_NONCE], raw[_NONCE:], self._associated(column)).decode()
        except (InvalidTag, binascii.Error, ValueError, UnicodeDecodeError):
            raise TamperedValueError(
                f"{column} holds a value under key {kid} that does not authenticate"
            ) from None

    def is_current(self, value: str | None) -> bool:
        return value is None or value.startswith(self._prefix)

    def __repr__(self) -> str:
        return f"AESGCMCodec(keys={list(self._keys)})"  # key ids only


def codec_from_settings(settings: Settings) -> Codec:
    """The codec the settings ask for: SettingsError without keys, unless plaintext is allowed on purpose."""
    settings.require("ENCRYPTION_KEYS")
    if settings.encryption_keys:
        return AESGCMCodec([base64.urlsafe_b64decode(k.reveal()) for k in settings.encryption_keys])
    return PlainCodec()
