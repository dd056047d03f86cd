"""Helpers the tests share: constants, signed deliveries, queue inspection."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import redis
import uvicorn
from click.testing import Result

from service.powens import PATH_PREFIX as POWENS_PREFIX
from service.powens import sign as powens_sign
from service.powens import signature_date
from service.server import bind_socket, uvicorn_config
from service.settings import Settings
from service.signing import signature_header

FIXTURES = Path(__file__).resolve().parents[1] / "bridgehook" / "fixtures" / "webhooks"
POWENS_FIXTURES = FIXTURES.parent / "powens"
POWENS_SECRET = "powens-test-primary-0123456789"
POWENS_OLD_SECRET = "powens-test-previous-9876543210"
SECRET = "whsec-test-primary-0123456789"
OLD_SECRET = "whsec-test-previous-9876543210"
BRIDGE_IP = "63.32.31.5"
# A fixed key for the tests' workers (`bridgehook keys generate` makes real ones).
TEST_ENCRYPTION_KEY = "6mWqVnV0mQ8m1Wk0cJ3X2r9yqTQdM0tq4bXn5lq0e3Q="
# The receiver seals Powens's bodies to the public key; the workers open them with the private one.
TEST_SEAL_PRIVATE_KEY = "gDlQ0PsyzOEvTdKWQcqMTgWRdZ4X1WoE364UJDKn2VE="
TEST_SEAL_PUBLIC_KEY = "0XPG2r-njpxuUUIYVPrnRAdBZvoFBgxkFufdl4Ur1SY="
QUEUE_KEY = "rq:queue:bridgehook"
Cli = Callable[..., Result]  # the `cli` fixture: `bridgehook ARGS…` through click's runner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The probes and metrics, in process: TestClient's requests on the default ADMIN_PORT.
ADMIN = "http://testserver:9000"


def make_settings(redis_url: str, **env: str) -> Settings:
    base = {"BRIDGE_WEBHOOK_SECRETS": SECRET, "REDIS_URL": redis_url}
    base.update(env)
    return Settings.from_env(base)


def fixture_body(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


def event_body(event_type: str, content: dict[str, Any], timestamp: int = 1700000000000) -> bytes:
    return json.dumps({"type": event_type, "content": content, "timestamp": timestamp}).encode()


def signed(body: bytes, *secrets: str, content_type: str = "application/json") -> dict[str, Any]:
    """Keyword arguments for client.post(): the body and Bridge's headers."""
    headers = {"BridgeApi-Signature": signature_header(body, secrets or (SECRET,))}
    if content_type:
        headers["Content-Type"] = content_type
    return {"content": body, "headers": headers}


def powens_fixture(name: str) -> bytes:
    return (POWENS_FIXTURES / f"{name}.json").read_bytes()


def powens_url(event: str) -> str:
    """``/webhooks/powens/connection_synced`` for ``CONNECTION_SYNCED`` or ``connection.synced``."""
    return POWENS_PREFIX + event.lower().replace(".", "_")


def powens_signed(
    event: str, body: bytes, *secrets: str, date: str | None = None, signed_body: bytes | None = None
) -> dict[str, Any]:
    """Keyword arguments for client.post() to ``powens_url(event)``: the body and Powens's headers,
    signed with the first of ``secrets`` (POWENS_SECRET by default) over ``signed_body`` or the body."""
    date = date or signature_date()
    signature = powens_sign(powens_url(event), date, body if signed_body is None else signed_body,
                            (secrets or (POWENS_SECRET,))[0])  # fmt: skip
    headers = {"BI-Signature": signature, "BI-Signature-Date": date, "Content-Type": "application/json"}
    return {"content": body, "headers": headers}


def queued_ids(r: redis.Redis) -> list[str]:
    return [v.decode() for v in r.lrange(QUEUE_KEY, 0, -1)]


class Receiver(NamedTuple):
    url: str  # the webhook's port: http://127.0.0.1:P
    admin: str  # ADMIN_PORT's: the probes and /metrics


@contextmanager
def running_receiver(settings: Settings) -> Iterator[Receiver]:
    """The receiver on real loopback sockets, configured exactly as `bridgehook serve` does."""
    settings = replace(settings, admin_port=free_port())
    webhook, admin = bind_socket("127.0.0.1", free_port()), bind_socket("127.0.0.1", settings.admin_port)
    config = uvicorn_config(settings, "127.0.0.1", webhook.getsockname()[1])
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [webhook, admin]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the receiver did not start")
            time.sleep(0.02)
        yield Receiver(f"http://127.0.0.1:{config.port}", f"http://127.0.0.1:{settings.admin_port}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        webhook.close()
        admin.close()


def wait_for_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout}s")
        time.sleep(0.1)


class _Recording(dict[str, str]):
    """An empty environment that remembers which variables were asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)


def settings_variables() -> set[str]:
    """Every environment variable Settings.from_env reads."""
    env = _Recording()
    Settings.from_env(env)
    assert env.asked, "Settings.from_env read nothing: the recording no longer sees its reads"
    return env.asked
