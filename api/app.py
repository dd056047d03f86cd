"""The application API's ASGI app (``bridgehook api``): routes, the door, errors, and the process's
context (Redis, the database, the Bridge client: a :class:`workers.context.WorkerContext`, as a
worker holds them).

| call | module |
|---|---|
| ``PUT``, ``DELETE /v1/users/{external_user_id}`` | :mod:`api.users` |
| ``POST /v1/users/{external_user_id}/connect-sessions`` | :mod:`api.sessions` |
| ``GET /v1/users/{external_user_id}/items`` | :mod:`api.items` |
| ``GET /v1/users/{external_user_id}/transactions`` | :mod:`api.transactions` |

``/livez`` answers without a token (the kubelet's probe); everything under ``/v1`` needs one.
Endpoints read and write through synchronous clients (psycopg, httpx, redis-py) in Starlette's
thread pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from api import items, sessions, transactions, users
from api.errors import HANDLERS
from api.guard import Guard
from service.logs import get_logger
from service.settings import Settings
from workers.context import WorkerContext

log = get_logger("bridgehook.api")

# What the API cannot start without.
API_NEEDS = (
    "API_TOKENS", "CONNECT_CALLBACK_URL", "REDIS_URL", "BRIDGE_CLIENT_ID", "BRIDGE_CLIENT_SECRET",
    "ENCRYPTION_KEYS",
)  # fmt: skip
USER = "/v1/users/{external_user_id}"


async def livez(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(settings: Settings, context: WorkerContext | None = None) -> ASGIApp:
    """The API; ``context``: one built already (tests), else one is built at start-up and closed after."""
    settings.require(*API_NEEDS)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ctx = context or WorkerContext.build(settings)
        app.state.ctx = ctx
        log.info("api.started", tokens=len(settings.api_tokens), database=settings.database_url_for_logs)
        try:
            yield
        finally:
            if context is None:
                ctx.close()
            log.info("api.stopped")

    handlers: dict[Any, Any] = HANDLERS
    app = Starlette(
        routes=[
            Route("/livez", livez),
            Route(USER, users.put_user, methods=["PUT"]),
            Route(USER, users.delete_user, methods=["DELETE"]),
            Route(USER + "/connect-sessions", sessions.create_session, methods=["POST"]),
            Route(USER + "/items", items.list_items, methods=["GET"]),
            Route(USER + "/transactions", transactions.list_transactions, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers=handlers,
    )
    app.router.redirect_slashes = False  # a Location built from the client's Host header
    return Guard(app, settings.api_tokens)
