"""Probes: ``/livez`` says the process runs (no I/O); ``/readyz`` says Redis takes writes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.logs import get_logger
from service.queue import QueueUnavailable

log = get_logger("bridgehook.health")


async def livez(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    try:
        await request.app.state.queue.ping()
    except QueueUnavailable as exc:
        log.warning("readyz.failed", error=str(exc))
        return JSONResponse(
            {"status": "unavailable", "detail": "Redis does not accept writes"}, status_code=503
        )
    return JSONResponse({"status": "ok"})
