"""``PUT`` and ``DELETE /v1/users/{external_user_id}``: the application's ids mapped to the providers'
users.

The application names its users by its own id (``external_user_id``, Bridge's name for it); the API
keeps the mapping in ``users``, one user per provider (``?provider=bridge``, the default, or
``powens``). PUT creates the provider's user, or finds it: in our table, else, at Bridge, by its
external id (our table lost, or a PUT that raced another), so it can be called every time the
application is unsure. A Powens user is created by ``POST /auth/init``, whose permanent token is
stored encrypted (workers.tokens); Powens knows no external id, so concurrent PUTs for one id take a
lock instead. DELETE deletes the user at each provider, then erases every row of theirs here
(:mod:`workers.erasure`); again, it finds the tombstone and answers 204 all the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.errors import ApiError
from workers import tokens
from workers.context import WorkerContext
from workers.erasure import erase_user, forget_erasure, was_erased
from workers.errors import AuthError, NotFound, PermanentError, ProviderError
from workers.jobs import item_lock
from workers.providers import PROVIDERS, Provider, powens_user, powens_user_id, provider_of_user

_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def external_id(request: Request) -> str:
    value = str(request.path_params["external_user_id"])
    if not _ID.fullmatch(value):
        raise ApiError(400, "invalid_user_id", "a user id is 1 to 128 of A-Z a-z 0-9 . _ : @ -")
    return value


def provider(request: Request) -> Provider:
    value = request.query_params.get("provider", "bridge")
    if value not in PROVIDERS:
        raise ApiError(400, "invalid_provider", f"provider is one of {', '.join(PROVIDERS)}")
    return value


def users_of(ctx: WorkerContext, external: str, *, deleted: bool = False) -> list[str]:
    """The uuids of the users the application knows by ``external``, one a provider, newest first: the
    live ones (or, with ``deleted``, those a provider told us it deleted too, whose rows wait for
    their erasure)."""
    live = "" if deleted else " AND deleted_at IS NULL"
    with ctx.storage.transaction() as tx:
        rows = tx.execute(
            f"SELECT uuid FROM users WHERE external_user_id = %s{live} ORDER BY created_at DESC",  # noqa: S608
            (external,),
        ).fetchall()
    return [str(row[0]) for row in rows]


def find(ctx: WorkerContext, external: str, of: Provider = "bridge", *, deleted: bool = False) -> str | None:
    """The uuid of the provider's user the application knows by ``external``, if any."""
    return next((u for u in users_of(ctx, external, deleted=deleted) if provider_of_user(u) == of), None)


def live_users(ctx: WorkerContext, request: Request) -> list[str]:
    """The uuids of the live users the path names, every provider's; 400 for a malformed id, 404 for
    an unknown one."""
    uuids = users_of(ctx, external_id(request))
    if not uuids:
        raise ApiError(404, "user_not_found", "no such user: create it with PUT /v1/users/{id}")
    return uuids


def live_user(ctx: WorkerContext, request: Request) -> str:
    """The uuid of the live Bridge user the path names (Connect is Bridge's); 404 if none."""
    uuid = find(ctx, external_id(request))
    if uuid is None:
        raise ApiError(404, "user_not_found", "no such user: create it with PUT /v1/users/{id}")
    return uuid


def _put(ctx: WorkerContext, external: str, of: Provider) -> tuple[int, str]:
    if of == "powens":
        return _put_powens(ctx, external)
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


@contextmanager
def powens_answers() -> Iterator[None]:
    """Powens's errors, answered as Powens's (api.errors), not Bridge's."""
    try:
        yield
    except ProviderError as exc:
        exc.provider = "Powens"
        raise


def _put_powens(ctx: WorkerContext, external: str) -> tuple[int, str]:
    if not ctx.settings.powens_api_url:
        raise ApiError(400, "provider_not_configured", "this deployment has no Powens (POWENS_API_URL)")
    with ctx.redis.lock(f"bridgehook:lock:put-user:{external}", timeout=60, blocking_timeout=65):
        uuid = find(ctx, external, "powens")
        if uuid is not None:
            return 200, uuid
        with powens_answers():
            id_user, token = ctx.powens.auth_init()
        uuid = powens_user(id_user)
        with ctx.storage.transaction() as tx:
            ctx.storage.upsert_user(tx, uuid, external)
            tokens.store(tx, ctx.storage.codec, uuid, "powens", token)
            forget_erasure(tx, external)
        tokens.publish(ctx.redis, uuid, token)  # for the receiver's bearer mode, once committed
    return 201, uuid


async def put_user(request: Request) -> Response:
    ctx: WorkerContext = request.app.state.ctx
    external, of = external_id(request), provider(request)
    status, uuid = await run_in_threadpool(_put, ctx, external, of)
    return JSONResponse({"external_user_id": external, "uuid": uuid, "provider": of}, status_code=status)


def _delete(ctx: WorkerContext, external: str) -> bool:
    """Whether we knew the user (erased now, or before). Each provider first: a failure there leaves
    our rows for the retry."""
    uuids = users_of(ctx, external, deleted=True)
    if not uuids:
        with ctx.storage.transaction() as tx:
            return was_erased(tx, external)
    for uuid in uuids:
        if provider_of_user(uuid) == "powens":
            try:
                with ctx.storage.transaction() as tx:
                    token = tokens.load(tx, ctx.storage.codec, uuid)
                with powens_answers():
                    ctx.powens.delete_user(powens_user_id(uuid), token)
            except (tokens.MissingToken, NotFound, AuthError):  # gone at Powens already
                pass
        else:
            ctx.client.delete_user(uuid)
        erase_user(ctx.storage, uuid, external, datetime.now(UTC), lambda item_id: item_lock(ctx, item_id))
        tokens.unpublish(ctx.redis, uuid)
    return True


async def delete_user(request: Request) -> Response:
    ctx: WorkerContext = request.app.state.ctx
    if not await run_in_threadpool(_delete, ctx, external_id(request)):
        raise ApiError(404, "user_not_found", "no such user")
    return Response(status_code=204)
