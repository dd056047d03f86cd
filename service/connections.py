"""What a connection may cost before its request reaches the app: time, header bytes, a slot.

Our code runs only once a request's headers are complete, so nothing in the app can stop a client
that never completes them. Left alone, uvicorn keeps such a connection open for ever (its
keep-alive timeout only runs between requests, and the first byte of a new request stops it), and
httptools accumulates a header without a size limit, by repeated concatenation: 64 MB of one header
held the event loop for 4.5 s. So the guard sits in the server protocol, below ASGI: a subclass of
uvicorn's httptools protocol that bounds the *head* of each request (the request line and headers,
and whatever a kept-alive connection sends before its next request line):

- **time**: a head must be complete ``WEBHOOK_HEADER_TIMEOUT_SECONDS`` after the connection was
  opened, or after the first byte that followed the previous request (408, then close; a
  connection that sent nothing is just closed);
- **size**: at most ``WEBHOOK_MAX_HEADER_BYTES`` of it are fed to the parser (431, then close), so
  the parser's quadratic copying stays small, and so does what a connection holds (a head that
  begins in the read where the previous request ended is counted from the next read on: one read,
  fed in one go, copies nothing twice);
- **connections**: at most ``WEBHOOK_MAX_CONNECTIONS`` per process. A connection beyond it closes
  the connection that has waited longest without a request in progress (still sending its head, or
  idle between requests); only if every connection has a request in progress is the newcomer
  refused (503, then close);
- **a body nobody reads**: a request answered before its body arrived (a refusal) closes its
  connection, or the sender could keep it by trickling the body.

Why not the alternatives. uvicorn's ``limit_concurrency`` counts connections but acts only once a
request's headers are complete: it frees nothing held by incomplete heads, and when tripped it
answers 503 to every request, the kubelet's probes too, so a few thousand silent connections would
have the pod restarted. The h11 parser's ``h11_max_incomplete_event_size`` bounds the size only,
not the time, and h11 parses in pure Python, on the path of every delivery. Another server
(hypercorn, granian) would replace a stack the benchmarks and tests are built on, for two checks
that fit in this module.

The cost on the hot path: no timer for a request whose head arrives in one read (as from the
ingress), a few dictionary operations and method calls; about 2 µs of CPU per request, measured
in-process against the plain protocol (best of 8 runs of 10,000: 34.9 → 36.7 µs) with an app that
does nothing, where a delivery costs the receiver hundreds.

**One write per response.** uvicorn writes a response's status line and headers as soon as the
app sends them, then the body: two system calls and two TCP segments for every answer, each waking
the client. ``OneWrite`` holds the head until the body's first write and sends both at once. On a
busy 2-core machine that took about 1.5 µs of the receiver's CPU and 4 µs of its client's off each
request, and raised benchmark 1's ratio from 0.52 to 0.60 (medians of five runs taking turns:
docs/performance.md, 2026-12-07 10:15).

Why evict instead of refuse: the only connections that cannot be evicted are those with a request
in progress, and outside the allowed sources a request ends at its headers (403, answered at
once), while an allowed source's body is bounded by ``WEBHOOK_READ_TIMEOUT_SECONDS``. So a client
that may not deliver cannot keep anyone out, the probes included: it can only make connections
churn. The ingress's idle upstream connections are evicted the same way, never refused.
"""

from __future__ import annotations

import asyncio
import resource
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.settings import Settings, SettingsError

