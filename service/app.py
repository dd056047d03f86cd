"""The receiver's ASGI application: routes, lifespan and middleware, built from Settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from service.connect import CALLBACK_PATH, ConnectCallback
from service.health import Readiness, livez, readyz
from service.logs import get_logger
from service.metrics import metrics_endpoint
from service.powens import PATH_PREFIX as POWENS_PATH_PREFIX
from service.powens import PowensView
from service.queue import EventQueue
from service.settings import Settings
from service.sources import behind_proxies
from service.webhooks import WebhookView

log = get_logger("bridgehook.app")

WEBHOOK_PATH = "/webhooks/bridge"


def create_app(settings: Settings) -> ASGIApp:
    queue = EventQueue(settings)
    view = WebhookView(settings, queue)
    # Powens's endpoint exists only where it is configured (its HMAC secrets, or bearer mode, which
    # needs none); it shares the counts and the deadlines.
    powens = PowensView(settings, queue, view.rejections, view.deadlines) if settings.serves_powens else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await queue.open()
        await queue.check_durability()
        view.rejections.start(queue.redis)
        log.info(
            "receiver.started",
            queue=settings.queue_name,
            redis=settings.redis_url_for_logs,
            allowed_ips=[str(n) for n in settings.allowed_ips],
            trusted_proxies=[str(n) for n in settings.trusted_proxies],
            max_body_bytes=settings.max_body_bytes,
            secrets=len(settings.webhook_secrets),
            powens_secrets=len(settings.powens_webhook_secrets),
            powens_auth=settings.powens_webhook_auth if powens is not None else None,
        )
        if powens is not None and powens.sealer is None:
            log.warning("receiver.powens_bodies_in_clear", hint="set BODY_SEAL_PUBLIC_KEY")
        try:
            yield
        finally:
            view.deadlines.close()
            await view.rejections.stop(queue.redis)
            await queue.close()
            log.info("receiver.stopped")

    app = Starlette(
        routes=[
            Route("/livez", livez),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
        ],
        lifespan=lifespan,
    )
    # No redirect from /metrics/ to /metrics: its Location would be built from the client's Host header.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.queue = queue
    app.state.readiness = Readiness(queue)
    # The webhook port's other routes, for the user's browser: the end of Connect.
    public = Router([Route(CALLBACK_PATH, ConnectCallback(settings, queue).endpoint)], default=_not_found)
    public.redirect_slashes = False
    return behind_proxies(Ports(view, public, app, settings.admin_port, powens), settings.trusted_proxies)


_NOT_FOUND = b'{"error":"not_found","detail":"this port serves POST %s and GET %s"}' % (
    WEBHOOK_PATH.encode(),
    CALLBACK_PATH.encode(),
)
_NOT_FOUND_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_NOT_FOUND))]


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": _NOT_FOUND_HEADERS})
    await send({"type": "http.response.body", "body": _NOT_FOUND})


class Ports:
    """Plain ASGI, by the port a request came in on.

    On ``ADMIN_PORT``: the probes and ``/metrics`` (Starlette). On any other port, the one the
    ingress publishes: the webhook path, straight to its view (the hot path, every delivery), then
    Powens's paths when it is configured (a prefix test, after Bridge's equality), the end of
    Connect, and a 404 for anything else: whoever reaches the webhook port cannot read the metrics
    or make ``/readyz`` write to Redis. Lifespan goes to Starlette.
    """

    def __init__(
        self,
        webhook: ASGIApp,
        public: ASGIApp,
        app: Starlette,
        admin_port: int,
        powens: ASGIApp | None = None,
    ) -> None:
        self.webhook = webhook
        self.powens = powens
        self.public = public
        self.app = app
        self.admin_port = admin_port
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            if server is None or server[1] != self.admin_port:
                path = scope["path"]
                if path == WEBHOOK_PATH:
                    await self.webhook(scope, receive, send)
                elif self.powens is not None and path.startswith(POWENS_PATH_PREFIX):
                    await self.powens(scope, receive, send)
                else:
                    await self.public(scope, receive, send)
                return
        await self.app(scope, receive, send)
