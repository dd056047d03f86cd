"""``bridgehook send --provider powens``: a body signed as Powens signs it, to ``/webhooks/powens/<event>``.

A Powens body does not name its event: the event is the fixture's name (``connection.synced``) or
``--event``, and becomes the path's last segment, which the signature covers with the
``BI-Signature-Date`` (now) and the body. The secret is the first of ``POWENS_WEBHOOK_SECRETS``,
else the local stack's ``.bridgehook/powens-webhook-secret`` (``make run`` creates it).
"""

from __future__ import annotations

import json
import secrets
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

from bridgehook import devenv
from bridgehook.exits import Exit, fail
from service.powens import PATH_PREFIX, sign, signature_date


def fixture_names() -> list[str]:
    folder = resources.files("bridgehook") / "fixtures" / "powens"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def fixture_body(name: str) -> bytes:
    if name not in fixture_names():
        fail(f"no Powens fixture {name!r}; choose one of: {', '.join(fixture_names())}", Exit.USAGE)
    return (resources.files("bridgehook") / "fixtures" / "powens" / f"{name}.json").read_bytes()


def fresh(body: bytes) -> bytes:
    """The body as a new event: a new ``id_webhook_data`` (what the receiver de-duplicates on)."""
    try:
        event = json.loads(body)
        event["id_webhook_data"] = secrets.randbelow(2**53) + 1
    except (ValueError, TypeError) as exc:
        fail(f"--fresh sets the id_webhook_data of a JSON object; the body is not one ({exc})", Exit.USAGE)
    return json.dumps(event).encode()


def webhook_url(receiver: str, event: str) -> str:
    """The receiver's origin (scheme, host, port: its path is Bridge's) with Powens's path for ``event``."""
    parts = urlsplit(receiver)
    return urlunsplit((parts.scheme, parts.netloc, PATH_PREFIX + event.lower().replace(".", "_"), "", ""))


def headers(url: str, body: bytes) -> dict[str, str]:
    date = signature_date()
    return {
        "Content-Type": "application/json",
        "BI-Signature": sign(urlsplit(url).path, date, body, sending_secret()),
        "BI-Signature-Date": date,
    }


def sending_secret() -> str:
    return devenv.sending_secret("POWENS_WEBHOOK_SECRETS", devenv.POWENS_FILE)
