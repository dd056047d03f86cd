"""Sealed bodies: a delivery that carries bank data (Powens's), encrypted before it reaches Redis.

A Powens body holds IBANs, names and transactions, and Redis keeps it for days (the job, the
archive, the dead letters). The receiver must not hold a key that decrypts: it faces the internet
and holds no other secret of the data (no database, no ``ENCRYPTION_KEYS``). So it seals with a
public key (``BODY_SEAL_PUBLIC_KEY``), and only the workers and the CLI, which hold the private keys
(``BODY_SEAL_PRIVATE_KEYS``, newest first, all tried by key id), open what it sealed.

Scheme (ECIES): a fresh X25519 key pair per body; the shared secret with the recipient's public
key, through HKDF-SHA256 (both public keys in its info), keys AES-256-GCM over the body compressed
by zlib (JSON shrinks several times: sealed and in base64, a body takes less room than in clear).
A sealed body is ASCII::

    bs1:<key id>:<base64(ephemeral public key ‖ nonce ‖ ciphertext ‖ tag)>

The key id is the first 8 hex digits of SHA-256 of the recipient's raw public key. Keys are 32
raw bytes in urlsafe base64, as ``bridgehook keys seal-pair`` prints them.

Errors (:class:`SealError`): :class:`UnknownSealKey` when no private key configured matches the
body's key id, :class:`TamperedSeal` when the body does not authenticate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import zlib
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = b"bs1:"
_NONCE = 12
_INFO = b"bridgehook sealed body v1"


class SealError(Exception):
    """A sealed body cannot be opened."""


class UnknownSealKey(SealError):
    """The body was sealed to a key that BODY_SEAL_PRIVATE_KEYS does not hold."""


class TamperedSeal(SealError):
    """The body does not authenticate: altered or truncated."""


def is_sealed(value: str | bytes) -> bool:
    return (value.encode("ascii", "replace") if isinstance(value, str) else value).startswith(PREFIX)


def _raw_key(text: str, what: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text.strip().encode())
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{what} is not a key from `bridgehook keys seal-pair` (32 bytes, urlsafe base64)")
    return raw


def _key_id(public: bytes) -> bytes:
    return hashlib.sha256(public).hexdigest()[:8].encode()


def _aead(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + ephemeral + recipient)
    return AESGCM(key.derive(shared))


def generate_pair() -> tuple[str, str]:
    """A new key pair: (private, public), each 32 bytes in urlsafe base64."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes_raw()
    return _text(raw), _text(private.public_key().public_bytes_raw())


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def public_of(private: str) -> str:
    """The public key of a private one."""
    key = X25519PrivateKey.from_private_bytes(_raw_key(private, "a private key"))
    return _text(key.public_key().public_bytes_raw())


class Sealer:
    """Seals bodies to one public key (the receiver's side: it cannot open them)."""

    def __init__(self, public_key: str) -> None:
        self._public = _raw_key(public_key, "BODY_SEAL_PUBLIC_KEY")
        self._recipient = X25519PublicKey.from_public_bytes(self._public)
        self.key_id = _key_id(self._public).decode()

    def __repr__(self) -> str:
        return f"Sealer(key_id={self.key_id})"

    def seal(self, body: bytes) -> bytes:
        ephemeral = X25519PrivateKey.generate()
        sent = ephemeral.public_key().public_bytes_raw()
        nonce = os.urandom(_NONCE)
        sealed = _aead(ephemeral.exchange(self._recipient), sent, self._public).encrypt(
            nonce, zlib.compress(body, 1), None
        )
        return PREFIX + _key_id(self._public) + b":" + base64.b64encode(sent + nonce + sealed)


class Opener:
    """Opens what was sealed to any of its private keys (the workers' and the CLI's side)."""

    def __init__(self, private_keys: Sequence[str]) -> None:
        self._keys: dict[bytes, tuple[X25519PrivateKey, bytes]] = {}
        for n, text in enumerate(private_keys, 1):
            key = X25519PrivateKey.from_private_bytes(_raw_key(text, f"BODY_SEAL_PRIVATE_KEYS' key {n}"))
            public = key.public_key().public_bytes_raw()
            self._keys.setdefault(_key_id(public), (key, public))

    def __repr__(self) -> str:
        return f"Opener(key_ids={[k.decode() for k in self._keys]})"

    def open(self, sealed: str | bytes) -> bytes:
        data = sealed.encode("ascii", "replace") if isinstance(sealed, str) else bytes(sealed)
        if not data.startswith(PREFIX) or data[len(PREFIX) + 8 : len(PREFIX) + 9] != b":":
            raise TamperedSeal("not a sealed body")
        key_id = data[len(PREFIX) : len(PREFIX) + 8]
        if key_id not in self._keys:
            named = key_id.decode("ascii", "replace")
            raise UnknownSealKey(f"sealed to key {named}, which BODY_SEAL_PRIVATE_KEYS does not hold")
        private, public = self._keys[key_id]
        try:
            raw = base64.b64decode(data[len(PREFIX) + 9 :], validate=True)
            sent, nonce, sealed_bytes = raw[:32], raw[32 : 32 + _NONCE], raw[32 + _NONCE :]
            shared = private.exchange(X25519PublicKey.from_public_bytes(sent))
            return zlib.decompress(_aead(shared, sent, public).decrypt(nonce, sealed_bytes, None))
        except (binascii.Error, ValueError, InvalidTag, zlib.error) as exc:
            raise TamperedSeal("the sealed body does not authenticate") from exc
