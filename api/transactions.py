"""``GET /v1/users/{external_user_id}/transactions``: the user's transactions, decrypted, newest first.

Query: ``account_id`` (one of the user's accounts, else 404), ``since`` (a date: transactions dated
on or after it), ``limit`` (1 to 500, 100 by default), ``cursor`` (from the previous page's
``next_cursor``; opaque), ``include_deleted=true`` (transactions Bridge deleted, and those of
accounts and items deleted since, with their ``deleted_at``).

Newest first is by ``date``, then by id, both descending; the cursor is the last row's pair, so a
page never repeats or skips a row however many are written meanwhile (new ones are newer: they
belong to earlier pages). Rows without a date come last.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import date
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.errors import ApiError
from api.items import iso
from api.users import live_users
from workers.context import WorkerContext
from workers.db import to_decimal

MAX_LIMIT, DEFAULT_LIMIT = 500, 100
_NO_DATE = date(1, 1, 1)  # where rows without a date sort, on both engines
_MAX_ID = 2**63 - 1
COLUMNS = (
    "t.id", "t.account_id", "t.amount", "t.currency_code", "COALESCE(t.date, %s)", "t.booking_date",
    "t.transaction_date", "t.value_date", "t.clean_description", "t.provider_description", "t.category_id",
    "t.operation_type", "t.future", "t.bridge_updated_at", "t.deleted_at",
)  # fmt: skip


def _cursor(text: str) -> tuple[date, int]:
    try:
        day, last = json.loads(base64.urlsafe_b64decode(text.encode()))
        found = date.fromisoformat(day), int(last)
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        found = None
    if found is None or not 0 < abs(found[1]) <= _MAX_ID:
        raise ApiError(400, "invalid_cursor", "cursor is not one this API gave")
    return found


def _next(day: Any, last: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([str(day)[:10], last]).encode()).decode()


def _query(request: Request) -> dict[str, Any]:
    q = request.query_params
    out: dict[str, Any] = {"include_deleted": q.get("include_deleted", "false") == "true"}
    if q.get("include_deleted", "false") not in ("true", "false"):
        raise ApiError(400, "invalid_parameter", "include_deleted is true or false")
    try:
        out["limit"] = int(q.get("limit", DEFAULT_LIMIT))
        out["account_id"] = None if q.get("account_id") is None else int(q["account_id"])
        out["since"] = None if q.get("since") is None else date.fromisoformat(q["since"])
    except ValueError:
        raise ApiError(400, "invalid_parameter", "limit and account_id are integers, since a date") from None
    if not 1 <= out["limit"] <= MAX_LIMIT:
        raise ApiError(400, "invalid_parameter", f"limit is between 1 and {MAX_LIMIT}")
    if out["account_id"] is not None and not 0 < abs(out["account_id"]) <= _MAX_ID:
        raise ApiError(400, "invalid_parameter", "account_id is a non-zero 64-bit integer")
    out["cursor"] = None if q.get("cursor") is None else _cursor(q["cursor"])
    return out


def _page(ctx: WorkerContext, request: Request, q: dict[str, Any]) -> dict[str, Any]:
    uuids = live_users(ctx, request)
    users = ", ".join(["%s"] * len(uuids))
    day = "COALESCE(t.date, %s)"
    where = [f"i.user_uuid IN ({users})"]
    params: list[Any] = [_NO_DATE, *uuids]
    if not q["include_deleted"]:
        where.append("t.deleted_at IS NULL AND a.deleted_at IS NULL AND i.deleted_at IS NULL")
    if q["account_id"] is not None:
        with ctx.storage.transaction() as tx:
            owned = tx.execute(
                "SELECT 1 FROM accounts a JOIN items i ON i.id = a.item_id "  # noqa: S608
                f"WHERE a.id = %s AND i.user_uuid IN ({users})",
                (q["account_id"], *uuids),
            ).fetchone()
        if owned is None:
            raise ApiError(404, "account_not_found", "the user has no such account")
        where.append("t.account_id = %s")
        params.append(q["account_id"])
    if q["since"] is not None:
        where.append(f"{day} >= %s")
        params += [_NO_DATE, q["since"]]
    if q["cursor"] is not None:
        where.append(f"({day} < %s OR ({day} = %s AND t.id < %s))")
        params += [_NO_DATE, q["cursor"][0], _NO_DATE, q["cursor"][0], q["cursor"][1]]
    sql = (
        f"SELECT {', '.join(COLUMNS)} FROM transactions t JOIN accounts a ON a.id = t.account_id "  # noqa: S608
        f"JOIN items i ON i.id = a.item_id WHERE {' AND '.join(where)} "
        f"ORDER BY {day} DESC, t.id DESC LIMIT %s"
    )
    params += [_NO_DATE, q["limit"] + 1]
    with ctx.storage.transaction() as tx:
        rows = tx.execute(sql, params).fetchall()
    more, rows = len(rows) > q["limit"], rows[: q["limit"]]
    decode = ctx.storage.codec.decode
    found = [
        {
            "transaction_id": int(r[0]),
            "account_id": int(r[1]),
            "amount": None if r[2] is None else str(to_decimal(r[2])),
            "currency_code": r[3],
            "date": None if str(r[4])[:10] == str(_NO_DATE) else str(r[4])[:10],
            "booking_date": None if r[5] is None else str(r[5])[:10],
            "transaction_date": None if r[6] is None else str(r[6])[:10],
            "value_date": None if r[7] is None else str(r[7])[:10],
            "clean_description": decode(r[8], "transactions.clean_description"),
            "provider_description": decode(r[9], "transactions.provider_description"),
            "category_id": r[10],
            "operation_type": r[11],
            "future": bool(r[12]),
            "updated_at": iso(r[13]),
            "deleted_at": iso(r[14]),
        }
        for r in rows
    ]
    return {"transactions": found, "next_cursor": _next(rows[-1][4], rows[-1][0]) if more else None}


async def list_transactions(request: Request) -> Response:
    ctx: WorkerContext = request.app.state.ctx
    q = _query(request)
    return JSONResponse(await run_in_threadpool(_page, ctx, request, q))
