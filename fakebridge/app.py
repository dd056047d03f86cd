"""The HTTP face of the fake: Bridge's v3 aggregation routes over a World, with faults and a request log."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fakebridge.connect import RETURN_PAGE, connect_page, create_session, describe, return_page
from fakebridge.world import Refusal, RequestRecord, World, parse_iso_ms, render, render_json

PREFIX = "/v3/aggregation"
TOKEN_PATH = PREFIX + "/authorization/token"
CONNECT_PAGE = "/connect/"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return render_json(content).encode()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(
    status: int, code: str | None = None, message: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = {"code": code or phrase.lower().replace(" ", "_").replace("-", "_"), "message": message or phrase}
    return JSONResponse(body, status_code=status, headers=headers)


def fault_response(status: int, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(1 if retry_after is None else retry_after)} if status == 429 else None
    return error_response(status, message="injected fault", headers=headers)


def budget_response(refusal: Refusal) -> JSONResponse:
    return error_response(
        429,
        "too_many_requests",
        f"{refusal.kind} rate limit exceeded, retry in {refusal.retry_after} s",
        {"Retry-After": str(refusal.retry_after)},
    )


def _bearer(request: Request | Scope) -> str:
    headers = request.headers if isinstance(request, Request) else Request(request).headers
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The whole request body, and a ``receive`` that hands the same messages to the route again."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return body, replay


def _token_request_user(world: World, body: bytes) -> str | None:
    """The user a token request names (its user_uuid, else the owner of its external_user_id): the key
    of its token budget, so that switching identifiers does not dodge the limit."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(user := data.get("user_uuid"), str) and user:
        return user
    external = data.get("external_user_id")
    return world.user_by_external_id(external) if isinstance(external, str) else None


class FakeBridgeMiddleware:
    """Delay and latency, one-shot and ratio faults, client credentials check, request budgets (rate
    limits), request log, JSON errors."""

    def __init__(self, app: ASGIApp, world: World) -> None:
        self.app, self.world = app, world

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived, recorded = time.monotonic(), False

        def record(status: int) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                query = scope.get("query_string", b"").decode("latin-1")
                user = self.world.token_user(_bearer(scope))
                self.world.record_request(
                    RequestRecord(scope["method"], scope["path"], query, status, user, arrived)
                )

        async def send_and_record(message: Message) -> None:
            # Log the request *before* the response leaves: once a client has seen a response, its
            # record must already be in ``world.requests`` (logging afterwards races with the client).
            if message["type"] == "http.response.start":
                record(message["status"])
            await send(message)

        try:
            if (delay := self.world.faults.next_delay()) > 0:
                await asyncio.sleep(delay)  # not time.sleep: the other requests go on meanwhile
            await self._handle(scope, receive, send_and_record)
        finally:
            record(500)  # no response was started: the error handler outside answers 500

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        response: Response | None = None
        headers = Request(scope).headers
        if scope["path"].startswith(CONNECT_PAGE):  # a user's browser: no credentials, no budget
            await self.app(scope, receive, send)
            return
        if (fault := self.world.faults.take()) is not None:
            response = fault_response(fault.status, fault.retry_after)
        elif (
            headers.get("client-id") != self.world.client_id
            or headers.get("client-secret") != self.world.client_secret
            or not headers.get("bridge-version")
        ):
            response = error_response(
                401, "invalid_client", "Client-Id, Client-Secret and Bridge-Version are required"
            )
        else:
            keys, receive = await self._budget_keys(scope, receive)
            if (refusal := self.world.budgets.admit(keys)) is not None:
                response = budget_response(refusal)
        if response is not None:
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _budget_keys(self, scope: Scope, receive: Receive) -> tuple[dict[str, str], Receive]:
        """What the request is charged to: the application always, the user of a valid bearer token, and
        the user a token request names (read from its body, which is then replayed to the route)."""
        keys = {"app": self.world.client_id}
        if (user := self.world.token_user(_bearer(scope))) is not None:
            keys["user"] = user
        if scope["method"] == "POST" and scope["path"] == TOKEN_PATH:
            body, receive = await _read_body(receive)
            if (named := _token_request_user(self.world, body)) is not None:
                keys["token"] = named
        return keys, receive


# -- request helpers -------------------------------------------------------------------------------------
def _user(request: Request) -> str:
    user = request.app.state.world.token_user(_bearer(request))
    if user is None:
        raise ApiError(401, "invalid_token", "missing, unknown or expired access token")
    return str(user)


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be an integer") from None


