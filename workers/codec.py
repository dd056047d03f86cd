"""The one place bank data passes through on its way to and from storage.

Columns holding bank data (account ``name`` and ``iban``, transaction descriptions, the
event ``body``) are written as ``codec.encode(value)`` and read as ``codec.decode(value)``.
Today the codec is the identity; encryption at rest replaces it without touching callers.
"""

from __future__ import annotations

from typing import Protocol


class Codec(Protocol):
    def encode(self, value: str | None) -> str | None: ...

    def decode(self, value: str | None) -> str | None: ...


class PlainCodec:
    def encode(self, value: str | None) -> str | None:
        return value

    def decode(self, value: str | None) -> str | None:
        return value
