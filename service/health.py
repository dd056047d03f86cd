"""Probes: ``/livez`` says the process runs (no I/O); ``/readyz`` says Redis takes writes."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.logs import get_logger
from service.queue import EventQueue, QueueUnavailable

log = get_logger("bridgehook.health")


async def livez(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


class Readiness:
    """Whether Redis takes writes, asked of Redis at most once per ``seconds`` however often
    ``/readyz`` is called: each check writes a key, and a probe must not be a way to load Redis.
    Callers arriving during a check wait for its answer."""

    def __init__(self, queue: EventQueue, seconds: float = 1.0) -> None:
        self.queue = queue
        self.seconds = seconds
        self._lock = asyncio.Lock()
        self._at = -float("inf")
        self._error: str | None = None

    async def error(self) -> str | None:
        """None when ready, else why not (as of at most ``seconds`` ago)."""
        async with self._lock:
            if time.monotonic() - self._at >= self.seconds:
                try:
                    await self.queue.ping()
                    self._error = None
                except QueueUnavailable as exc:
                    self._error = str(exc)
                    log.warning("readyz.failed", error=self._error)
                self._at = time.monotonic()
            return self._error


async def readyz(request: Request) -> JSONResponse:
    if await request.app.state.readiness.error() is not None:
        return JSONResponse(
            {"status": "unavailable", "detail": "Redis does not accept writes"}, status_code=503
        )
    return JSONResponse({"status": "ok"})
