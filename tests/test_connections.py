"""Clients that never finish a request's head, against the receiver on a real loopback socket.

Each test runs its attackers while a probe opens a fresh connection to /livez, as the kubelet does,
and times the answer: the event loop must stay free whatever the attackers do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from uvicorn.server import ServerState

from service.connections import RESERVED_FILES
from service.server import uvicorn_config
from service.settings import Settings
from tests.support import SECRET, fixture_body, free_port, queued_ids, running_receiver, signed, wait_for_http

HEAD = b"POST /webhooks/bridge HTTP/1.1\r\nHost: x\r\n"  # and then nothing
LIVEZ = b"GET /livez HTTP/1.1\r\nHost: x\r\n"
PROBE_BUDGET = 0.2  # seconds for /livez, connection included, while under attack


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _connect(port: int, head: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if head:
        sock.sendall(head)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes ("reset" if it resets)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data or b"reset"
    return data


def _answer_to_livez(sock: socket.socket) -> bool:
    data = b""
    while not data.endswith(b'{"status":"ok"}'):
        data += sock.recv(65536)
    return data.startswith(b"HTTP/1.1 200")


def _trickle(socks: list[socket.socket]) -> None:
    """A byte of HEAD on each socket every 0.2 s, for 2 s: past the deadline, as long as allowed."""
    for byte in HEAD[:10]:
        for sock in socks:
            with contextlib.suppress(OSError):  # closed by the server
                sock.sendall(bytes([byte]))
        time.sleep(0.2)


def _probe(port: int) -> float:
    """One /livez on a connection of its own; its duration, after checking it answered 200."""
    started = time.monotonic()
    with _connect(port, LIVEZ + b"Connection: close\r\n\r\n") as sock:
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    return time.monotonic() - started


@contextmanager
def probing(port: int) -> Iterator[list[float]]:
    """/livez every 50 ms in a thread while the block runs; the durations, checked at the end."""
    durations: list[float] = []
    failures: list[Exception] = []
    stop = threading.Event()

    def run() -> None:
        while True:
            try:
                durations.append(_probe(port))
            except (AssertionError, OSError) as exc:
                failures.append(exc)
            if stop.wait(0.05):
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield durations
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not failures, f"/livez failed under attack: {failures[0]!r}"
    assert durations, "the probe never ran"
    assert max(durations) < PROBE_BUDGET, f"/livez took {max(durations):.3f}s under attack"


def _closed_after(
    socks: dict[socket.socket, float], within: float
) -> dict[socket.socket, tuple[float, bytes]]:
    """For each socket the server closes within ``within`` s: seconds since its start, and what it got."""
    done: dict[socket.socket, tuple[float, bytes]] = {}
    received = {sock: b"" for sock in socks}
    deadline = time.monotonic() + within
    while len(done) < len(socks) and time.monotonic() < deadline:
        readable, _, _ = select.select([s for s in socks if s not in done], [], [], 0.05)
        for sock in readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            received[sock] += chunk
            if not chunk:
                done[sock] = (time.monotonic() - socks[sock], received[sock])
    return done


def test_heads_not_completed_in_time_are_closed_at_the_deadline(
    settings_factory: Callable[..., Settings],
) -> None:
    """Silent, half-sent, trickled, and half-sent after a first request on the same connection."""
    with running_receiver(settings_factory(WEBHOOK_HEADER_TIMEOUT_SECONDS="1")) as (base, admin):
        port, probes = _port(base), _port(admin)
        with probing(probes):
            started: dict[socket.socket, float] = {}

            def opened(head: bytes = b"") -> socket.socket:
                at = time.monotonic()
                sock = _connect(port, head)
                started[sock] = at
                return sock

            silent = [opened() for _ in range(100)]
            for _ in range(100):
                opened(HEAD)
            for _ in range(50):  # a whole request first: the next one's deadline starts with its first byte
                sock = _connect(probes, LIVEZ + b"\r\n")
                assert _answer_to_livez(sock)
                started[sock] = time.monotonic()
                sock.sendall(HEAD)
            trickled = [opened() for _ in range(20)]
            trickler = threading.Thread(target=_trickle, args=(trickled,), daemon=True)
            trickler.start()
            closed = _closed_after(started, within=3)
            trickler.join(timeout=5)
        assert len(closed) == len(started), f"{len(started) - len(closed)} connections still open"
        for sock, (after, answer) in closed.items():
            assert 0.95 < after < 2.5, f"closed after {after:.2f}s"
            expected = b"" if sock in silent else b"HTTP/1.1 408 Request Timeout\r\n"
            assert answer[: len(expected)] == expected, answer[:80]
            sock.close()


def test_a_request_answered_before_its_body_closes_its_connection(
    settings_factory: Callable[..., Settings],
) -> None:
    """A refused sender cannot keep its connection by trickling a body nobody reads."""
    with (
        running_receiver(settings_factory(WEBHOOK_HEADER_TIMEOUT_SECONDS="1")) as (base, _),
        _connect(_port(base), HEAD + b"Content-Length: 1000000\r\n\r\n{") as sock,
    ):
        started = time.monotonic()
        sock.sendall(b" " * 10)
        answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 403"), answer[:80]
        assert time.monotonic() - started < 0.5


def _response(sock: socket.socket) -> bytes:
    """One response, whole, from a single recv (its head says how long its body is)."""
    data = sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    assert len(body) == length, f"the response came in pieces: {data!r}"
    return data


def test_responses_held_for_one_write_arrive_whole_after_any_100_continue(
    settings_factory: Callable[..., Settings], r: redis.Redis
) -> None:
    """On a kept-alive connection, every time; a client that expects 100 Continue still gets it
    before it sends the body, and then the answer."""
    body = fixture_body("item.refreshed")
    post = (
        b"POST /webhooks/bridge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"BridgeApi-Signature: %s\r\nContent-Length: %d\r\n"
        % (signed(body)["headers"]["BridgeApi-Signature"].encode(), len(body))
    )
    with running_receiver(settings_factory(BRIDGE_ALLOWED_IPS="127.0.0.1")) as (base, _):
        with _connect(_port(base)) as sock:
            for _ in range(3):
                sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _response(sock).startswith(b"HTTP/1.1 404")
            sock.sendall(post + b"\r\n" + body)
            assert b'"status":"queued"' in _response(sock)
        with _connect(_port(base), post + b"Expect: 100-continue\r\n\r\n") as sock:
            assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(body)
            assert b'"status":"duplicate"' in _response(sock)
    assert len(queued_ids(r)) == 1


class _Transport(asyncio.Transport):
    """What the protocol writes, call by call (uvloop's transport, as far as the protocol uses it)."""

    def __init__(self) -> None:
        super().__init__({"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)})
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_response_leaves_in_one_write(settings_factory: Callable[..., Settings]) -> None:
    """uvicorn writes a response's head, then its body: two system calls, two segments. Ours: one,
    request after request; a 100 Continue still leaves before the body is read."""
    settings = settings_factory(BRIDGE_ALLOWED_IPS="127.0.0.1")
    config = uvicorn_config(settings, "127.0.0.1", 8000)
    config.load()

    async def run() -> list[bytes]:
        protocol = config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
        )
        transport = _Transport()
        protocol.connection_made(transport)
        for _ in range(2):
            protocol.data_received(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
            for _ in range(5):
                await asyncio.sleep(0)
        head = b"POST /webhooks/bridge HTTP/1.1\r\nHost: x\r\nBridgeApi-Signature: v1=00\r\n"
        protocol.data_received(head + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        for _ in range(5):
            await asyncio.sleep(0)
        protocol.data_received(b"{}")
        for _ in range(5):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport.writes

    writes = asyncio.run(run())
    assert [w.split(b"\r\n", 1)[0] for w in writes[:3]] == [b"HTTP/1.1 404 Not Found"] * 2 + [
        b"HTTP/1.1 100 Continue"
    ]
    assert all(w.endswith(b"}") for w in writes[:2]), writes  # each 404 with its body
    # The rare request that expects 100 Continue keeps uvicorn's own writes.
    answer = b"".join(writes[3:])
    assert answer.startswith(b"HTTP/1.1 401") and answer.endswith(b"}"), writes


def test_a_huge_head_is_refused_without_holding_the_loop(
    settings_factory: Callable[..., Settings], r: redis.Redis
) -> None:
    """The attacker offers 64 MB of one header; the receiver stops reading after its allowance."""
    settings = settings_factory(BRIDGE_ALLOWED_IPS="127.0.0.1", WEBHOOK_MAX_HEADER_BYTES="4096")
    with running_receiver(settings) as (base, admin):
        port, probes = _port(base), _port(admin)
        with probing(probes), _connect(port, HEAD + b"X-Big: ") as sock:
            started, sent = time.monotonic(), 0
            try:
                while sent < 64 * 1024 * 1024 and not select.select([sock], [], [], 0)[0]:
                    sock.sendall(b"a" * 65536)
                    sent += 65536
            except OSError:
                pass  # reset: the server closed with our bytes unread
            answer = _answer(sock)
            elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 431") or answer == b"reset", answer[:80]
        assert sent < 16 * 1024 * 1024, f"the client could push {sent} bytes"
        assert elapsed < 2, f"refused after {elapsed:.1f}s"

        # Within the allowance, whatever follows in the same read (here a 60 KB body) is the body.
        with _connect(probes, LIVEZ + b"Connection: close\r\nX-Big: " + b"a" * 3900 + b"\r\n\r\n") as sock:
            assert _answer(sock).startswith(b"HTTP/1.1 200")
        kwargs = signed(fixture_body("item.created") + b" " * 60000)
        head = HEAD + b"Connection: close\r\nContent-Type: application/json\r\n"
        head += b"BridgeApi-Signature: %s\r\nContent-Length: %d\r\n\r\n" % (
            kwargs["headers"]["BridgeApi-Signature"].encode(),
            len(kwargs["content"]),
        )
        with _connect(port, head + kwargs["content"]) as sock:
            assert _answer(sock).startswith(b"HTTP/1.1 200")
        assert len(queued_ids(r)) == 1


def test_connections_over_the_limit_evict_the_idle_and_only_busy_ones_refuse(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(
        BRIDGE_ALLOWED_IPS="127.0.0.1", WEBHOOK_MAX_CONNECTIONS="100", WEBHOOK_READ_TIMEOUT_SECONDS="5"
    )
    with running_receiver(settings) as (base, admin):
        port, probes = _port(base), _port(admin)
        # 150 heads that never end, against a limit of 100: the oldest make room, the probe gets in.
        with probing(probes):
            held = [_connect(port, HEAD) for _ in range(150)]
            time.sleep(0.3)
            closed = _closed_after(dict.fromkeys(held, time.monotonic()), within=0.5)
        assert len(closed) >= 50, f"{len(closed)} of 150 closed, the limit is 100"
        assert set(held[:50]) <= set(closed), "the longest-waiting connections go first"
        for sock in held:
            sock.close()
        time.sleep(0.3)

        # 100 requests in progress (bodies not sent yet) cannot be evicted: the next one is refused.
        body_pending = b"POST /webhooks/bridge HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        busy = [_connect(port, body_pending) for _ in range(100)]
        time.sleep(0.3)
        with _connect(port) as sock:
            assert _answer(sock).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        for sock in busy:
            sock.close()
        time.sleep(0.3)
        assert _probe(probes) < PROBE_BUDGET


def test_serve_raises_its_file_limit_to_fit_the_connections(redis_url: str) -> None:
    """Containers often start with a soft limit of 1024 file descriptors, under the default 2000."""

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    port, admin = free_port(), free_port()
    env = {
        **os.environ,
        "ADMIN_PORT": str(admin),
        "REDIS_URL": redis_url,
        "BRIDGE_WEBHOOK_SECRETS": SECRET,
        "WEBHOOK_MAX_CONNECTIONS": "2000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridgehook", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=low_soft_limit,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{admin}/livez")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert int(line.split()[3]) == 2000 + RESERVED_FILES
