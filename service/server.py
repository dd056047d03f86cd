"""How uvicorn runs the receiver, shared by ``bridgehook serve`` and the tests."""

from __future__ import annotations

import socket
from typing import Any

import uvicorn

from service.app import create_app
from service.connections import protocol_for, raise_file_limit
from service.settings import Settings

INGRESS_UPSTREAM_KEEPALIVE_SECONDS = 60  # ingress-nginx's upstream-keepalive-timeout default

# The receiver's uvicorn settings; the benchmark serves its bare baseline with the same ones.
UVICORN_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    # We decide whom to trust (TRUSTED_PROXIES); uvicorn's default trusts 127.0.0.1.
    "proxy_headers": False,
    "server_header": False,
    "access_log": False,
    # Above ingress-nginx's upstream keep-alive (60 s): a connection must close on nginx's side first,
    # or nginx may send a POST down one uvicorn has just closed and answer it with 502.
    "timeout_keep_alive": INGRESS_UPSTREAM_KEEPALIVE_SECONDS + 15,
    "timeout_graceful_shutdown": 25,
    # No WebSocket upgrades: the receiver serves none, and an upgraded connection leaves the guard.
    "ws": "none",
}


def uvicorn_config(settings: Settings, host: str = "0.0.0.0", port: int = 8000) -> uvicorn.Config:  # noqa: S104
    """The receiver's server: httptools behind the guard on heads and connections (service/connections.py).

    Raises SettingsError when the file descriptor limit cannot fit ``WEBHOOK_MAX_CONNECTIONS``."""
    raise_file_limit(settings)
    options = UVICORN_OPTIONS | {"http": protocol_for(settings)}
    return uvicorn.Config(
        create_app(settings), host=host, port=port, lifespan="on", log_config=None, **options
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound as uvicorn binds its own (OSError if the port is taken); uvicorn listens on it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