def _check_item_fault(request: Request, item_id: int | None) -> None:
    status = request.app.state.world.faults.item_status(item_id)
    if status is not None:
        raise ApiError(status, "item_fault", f"injected fault for item {item_id}")


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def _page(request: Request, rows: list[dict[str, Any]]) -> JSONResponse:
    """One page of ``rows`` (sorted by id) after the ``after`` cursor, with next_uri on all but the last."""
    world: World = request.app.state.world
    limit = _int_param(request, "limit")
    limit = 50 if limit is None else limit
    if not 1 <= limit <= world.page_limit_max:
        raise ApiError(400, "invalid_parameter", f"limit must be between 1 and {world.page_limit_max}")
    after = _int_param(request, "after")
    remaining = rows if after is None else [r for r in rows if r["id"] > after]
    served = limit if world.page_size is None else min(limit, world.page_size)
    page = remaining[:served]
    next_uri = None
    if len(remaining) > served:
        query = [(k, v) for k, v in request.query_params.multi_items() if k not in ("limit", "after")]
        query += [("limit", str(limit)), ("after", str(page[-1]["id"]))]
        next_uri = f"{request.url.path}?{urlencode(query)}"
    return JSONResponse({"resources": page, "pagination": {"next_uri": next_uri}})


# -- endpoints -------------------------------------------------------------------------------------------
async def create_token(request: Request) -> Response:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise ApiError(400, "invalid_body", "the body must be JSON") from None
    if not isinstance(body, dict) or not (body.get("user_uuid") or body.get("external_user_id")):
        raise ApiError(400, "invalid_body", "user_uuid or external_user_id is required")
    token = request.app.state.world.issue_token(body.get("user_uuid"), body.get("external_user_id"))
    if token is None:
        raise _not_found("user")
    return JSONResponse(token, status_code=201)


async def create_user(request: Request) -> Response:
    world: World = request.app.state.world
    try:
        body = json.loads(await request.body() or b"{}")
        external = body.get("external_user_id")
    except (ValueError, AttributeError) as exc:
        raise ApiError(400, "invalid_body", str(exc)) from None
    if external is not None and not isinstance(external, str):
        raise ApiError(400, "invalid_body", "external_user_id must be a string")
    try:
        uuid = world.add_user(external)
    except ValueError as exc:  # that external_user_id is taken
        raise ApiError(409, "conflict", str(exc)) from None
    return JSONResponse(
        render({"uuid": uuid, "external_user_id": body.get("external_user_id")}), status_code=201
    )


async def delete_user(request: Request) -> Response:
    try:
        request.app.state.world.delete_user(request.path_params["user_uuid"])
    except KeyError:
        raise _not_found("user") from None
    return Response(status_code=204)


async def list_items(request: Request) -> Response:
    items = request.app.state.world.api_items(_user(request))
    return _page(request, [describe(item, request.headers.get("accept-language")) for item in items])


async def get_item(request: Request) -> Response:
    user, item_id = _user(request), request.path_params["item_id"]
    _check_item_fault(request, item_id)
    item = request.app.state.world.api_item(user, item_id)
    if item is None:
        raise _not_found("item")
    return JSONResponse(describe(item, request.headers.get("accept-language")))


async def list_accounts(request: Request) -> Response:
    user, item_id = _user(request), _int_param(request, "item_id")
    _check_item_fault(request, item_id)
    rows = request.app.state.world.api_accounts(user, item_id)
    if rows is None:
        raise _not_found("item")
    return _page(request, rows)


async def get_account(request: Request) -> Response:
    world: World = request.app.state.world
    user, account_id = _user(request), request.path_params["account_id"]
    _check_item_fault(request, world.item_of_account(account_id))
    account = world.api_account(user, account_id)
    if account is None:
        raise _not_found("account")
    return JSONResponse(account)


async def list_transactions(request: Request) -> Response:
    world: World = request.app.state.world
    user, account_id = _user(request), _int_param(request, "account_id")
    if account_id is not None:
        _check_item_fault(request, world.item_of_account(account_id))
    since_ms = None
    if since := request.query_params.get("since"):
        try:
            since_ms = parse_iso_ms(since)
        except ValueError:
            raise ApiError(400, "invalid_parameter", "since must be an ISO 8601 date-time") from None
    rows = world.api_transactions(user, account_id, since_ms)
    if rows is None:
        raise _not_found("account")
    return _page(request, rows)


async def _http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return error_response(status, "not_found" if status == 404 else None)


def create_app(world: World) -> Starlette:
    """The fake's ASGI app; ``app.state.world`` is ``world``."""
    routes = [
        Route("/authorization/token", create_token, methods=["POST"]),
        Route("/users", create_user, methods=["POST"]),
        Route("/users/{user_uuid}", delete_user, methods=["DELETE"]),
        Route("/items", list_items, methods=["GET"]),
        Route("/items/{item_id:int}", get_item, methods=["GET"]),
        Route("/accounts", list_accounts, methods=["GET"]),
        Route("/accounts/{account_id:int}", get_account, methods=["GET"]),
        Route("/transactions", list_transactions, methods=["GET"]),
        Route("/connect-sessions", create_session, methods=["POST"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: _http_error,
        ApiError: _http_error,
    }
    app = Starlette(
        routes=[
            Mount(PREFIX, routes=routes),
            Route(RETURN_PAGE, return_page),  # before the sessions' pages, whose ids are hex
            Route(CONNECT_PAGE + "{session_id}", connect_page),
        ],
        middleware=[Middleware(FakeBridgeMiddleware, world=world)],
        exception_handlers=handlers,
    )
    app.state.world = world
    app.state.connect_sessions = {}
    return app
