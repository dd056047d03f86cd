"""The receiver's ASGI application: routes, lifespan and middleware, built from Settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.connect import CALLBACK_PATH, ConnectCallback
from service.health import Readiness, livez, readyz
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
        await queue.check_durability()
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
            view.deadlines.close()
            await queue.close()
            log.info("receiver.stopped")

    app = Starlette(
        routes=[
            Route("/livez", livez),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route(CALLBACK_PATH, ConnectCallback(settings, queue).endpoint),
        ],
        lifespan=lifespan,
    )
    # No redirect from /metrics/ to /metrics: its Location would be built from the client's Host header.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.queue = queue
    app.state.readiness = Readiness(queue)
    return behind_proxies(WebhookFirst(view, app), settings.trusted_proxies)


class WebhookFirst:
    """Plain ASGI: the webhook path goes straight to its view (the hot path, every delivery);
    everything else (probes, metrics, lifespan, 404s) goes through Starlette."""

    def __init__(self, webhook: ASGIApp, app: Starlette) -> None:
        self.webhook = webhook
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH:
            await self.webhook(scope, receive, send)
        else:
            await self.app(scope, receive, send)
