"""``GET /v1/users/{external_user_id}/items``: each live item with what it needs (``action``), its
dates, its Connect outcome and its accounts.

Both providers' items, each with its ``provider``: a Powens connection N is item -N (see
workers.providers), its ``status`` the Bridge status asking the same of the user, its state in
``status_code_info``. ``action`` is :func:`workers.actions.action`. ``status_code_description`` is
Bridge's own text in the language the request's ``Accept-Language`` asks for (``fr`` or ``en``, else
``BRIDGE_ACCEPT_LANGUAGE``): the workers store it in ``BRIDGE_ACCEPT_LANGUAGE``; in another language
it is asked from Bridge (the item, with that header) and kept in Redis for a day per language,
status and ``status_code_info``, so one request serves every item in that state. Should Bridge be
unreachable, the stored text is given instead of none.

An account's ``last_refresh_ok`` is Bridge's rule: ``updated_at >= item.last_try_refresh``. Its IBAN
is masked (the country, check digits and last four characters); the whole one is for the workers'
reader, not for a screen.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.users import live_users
from workers.actions import action
from workers.context import WorkerContext
from workers.db import to_datetime, to_decimal
from workers.errors import ProviderError

LANGUAGES = ("fr", "en")
TEXT_TTL_SECONDS = 86400


def language(header: str | None, default: str) -> str:
    """The first of the header's languages we serve (``fr-FR`` is ``fr``), else ``default``."""
    for part in (header or "").split(","):
        tag = part.split(";")[0].strip().lower().split("-")[0]
        if tag in LANGUAGES:
            return tag
    return default


def iso(value: Any) -> str | None:
    moment = to_datetime(value)
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def masked(iban: str | None) -> str | None:
    if not iban:
        return None
    return iban[:4] + "*" * max(len(iban) - 8, 0) + iban[-4:]


def _description(ctx: WorkerContext, item: dict[str, Any], lang: str) -> str | None:
    stored: str | None = item.pop("_stored_description")
    uuid: str = item.pop("_user")
    if (
        item["status"] in (None, 0)
        or lang == ctx.settings.bridge_accept_language
        or item["provider"] != "bridge"
    ):
        return stored  # (Powens's error_message comes in one language)
    key = f"bridgehook:status-text:{lang}:{item['status']}:{item['status_code_info'] or ''}"
    cached = ctx.redis.get(key)
    if cached is not None:
        return cached.decode() if isinstance(cached, bytes) else str(cached)
    try:
        text = ctx.client.get_item_in(uuid, item["item_id"], lang).get("status_code_description")
    except ProviderError:  # busy, unreachable, or the item gone at Bridge a moment ago: our own text
        return stored
    ctx.redis.set(key, text or "", ex=TEXT_TTL_SECONDS)
    return str(text) if text else None


Decode = Callable[[str | None, str], str | None]


def _account(row: tuple[Any, ...], tried_at: datetime | None, decode: Decode) -> dict[str, Any]:
    account_id, _, name, kind, balance, currency, iban, access, updated = row
    updated_at = to_datetime(updated)
    return {
        "account_id": int(account_id),
        "name": decode(name, "accounts.name"),
        "type": kind,
        "balance": None if balance is None else str(to_decimal(balance)),
        "currency_code": currency,
        "iban_masked": masked(decode(iban, "accounts.iban")),
        "data_access": access,
        # Bridge's rule: the account's last refresh succeeded when updated_at >= item.last_try_refresh.
        "last_refresh_ok": tried_at is None or (updated_at is not None and updated_at >= tried_at),
    }


def _items(ctx: WorkerContext, request: Request) -> list[dict[str, Any]]:
    uuids = live_users(ctx, request)
    lang = language(request.headers.get("accept-language"), ctx.settings.bridge_accept_language)
    now, warning = datetime.now(UTC), timedelta(days=ctx.settings.consent_warning_days)
    decode = ctx.storage.codec.decode
    mine = f"user_uuid IN ({', '.join(['%s'] * len(uuids))})"  # the users' placeholders, never input
    with ctx.storage.transaction() as tx:
        items = tx.execute(
            "SELECT id, status, status_code_info, status_code_description, authentication_expires_at, "  # noqa: S608
            "last_successful_refresh, last_try_refresh, status_changed_at, provider, user_uuid FROM items "
            f"WHERE {mine} AND deleted_at IS NULL ORDER BY provider, id",
            uuids,
        ).fetchall()
        accounts = tx.execute(
            "SELECT id, item_id, name, type, balance, currency_code, iban, data_access, bridge_updated_at "  # noqa: S608
            "FROM accounts WHERE deleted_at IS NULL AND item_id IN "
            f"(SELECT id FROM items WHERE {mine} AND deleted_at IS NULL) ORDER BY id",
            uuids,
        ).fetchall()
        connects = tx.execute(
            f"SELECT item_id, success, step, returned_at FROM connect_sessions WHERE {mine} "  # noqa: S608
            "AND item_id IS NOT NULL ORDER BY returned_at, id",
            uuids,
        ).fetchall()
    last_connect = {
        row[0]: {"success": bool(row[1]), "step": row[2], "at": iso(row[3])} for row in connects
    }  # the latest of each item wins
    out = []
    for item_id, status, info, text, expires, success, tried, changed, of, uuid in items:
        tried_at = to_datetime(tried)
        out.append(
            {
                "item_id": int(item_id),
                "provider": of,
                "_user": uuid,
                "status": status,
                "status_code_info": info,
                "_stored_description": text,
                "action": action(status, to_datetime(changed), to_datetime(expires), now, warning),
                "consent_expires_at": iso(expires),
                "last_successful_refresh": iso(success),
                "last_connect": last_connect.get(item_id),
                "accounts": [_account(a, tried_at, decode) for a in accounts if a[1] == item_id],
            }
        )
    for item in out:
        item["status_code_description"] = _description(ctx, item, lang)
    return out


async def list_items(request: Request) -> Response:
    ctx: WorkerContext = request.app.state.ctx
    items = await run_in_threadpool(_items, ctx, request)
    return JSONResponse({"items": items})
