"""The receiver on a real socket, run the way `bridgehook serve` runs it."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

import httpx
import redis

from service.settings import Settings
from tests.support import fixture_body, queued_ids, running_receiver, signed

URL = "/webhooks/bridge"
SENDER = "127.0.0.7"  # a loopback address of its own: the socket peer the receiver sees


def test_peer_address_is_the_socket_and_forwarded_for_is_not_trusted_by_default(
    settings_factory: Callable[..., Settings], r: redis.Redis
) -> None:
    with running_receiver(settings_factory(BRIDGE_ALLOWED_IPS=SENDER)) as (base, _):
        from_sender = httpx.Client(transport=httpx.HTTPTransport(local_address=SENDER))
        assert (
            from_sender.post(base + URL, **signed(fixture_body("item.created"))).json()["status"] == "queued"
        )
        # From 127.0.0.1 claiming to be the sender: uvicorn's own 127.0.0.1 trust must be off.
        kwargs = signed(fixture_body("item.refreshed"))
        kwargs["headers"]["X-Forwarded-For"] = SENDER
        response = httpx.post(base + URL, **kwargs)
        assert response.status_code == 403
        assert response.json()["error"] == "forbidden_source"
        # Refused before its body was read: the connection closes, and the answer says so.
        assert response.headers["connection"] == "close"
    assert len(queued_ids(r)) == 1


def test_trusted_local_proxy(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(BRIDGE_ALLOWED_IPS="63.32.31.5", TRUSTED_PROXIES="127.0.0.1")
    with running_receiver(settings) as (base, _):
        kwargs = signed(fixture_body("item.created"))
        kwargs["headers"]["X-Forwarded-For"] = "63.32.31.5"
        assert httpx.post(base + URL, **kwargs).status_code == 200
        kwargs["headers"]["X-Forwarded-For"] = "63.32.31.5, 198.51.100.1"
        assert httpx.post(base + URL, **kwargs).status_code == 403


def _raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def _read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_chunked_body_is_cut_off_at_the_limit(settings_factory: Callable[..., Settings]) -> None:
    """A chunked body without Content-Length is refused once past the limit, not read to its end.

    The sender offers 64 MB; it gets its 413 after what the kernel's socket buffers
    absorb (a few MB on loopback), never after the whole body."""
    with running_receiver(settings_factory(BRIDGE_ALLOWED_IPS="127.0.0.1")) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        sock = _raw_request(
            port,
            b"POST /webhooks/bridge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nBridgeApi-Signature: v1=00\r\n\r\n",
        )
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        sent = 0
        status = None
        try:
            while sent < 64 * 1024 * 1024:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(chunk)
                sent += 65536
        except OSError:
            pass  # the server may close its side once it has answered
        status = _read_status(sock)
        sock.close()
        assert status == 413
        assert sent < 16 * 1024 * 1024, f"the client could push {sent} bytes"


def test_slow_body_times_out_with_408(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(BRIDGE_ALLOWED_IPS="127.0.0.1", WEBHOOK_READ_TIMEOUT_SECONDS="1")
    with running_receiver(settings) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        sock = _raw_request(
            port,
            b"POST /webhooks/bridge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"type":',
        )
        started = time.monotonic()
        status = _read_status(sock)
        sock.close()
        assert status == 408
        assert time.monotonic() - started < 5


def test_probes_and_metrics_listen_on_the_admin_port_only(settings_factory: Callable[..., Settings]) -> None:
    """The webhook's port (the one the ingress publishes) serves only the webhook: whoever reaches it
    cannot read the metrics or make /readyz write to Redis; the admin port serves no webhook."""
    with running_receiver(settings_factory(BRIDGE_ALLOWED_IPS="127.0.0.1")) as (base, admin):
        for path in ("/livez", "/readyz", "/metrics", "/metrics/", "/"):
            response = httpx.get(base + path)
            assert response.status_code == 404, path
            assert response.json()["error"] == "not_found"
            assert "location" not in response.headers
        assert httpx.post(base + URL, **signed(fixture_body("item.created"))).json()["status"] == "queued"
        for path in ("/livez", "/readyz"):
            assert httpx.get(admin + path).json() == {"status": "ok"}, path
        assert (
            'bridgehook_webhook_requests_total{outcome="queued",provider="bridge"}'
            in httpx.get(admin + "/metrics").text
        )
        assert httpx.post(admin + URL, **signed(fixture_body("item.refreshed"))).status_code == 404
