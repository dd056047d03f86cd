"""Powens events whose body the receiver sealed (service/sealing.py): opened by a job before it reads
them, and sealed again by whatever puts one back on the queue (a replay), so that Redis never holds
that bank data in clear where the receiver would not have written it so.

A sealed event is the receiver's envelope with ``"sealed": "bs1:…"`` instead of ``"content"``
(service/powens_events.envelope_json). Opening it gives the envelope a job always read, the body
parsed as the worker's JSON decoder parses a job's arguments.
"""

from __future__ import annotations

import json
from typing import Any

from service.sealing import Opener, Sealer, SealError, UnknownSealKey, public_of
from service.settings import Settings
from workers.errors import PermanentError

Event = dict[str, Any]


def opener_of(settings: Settings) -> Opener | None:
    keys = settings.body_seal_private_keys
    return Opener([k.reveal() for k in keys]) if keys else None


def sealer_of(settings: Settings) -> Sealer | None:
    """What seals as the receiver does: its public key, or the public half of the newest private key
    (the CLI, which replays, holds the private keys)."""
    if settings.body_seal_public_key is not None:
        return Sealer(settings.body_seal_public_key.reveal())
    keys = settings.body_seal_private_keys
    return Sealer(public_of(keys[0].reveal())) if keys else None


def opened(event: Event, opener: Opener | None) -> Event:
    """The event with its body in ``content``: as it is if it was not sealed. A body that cannot be
    opened (no key for it, or altered) is a PermanentError: retrying will not help, a dead letter
    replayed once the key is configured will."""
    sealed = event.get("sealed")
    if sealed is None:
        return event
    if opener is None:
        raise PermanentError("a sealed Powens body, and no BODY_SEAL_PRIVATE_KEYS to open it")
    try:
        body = opener.open(sealed)
    except SealError as exc:
        raise PermanentError(f"a sealed Powens body that cannot be opened: {exc}") from exc
    return {k: v for k, v in event.items() if k != "sealed"} | {"content": json.loads(body)}


def sealed(event: Event, sealer: Sealer | None, *, clear: bool = False) -> Event:
    """A Powens event's body sealed again (for the queue). Without a key to seal it with,
    UnknownSealKey, unless ``clear`` (ALLOW_PLAINTEXT_STORAGE): never bank data in clear by mistake."""
    if event.get("provider") != "powens" or "content" not in event or (sealer is None and clear):
        return event
    if sealer is None:
        raise UnknownSealKey(
            "a Powens event to requeue, and neither BODY_SEAL_PUBLIC_KEY nor BODY_SEAL_PRIVATE_KEYS to seal "
            "it with (or ALLOW_PLAINTEXT_STORAGE=1 to requeue it in clear)"
        )
    body = json.dumps(event["content"], separators=(",", ":")).encode()
    return {k: v for k, v in event.items() if k != "content"} | {"sealed": sealer.seal(body).decode()}
