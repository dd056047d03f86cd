"""Serve a World over real HTTP on a loopback port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn
from starlette.types import ASGIApp

from fakebridge.app import PREFIX, create_app
from fakebridge.world import World


class LocalServer:
    """An ASGI app on a loopback port, in a background thread; subclasses say which app and prefix."""

    prefix = ""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + self.prefix

    def app(self) -> ASGIApp:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> None:
        """Bind (port 0 picks a free port), run uvicorn in a daemon thread and wait until it serves."""
        if self._thread is not None:
            raise RuntimeError("already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP, and
        # without it keep-alive responses stall ~40 ms (Nagle against delayed ACKs).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.set_inheritable(True)
        self.port, self._socket = int(sock.getsockname()[1]), sock
        config = uvicorn.Config(
            self.app(), loop="asyncio", lifespan="off", log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"fakebridge:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {type(self).__name__} did not start")
            time.sleep(0.005)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to exit, wait for its thread (forcing after ``timeout``), close the socket."""
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout)
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class FakeBridgeServer(LocalServer):
    """``with FakeBridgeServer(world) as server: httpx.get(server.api_url + "/items", ...)``."""

    prefix = PREFIX

    def __init__(self, world: World, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.world = world

    def app(self) -> ASGIApp:
        return create_app(self.world)
