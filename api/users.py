"""``PUT`` and ``DELETE /v1/users/{external_user_id}``: the application's ids mapped to Bridge's users.

The application names its users by its own id (``external_user_id``, Bridge's name for it); the API
keeps the mapping in ``users``. PUT creates the Bridge user, or finds it: in our table, else at
Bridge by its external id (our table lost, or a PUT that raced another), so it can be called every
time the application is unsure. DELETE deletes the user at Bridge, then erases every row of theirs
here (:mod:`workers.erasure`); again, it finds the tombstone and answers 204 all the same.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.errors import ApiError
from workers.context import WorkerContext
from workers.erasure import erase_user, forget_erasure, was_erased
from workers.errors import PermanentError
from workers.jobs import item_lock

_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def external_id(request: Request) -> str:
    value = str(request.path_params["external_user_id"])
    if not _ID.fullmatch(value):
        raise ApiError(400, "invalid_user_id", "a user id is 1 to 128 of A-Z a-z 0-9 . _ : @ -")
    return value


def find(ctx: WorkerContext, external: str, *, deleted: bool = False) -> str | None:
    """The uuid of the user the application knows by ``external``: a live one (or, with ``deleted``,
    one Bridge told us it deleted, whose rows wait for their erasure)."""
    live = "" if deleted else " AND deleted_at IS NULL"
    with ctx.storage.transaction() as tx:
        row = tx.execute(
            f"SELECT uuid FROM users WHERE external_user_id = %s{live} ORDER BY created_at DESC",  # noqa: S608
            (external,),
        ).fetchone()
    return None if row is None else str(row[0])


def live_user(ctx: WorkerContext, request: Request) -> str:
    """The uuid of the live user the path names; 400 for a malformed id, 404 for an unknown one."""
    uuid = find(ctx, external_id(request))
    if uuid is None:
        raise ApiError(404, "user_not_found", "no such user: create it with PUT /v1/users/{id}")
    return uuid


def _put(ctx: WorkerContext, external: str) -> tuple[int, str]:
    uuid = find(ctx, external)
    if uuid is not None:
        return 200, uuid
    try:
        user, status = ctx.client.create_user(external), 201
    except PermanentError:  # taken at Bridge (409): the user exists there, we lost it or raced
        found = ctx.client.find_user(external)
        if found is None:
            raise
        user, status = found, 200
    uuid = str(user["uuid"])
    with ctx.storage.transaction() as tx:
        ctx.storage.upsert_user(tx, uuid, external)
        forget_erasure(tx, external)
    return status, uuid


async def put_user(request: Request) -> Response:
    ctx: WorkerContext = request.app.state.ctx
    external = external_id(request)
    status, uuid = await run_in_threadpool(_put, ctx, external)
    return JSONResponse({"external_user_id": external, "uuid": uuid}, status_code=status)


def _delete(ctx: WorkerContext, external: str) -> bool:
    """Whether we knew the user (erased now, or before)."""
    uuid = find(ctx, external, deleted=True)
    if uuid is None:
        with ctx.storage.transaction() as tx:
            return was_erased(tx, external)
    ctx.client.delete_user(uuid)  # Bridge first: a failure here leaves our rows for the retry
    erase_user(ctx.storage, uuid, external, datetime.now(UTC), lambda item_id: item_lock(ctx, item_id))
    return True


async def delete_user(request: Request) -> Response:
    ctx: WorkerContext = request.app.state.ctx
    if not await run_in_threadpool(_delete, ctx, external_id(request)):
        raise ApiError(404, "user_not_found", "no such user")
    return Response(status_code=204)
