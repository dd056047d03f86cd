"""``POST /v1/users/{external_user_id}/connect-sessions``: a Bridge Connect page for the user.

``{"user_email", "item_id"?, "context"?}`` → 201 ``{"url"}``, the page to send the user's browser
to. The session's ``callback_url`` is always ours (``CONNECT_CALLBACK_URL``, the receiver's
``/connect/callback``), which records the outcome and sends the browser on to the application
(``CONNECT_RETURN_URL``). With ``item_id`` the session repairs that item (new credentials for 402,
SCA for 1007/1009/1010, identity validation for 1100): it must be one of the user's items (404).
``context`` comes back in the callback untouched; Bridge allows 100 characters, we allow printable
ones only, since the callback will carry it through the user's browser.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.errors import ApiError
from api.users import live_user
from workers.context import WorkerContext

CONTEXT_MAX = 100
_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+")
_MAX_ID = 2**63 - 1


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        raise ApiError(400, "invalid_body", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", 'the body is an object: {"user_email", "item_id"?, "context"?}')
    email, context, item_id = body.get("user_email"), body.get("context"), body.get("item_id")
    if not isinstance(email, str) or len(email) > 254 or not _EMAIL.fullmatch(email):
        raise ApiError(400, "invalid_email", "user_email is not an email address")
    if context is not None and (
        not isinstance(context, str) or len(context) > CONTEXT_MAX or not context.isprintable()
    ):
        raise ApiError(400, "invalid_context", f"context is at most {CONTEXT_MAX} printable characters")
    if item_id is not None and (type(item_id) is not int or not 0 < item_id <= _MAX_ID):
        raise ApiError(400, "invalid_item_id", "item_id is a positive integer")
    session: dict[str, Any] = {"user_email": email}
    session.update((k, v) for k, v in (("item_id", item_id), ("context", context)) if v is not None)
    return session


def _open(ctx: WorkerContext, request: Request, session: dict[str, Any]) -> str:
    uuid = live_user(ctx, request)
    if "item_id" in session:
        with ctx.storage.transaction() as tx:
            row = tx.execute(
                "SELECT 1 FROM items WHERE id = %s AND user_uuid = %s AND deleted_at IS NULL",
                (session["item_id"], uuid),
            ).fetchone()
        if row is None:
            raise ApiError(404, "item_not_found", "the user has no such item")
    session["callback_url"] = ctx.settings.connect_callback_url
    return str(ctx.client.connect_session(uuid, session)["url"])


async def create_session(request: Request) -> Response:
    ctx: WorkerContext = request.app.state.ctx
    session = _body(await request.body())
    url = await run_in_threadpool(_open, ctx, request, session)
    return JSONResponse({"url": url}, status_code=201)
