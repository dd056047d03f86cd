"""The baseline: a bare Starlette endpoint that answers 200, served exactly as the receiver is."""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.server import UVICORN_OPTIONS


async def ok(request: Request) -> JSONResponse:
    return JSONResponse({"status": "queued"})


app = Starlette(routes=[Route("/webhooks/bridge", ok, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off", log_level="warning", **UVICORN_OPTIONS
    )