# File descriptors beside the connections: the Redis pool (64), the listening socket, the loop's own.
RESERVED_FILES = 128


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size for each head, and a connection limit.

    A connection is *in its head* from when it opens, or its previous request's body ended, until its
    next request's headers are complete; ``waiting`` holds those connections, longest-waiting first.
    """

    settings: ClassVar[Settings]
    waiting: ClassVar[dict[GuardedProtocol, None]]  # per server: see protocol_for()

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0  # received since the head began
    _message_begun = False  # the parser saw the head's first byte (it may have come after a body)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.settings.max_connections and not self._evict_one():
            self._close(503)
            return
        self._enter_head()
        self._start_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self.waiting.pop(self, None)
        self._stop_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self in self.waiting:
            room = self.settings.max_header_bytes - self._head_bytes
            self._head_bytes += len(data)
            if len(data) > room:
                # Feed the head's allowance only: the rest of this read may be the request's body.
                super().data_received(data[:room])
                if self.transport.is_closing():
                    return
                if self in self.waiting and self._head_bytes:  # the same head, still not complete
                    self._close(431)
                    return
                data = data[room:]
        super().data_received(data)
        # The clock starts only for a head still incomplete after the read: no timer per request when
        # a whole request arrives at once, as it does from the ingress.
        if self._head_timer is None and self._head_begun() and not self.transport.is_closing():
            self._start_clock()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_begun = True

    def on_headers_complete(self) -> None:
        self.waiting.pop(self, None)
        self._stop_clock()
        before = self.cycle
        super().on_headers_complete()
        # A new request's cycle, its task not yet begun: it writes through OneWrite. Not when the
        # client expects a 100 Continue, which must leave before the head it would be held with.
        if self.cycle is not before and not self.expect_100_continue:
            self.cycle.transport = OneWrite(self.transport)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._enter_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle.response_complete and self.cycle.more_body and not self.transport.is_closing():
            # Answered before its body arrived (a refusal): nobody will read the rest, which could
            # trickle in for ever, each byte stopping uvicorn's keep-alive timeout.
            self._close(None)

    def _enter_head(self) -> None:
        self._head_bytes = 0
        self._message_begun = False
        self.waiting[self] = None

    def _head_begun(self) -> bool:
        return self in self.waiting and (self._head_bytes > 0 or self._message_begun)

    def _start_clock(self) -> None:
        self._head_timer = self.loop.call_later(self.settings.header_timeout_seconds, self._head_timeout)

    def _stop_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self in self.waiting and not self.transport.is_closing():
            self._close(408 if self._head_begun() and self._nothing_in_progress() else None)

    def _nothing_in_progress(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _evict_one(self) -> bool:
        for other in self.waiting:  # longest-waiting first
            if other._nothing_in_progress():
                del self.waiting[other]
                other._close(None)
                return True
        return False

    def _close(self, status: int | None) -> None:
        """Answer ``status`` (none: say nothing) and close; the peer's unread bytes are dropped."""
        self.waiting.pop(self, None)
        self._stop_clock()
        if status is not None:
            self.transport.write(STATUS_LINE[status] + b"content-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()


class OneWrite:
    """One request's cycle's view of its connection: its first write, the response's status line and
    headers, waits for the second, the body's first part, and both leave in one ``write``.

    uvicorn's cycle (0.55) writes the head in ``send`` of ``http.response.start`` and nothing before
    it (but a 100 Continue, which keeps the plain transport); an app that sends the head and then
    waits before the body holds the head as long. If the cycle closes instead (the app failed),
    the head leaves first, as it would have.
    """

    __slots__ = ("_head", "_started", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if not self._started:
            self._started, self._head = True, data
        elif self._head is not None:
            head, self._head = self._head, None
            self.transport.write(head + data)  # a copy of the body: webhook answers are small
        else:
            self.transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self.transport.write(head)
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


def protocol_for(settings: Settings) -> type[GuardedProtocol]:
    """The protocol class of one server: its settings, and its own registry of waiting connections."""

    class ServerProtocol(GuardedProtocol):
        pass

    ServerProtocol.settings = settings
    ServerProtocol.waiting = {}
    return ServerProtocol


def raise_file_limit(settings: Settings) -> None:
    """Let the process open ``WEBHOOK_MAX_CONNECTIONS`` connections, or say it cannot.

    Past the file descriptor limit, accept() fails and the listener pauses, whatever our limit;
    containers often start with a soft limit of 1024 and a much higher hard one.
    """
    needed = settings.max_connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    try:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(f"the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    except (ValueError, OSError) as exc:
        raise SettingsError(
            f"WEBHOOK_MAX_CONNECTIONS: {settings.max_connections} connections need {needed} file "
            f"descriptors and the limit cannot be raised that far ({exc}); lower it or raise `ulimit -n`"
        ) from None
