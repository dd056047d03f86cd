"""A fake Powens (API 2.0) over a PowensWorld, and a sender of its signed webhooks.

What a sync needs, as powens-api.md describes it: ``POST /auth/init`` (a permanent user token),
``GET /users/{id|me}/connections``, ``GET /users/{id|me}/accounts[?all]``,
``GET /users/{id|me}/transactions?limit=&offset=&last_update=&all&min_date=&max_date=`` paged
through ``_links.next``, and ``DELETE /users/{id|me}``. Every ``/users`` route needs
``Authorization: Bearer <that user's token>``. Errors are Powens's ``{"code", "description", "message"}``.
Around the routes, as the fake Bridge has them: latency, injected faults, request budgets (a 429, with
``Retry-After`` unless ``world.retry_after_header`` is off) and a log of the requests served
(``world.requests``).

The sender signs as Powens does, ``BI-Signature`` = base64(HMAC-SHA256(secret,
``POST.<path>.<BI-Signature-Date>.<body>``)), and may gzip the body (signing the compressed bytes,
or the inflated ones: Powens does not say which it signs). Standalone: it never imports the service.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fakebridge.powens_world import PowensWorld, PRequest, PUser, read_powens_time
from fakebridge.server import LocalServer
from fakebridge.world import render_json

PREFIX = "/2.0"
MAX_LIMIT = 1000
WEBHOOK_PREFIX = "/webhooks/powens/"


class PowensError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _json(content: Any, status: int = 200) -> Response:
    return Response(render_json(content), status_code=status, media_type="application/json")


def _error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PowensError)
    body = {"code": exc.code, "description": exc.message, "message": exc.message, "request_id": "fake"}
    return _json(body, exc.status)


def _user(request: Request) -> PUser:
    """The user the path names (``me``: the token's), if the bearer token is that user's."""
    world: PowensWorld = request.app.state.world
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    user = world.user_by_token(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    if user is None:
        raise PowensError(401, "invalidToken", "the token is missing or unknown")
    named = request.path_params["user"]
    if named != "me" and named != str(user.id):
        raise PowensError(403, "forbidden", "this token belongs to another user")
    return user


def _flag(request: Request, name: str) -> bool:
    return name in request.query_params and request.query_params[name].lower() not in ("0", "false")


def _moment(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return read_powens_time(raw)
    except ValueError:
        raise PowensError(400, "invalidValue", f"{name} is not YYYY-MM-DD HH:MM:SS") from None


def _day(request: Request, name: str) -> date | None:
    raw = request.query_params.get(name)
    try:
        return None if raw is None else date.fromisoformat(raw)
    except ValueError:
        raise PowensError(400, "invalidValue", f"{name} is not YYYY-MM-DD") from None


def _int(request: Request, name: str, default: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None and default is not None:
        return default
    if raw is None or not raw.isdigit():
        raise PowensError(400, "invalidValue", f"{name} must be a non-negative integer")
    return int(raw)


async def auth_init(request: Request) -> Response:
    world: PowensWorld = request.app.state.world
    body = json.loads(await request.body() or b"{}")
    if body.get("client_id") != world.client_id or body.get("client_secret") != world.client_secret:
        raise PowensError(401, "invalidClient", "unknown client id or secret")
    user = world.add_user()
    return _json({"auth_token": user.token, "type": "permanent", "id_user": user.id})


async def list_connections(request: Request) -> Response:
    world: PowensWorld = request.app.state.world
    user = _user(request)
    rows = [world.render_connection(c) for c in world.connections.values() if c.id_user == user.id]
    return _json({"connections": rows, "total": len(rows)})


async def list_accounts(request: Request) -> Response:
    world: PowensWorld = request.app.state.world
    accounts = world.user_accounts(_user(request).id, include_all=_flag(request, "all"))
    return _json({"accounts": [world.render_account(a) for a in accounts], "total": len(accounts)})


async def list_transactions(request: Request) -> Response:
    world: PowensWorld = request.app.state.world
    user = _user(request)
    limit, offset = _int(request, "limit", None), _int(request, "offset", 0)
    if not 0 < limit <= MAX_LIMIT:
        raise PowensError(400, "invalidValue", f"limit must be between 1 and {MAX_LIMIT}")
    after, include_all = _moment(request, "last_update"), _flag(request, "all")
    min_date, max_date = _day(request, "min_date"), _day(request, "max_date")
    active = {a.id for a in world.user_accounts(user.id, include_all=False)}
    if not active:
        raise PowensError(409, "noAccount", "the user has no activated account")
    rows = sorted(
        (
            t
            for t in world.transactions.values()
            if t.id_account in active
            and (include_all or t.deleted is None)
            and (after is None or (t.last_update is not None and t.last_update > after))
            and (min_date is None or t.day >= min_date)
            and (max_date is None or t.day <= max_date)
        ),
        key=lambda t: (t.last_update or datetime.min.replace(tzinfo=UTC), t.id),
    )
    page = rows[offset : offset + limit]
    links: dict[str, Any] = {"next": None}
    if offset + limit < len(rows):
        query = {k: v for k, v in request.query_params.items() if k != "offset"} | {
            "offset": str(offset + limit)
        }
        links["next"] = {"href": f"{PREFIX}{request.url.path.removeprefix(PREFIX)}?{urlencode(query)}"}
    return _json(
        {"transactions": [world.render_transaction(t) for t in page], "total": len(rows), "_links": links}
    )


async def delete_user(request: Request) -> Response:
    """The user and everything under it erased; its token goes with it."""
    world: PowensWorld = request.app.state.world
    world.delete_user(_user(request).id)
    return Response(status_code=204)


class PowensMiddleware:
    """Latency, one-shot and ratio faults, request budgets (the app's, and a user's by its bearer token),
    the request log."""

    def __init__(self, app: ASGIApp, world: PowensWorld) -> None:
        self.app, self.world = app, world

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        world = self.world

        async def logged(message: Message) -> None:
            if message["type"] == "http.response.start":  # logged before the client can see it
                query = scope.get("query_string", b"").decode("latin-1")
                world.requests.append(PRequest(scope["method"], scope["path"], query, message["status"]))
            await send(message)

        if (delay := world.faults.next_delay()) > 0:
            await asyncio.sleep(delay)
        response: Response | None = None
        if (fault := world.faults.take()) is not None:
            response = self._error(fault.status, "injected fault", fault.retry_after)
        else:
            keys = {"app": world.client_id}
            scheme, _, token = Request(scope).headers.get("authorization", "").partition(" ")
            user = (
                world.user_by_token(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
            )
            if user is not None:
                keys["user"] = str(user.id)
            if (refusal := world.budgets.admit(keys)) is not None:
                response = self._error(429, f"{refusal.kind} budget spent", refusal.retry_after)
        await (response or self.app)(scope, receive, logged)

    def _error(self, status: int, message: str, retry_after: int | None) -> Response:
        code = {429: "tooManyRequests", 500: "bug"}.get(status, "error")
        body = {"code": code, "description": message, "message": message, "request_id": "fake"}
        headers = (
            {"Retry-After": str(retry_after or 1)} if status == 429 and self.world.retry_after_header else {}
        )
        return Response(render_json(body), status_code=status, media_type="application/json", headers=headers)


def create_app(world: PowensWorld) -> Starlette:
    """The fake's ASGI app; ``app.state.world`` is ``world``."""
    routes = [
        Route("/auth/init", auth_init, methods=["POST"]),
        Route("/users/{user}", delete_user, methods=["DELETE"]),
        Route("/users/{user}/connections", list_connections, methods=["GET"]),
        Route("/users/{user}/accounts", list_accounts, methods=["GET"]),
        Route("/users/{user}/transactions", list_transactions, methods=["GET"]),
    ]
    app = Starlette(routes=[Mount(PREFIX, routes=routes)], exception_handlers={PowensError: _error})
    app.state.world = world
    app.add_middleware(PowensMiddleware, world=world)
    return app


class FakePowensServer(LocalServer):
    """``with FakePowensServer(world) as server: httpx.get(server.api_url + "/users/me/accounts", ...)``."""

    prefix = PREFIX

    def __init__(self, world: PowensWorld, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.world = world

    def app(self) -> ASGIApp:
        return create_app(self.world)


# -- webhooks ------------------------------------------------------------------------------------------


def sign(path: str, date_header: str, body: bytes, secret: str) -> str:
    message = b"POST." + path.encode() + b"." + date_header.encode() + b"." + body
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def now_header() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PowensSender:
    """POSTs signed Powens webhooks to ``<receiver_url>/webhooks/powens/<event>``, with the first secret."""

    def __init__(
        self, receiver_url: str, secret: str | Sequence[str], client: httpx.Client | None = None
    ) -> None:
        self.receiver_url = receiver_url.rstrip("/")
        self.secrets = [secret] if isinstance(secret, str) else list(secret)
        self.client = client or httpx.Client(timeout=10.0)

    def send(
        self,
        event: str,
        body: Mapping[str, Any] | bytes,
        *,
        compress: bool = False,
        sign_compressed: bool = True,
        date_header: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """``event``: Powens's name (CONNECTION_SYNCED) or ours (connection.synced, connection_synced)."""
        path = WEBHOOK_PREFIX + event.lower().replace(".", "_")
        plain = body if isinstance(body, bytes) else render_json(dict(body)).encode()
        sent = gzip.compress(plain) if compress else plain
        stamp = date_header or now_header()
        signed = sent if sign_compressed else plain
        all_headers = {
            "Content-Type": "application/json",
            "BI-Signature": sign(path, stamp, signed, self.secrets[0]),
            "BI-Signature-Date": stamp,
            **({"Content-Encoding": "gzip"} if compress else {}),
            **(headers or {}),
        }
        return self.client.post(self.receiver_url + path, content=sent, headers=all_headers)

    def close(self) -> None:
        self.client.close()
