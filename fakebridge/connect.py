"""The fake's Bridge Connect: ``POST /connect-sessions`` and the page a user's browser is sent to, and
status descriptions in the language a request asks for.

A GET on a session's page plays the user who goes through Connect: it creates an item (or, for a
session opened with ``item_id``, repairs that one), delivers the webhooks Bridge would send to
``world.webhooks`` (a callable taking the event type and content, such as ``WebhookSender.send``;
none are sent while it is None), and redirects (303) to the session's ``callback_url`` with
``user_uuid``, ``item_id``, ``success``, ``step`` and ``context``, as Bridge does. Query parameters
on the page choose the outcome: ``success=false`` with a ``step`` (where the user left: nothing
changes and no webhook is sent), and ``status`` (the new or repaired item's status, 0 by default).
A page serves once; it is a 404 afterwards.

``/connect/return`` stands in for the application's page at ``CONNECT_RETURN_URL`` (``bridgehook dev``
points it there): it answers, as JSON, the parameters the receiver passed on, and nothing else.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from fakebridge.world import World, iso_ms, render_json

# Bridge's own texts, per status and language (what the real API answers under Accept-Language).
DESCRIPTIONS: dict[int, dict[str, str]] = {
    402: {"en": "Wrong credentials", "fr": "Identifiants incorrects"},
    429: {"en": "Action required on the bank's website", "fr": "Action requise sur le site de la banque"},
    430: {"en": "Password expired", "fr": "Mot de passe expiré"},
    1003: {"en": "The bank is temporarily unavailable", "fr": "La banque est temporairement indisponible"},
    1007: {"en": "Strong authentication required", "fr": "Authentification forte requise"},
    1009: {"en": "Strong authentication required", "fr": "Authentification forte requise"},
    1010: {"en": "Strong authentication required", "fr": "Authentification forte requise"},
    1100: {"en": "Pro account validation required", "fr": "Validation du compte pro requise"},
}
LANGUAGES = ("en", "fr")
RETURN_PAGE = "/connect/return"
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
CONTEXT_MAX = 100


def language(header: str | None) -> str:
    """The first language of an ``Accept-Language`` header that we speak (``fr-FR`` is ``fr``), else en."""
    for part in (header or "").split(","):
        tag = part.split(";")[0].strip().lower().split("-")[0]
        if tag in LANGUAGES:
            return tag
    return "en"


def describe(item: dict[str, Any], header: str | None) -> dict[str, Any]:
    """The rendered item with ``status_code_description`` in the language ``header`` asks for."""
    texts = DESCRIPTIONS.get(int(item.get("status", 0)))
    if texts is not None:
        item = {**item, "status_code_description": texts[language(header)]}
    return item


@dataclass
class Session:
    id: str
    user_uuid: str
    user_email: str
    callback_url: str | None
    item_id: int | None
    context: str | None
    used: bool = False


def _error(status: int, code: str, message: str) -> Response:
    body = render_json({"code": code, "message": message})
    return Response(body, status_code=status, media_type="application/json")


def _bearer_user(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    world: World = request.app.state.world
    return world.token_user(token.strip()) if scheme.lower() == "bearer" else None


async def create_session(request: Request) -> Response:
    world: World = request.app.state.world
    user = _bearer_user(request)
    if user is None:
        return _error(401, "invalid_token", "missing, unknown or expired access token")
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return _error(400, "invalid_body", "the body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "invalid_body", "the body must be an object")
    email, callback, item_id, context = (
        body.get("user_email"), body.get("callback_url"), body.get("item_id"), body.get("context")
    )  # fmt: skip
    if not isinstance(email, str) or not _EMAIL.fullmatch(email):
        return _error(400, "invalid_parameter", "user_email must be an email address")
    if callback is not None and (
        not isinstance(callback, str) or urlsplit(callback).scheme not in ("http", "https")
    ):
        return _error(400, "invalid_parameter", "callback_url must be an http(s) URL")
    if context is not None and (not isinstance(context, str) or len(context) > CONTEXT_MAX):
        return _error(400, "invalid_parameter", f"context must be a string of at most {CONTEXT_MAX}")
    if item_id is not None and (type(item_id) is not int or world.api_item(user, item_id) is None):
        return _error(404, "not_found", "item not found")
    session = Session(secrets.token_hex(16), user, email, callback, item_id, context)
    sessions: dict[str, Session] = request.app.state.connect_sessions
    with world.lock:
        sessions[session.id] = session
    url = f"{str(request.base_url).rstrip('/')}/connect/{session.id}"
    return Response(render_json({"id": session.id, "url": url}), 201, media_type="application/json")


def connect_page(request: Request) -> Response:
    """The user goes through Connect (a plain function: Starlette runs it in a thread, so that the
    webhooks it delivers never block the fake's event loop)."""
    world: World = request.app.state.world
    sessions: dict[str, Session] = request.app.state.connect_sessions
    with world.lock:
        session = sessions.get(request.path_params["session_id"])
        if session is None or session.used:
            return HTMLResponse("<p>This Connect session is unknown or over.</p>", 404)
        session.used = True
    success = request.query_params.get("success", "true") != "false"
    status = int(request.query_params.get("status", "0"))
    item_id, events = session.item_id, list[tuple[str, dict[str, Any]]]()
    if success:
        item_id, events = _go_through(world, session, status)
    for event_type, content in events:
        if world.webhooks is not None:
            world.webhooks(event_type, content)
    if session.callback_url is None:
        return HTMLResponse("<p>Done: you may close this page.</p>")
    params: dict[str, str] = {"user_uuid": session.user_uuid}
    if item_id is not None:
        params["item_id"] = str(item_id)
    params["success"] = "true" if success else "false"
    if not success:
        params["step"] = request.query_params.get("step", "bank_creds_form")
    if session.context is not None:
        params["context"] = session.context
    separator = "&" if urlsplit(session.callback_url).query else "?"
    return RedirectResponse(session.callback_url + separator + urlencode(params), status_code=303)


def return_page(request: Request) -> Response:
    """The application's page after Connect, played by the fake: what it was told, as JSON (never
    HTML, so that nothing the query holds becomes markup)."""
    return JSONResponse(dict(request.query_params))


def _go_through(world: World, session: Session, status: int) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
    """A new item with an account and its history, or the repair of the session's item; the webhooks."""
    with world.lock:
        if session.item_id is not None:
            item_id = session.item_id
            world.set_item_status(item_id, status, status_code_description=None)
            events = [world.event_item_refreshed(item_id, refresh_trigger="connect")]
            events += [world.event_account(a) for a in world._item_account_ids(item_id)]
            return item_id, events
        consent = iso_ms(world._clock_ms + 180 * 86_400_000)
        item_id = world.add_item(session.user_uuid, status=status, authentication_expires_at=consent)
        account_id = world.add_account(item_id)
        world.add_transactions(account_id, 12)
        events = [world.event_item_created(item_id), world.event_account(account_id, "created")]
        events.append(world.event_item_refreshed(item_id, full_refresh=True, refresh_trigger="connect"))
        return item_id, events
