"""The receiver's ASGI application: routes, lifespan and middleware, built from Settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp

from service.context import RequestContextMiddleware
from service.health import livez, readyz
from service.logs import get_logger
from service.metrics import metrics_endpoint
from service.queue import EventQueue
from service.settings import Settings
from service.sources import behind_proxies
from service.webhooks import WebhookView

log = get_logger("bridgehook.app")

WEBHOOK_PATH = "/webhooks/bridge"


def create_app(settings: Settings) -> ASGIApp:
    queue = EventQueue(settings)
    view = WebhookView(settings, queue)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await queue.open()
        log.info(
            "receiver.started",
            queue=settings.queue_name,
            redis=settings.redis_url_for_logs,
            allowed_ips=[str(n) for n in settings.allowed_ips],
            trusted_proxies=[str(n) for n in settings.trusted_proxies],
            max_body_bytes=settings.max_body_bytes,
            secrets=len(settings.webhook_secrets),
        )
        try:
            yield
        finally:
            await queue.close()
            log.info("receiver.stopped")

    app = Starlette(
        routes=[
            Route(WEBHOOK_PATH, view),
            Route("/livez", livez),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
        ],
        middleware=[Middleware(RequestContextMiddleware)],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.queue = queue
    return behind_proxies(app, settings.trusted_proxies)
