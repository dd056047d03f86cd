"""The fake Bridge of benchmark 5 (`benchmarks/budget.py`), in its own process:

  python -m benchmarks.budget_fake --port P [--users 60] [--seed 5]

Every user has one item of 1 to 5 accounts, a few dozen transactions each. The stock fake's API
(``fakebridge.app``, untouched) is served beside a few control routes under ``/_bench/`` (outside
its latency, budgets and request log):

- ``POST /_bench/configure`` sets the latency and the budgets and empties the request log;
- ``POST /_bench/refresh`` makes one refresh of an item at Bridge and answers the webhooks Bridge
  would send for it, with the fewest calls they need (ground truth, see :func:`refresh`);
- ``GET /_bench/plan``, ``/_bench/requests`` and ``/_bench/truth``: the items, the request log with
  the fake's calls in flight over time, and the world as the API renders it.
"""

from __future__ import annotations

import argparse
import random
import time
from decimal import Decimal
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fakebridge.app import create_app
from fakebridge.world import World, render_json

# The mix of a refresh (fractions): an item whose refresh fails for want of the user (402, one
# item.refreshed and nothing else), an account added, an account whose refresh changed only its balance.
P_STATUS, P_CREATED, P_BALANCE_ONLY = 0.05, 0.05, 0.3


def build(users: int, seed: int) -> tuple[World, list[dict[str, Any]]]:
    world = World(seed=seed)
    rng = random.Random(seed)  # noqa: S311 (a reproducible world, not a secret)
    plan = []
    for n in range(users):
        user = world.add_user(external_user_id=f"budget-{n}")
        item = world.add_item(user)
        for _ in range(rng.randint(1, 5)):
            world.add_transactions(world.add_account(item, balance=f"{rng.randint(0, 500000) / 100:.2f}"), 30)
        plan.append({"user_uuid": user, "item_id": item})
    return world, plan


def refresh(world: World, rng: random.Random, item_id: int) -> dict[str, Any]:
    """One refresh of ``item_id``, and what it needs at the least: a transactions page per account whose
    transactions changed (``pages``; one listing for the user would do with ``user_pages``), an account
    call per account the events do not describe (a new one: ``accounts``). No item call: item.refreshed
    carries the status. Tokens are counted by the benchmark (one per user per two hours)."""
    with world.lock:
        item = world._items[item_id]
        accounts = world._item_account_ids(item_id)
        if item.data["status"] == 0 and rng.random() < P_STATUS:
            world.set_item_status(item_id, 402, status_code_info="wrong credentials")
            return _answer(world, [world.event_item_refreshed(item_id)], 0, 0)
        world.set_item_status(item_id, 0)
        events, pages, created = [world.event_item_refreshed(item_id)], 0, 0
        if len(accounts) < 5 and rng.random() < P_CREATED:
            new = world.add_account(item_id, name="Livret", type="savings", balance="100.00")
            world.add_transactions(new, 5)
            events.append(world.event_account(new, "created"))
            pages, created = pages + 1, created + 1
        for account in accounts:
            balance = Decimal(rng.randint(0, 500000)).scaleb(-2)
            if rng.random() >= P_BALANCE_ONLY:
                world.add_transactions(account, rng.randint(1, 3))
                if rng.random() < 0.3:
                    txns = world._account_txns[account]
                    world.update_transaction(txns[rng.randrange(len(txns))], amount="-7.77")
                pages += 1
            world.update_account(
                account, balance=balance, accounting_balance=balance, instant_balance=balance
            )
            events.append(world.event_account(account, "updated"))
        return _answer(world, events, pages, created)


def _answer(
    world: World, events: list[tuple[str, dict[str, Any]]], pages: int, accounts: int
) -> dict[str, Any]:
    stamp = world._clock_ms  # each event's timestamp: when Bridge sent it, after the change it reports
    return {
        "events": [{"type": t, "content": c, "timestamp": stamp} for t, c in events],
        "minimum": {"pages": pages, "user_pages": min(pages, 1), "accounts": accounts},
    }


class InFlight:
    """The fake's calls in flight, integrated over time (ASGI middleware around the API)."""

    def __init__(self, app: Any) -> None:
        self.app, self.now, self.busy, self.peak, self.since = app, 0, 0.0, 0, time.monotonic()

    def _tick(self, delta: int) -> None:
        at = time.monotonic()
        self.busy += self.now * (at - self.since)
        self.now, self.since = self.now + delta, at
        self.peak = max(self.peak, self.now)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self._tick(1)
        try:
            await self.app(scope, receive, send)
        finally:
            self._tick(-1)


def serve(port: int, users: int, seed: int) -> None:
    world, plan = build(users, seed)
    rng = random.Random(seed + 1)  # noqa: S311
    api = InFlight(create_app(world))

    def json_response(body: Any) -> Response:
        return Response(render_json(body), media_type="application/json")

    async def configure(request: Request) -> Response:
        body = await request.json()
        world.faults.latency(body["latency_ms"] / 1000, body["jitter_ms"] / 1000)
        world.budgets.set(**{k: tuple(body[k]) if body.get(k) else None for k in ("app", "user", "token")})
        world.reset_requests()
        api.busy, api.peak, api.since = 0.0, api.now, time.monotonic()
        return json_response({})

    async def do_refresh(request: Request) -> Response:
        return json_response(refresh(world, rng, int((await request.json())["item_id"])))

    async def requests(request: Request) -> Response:
        api._tick(0)
        with world.lock:
            log = [[r.method, r.path, r.status, r.time] for r in world.requests]
        return json_response(
            {"log": log, "busy": api.busy, "peak": api.peak, "refused": world.budgets.refused}
        )

    async def truth(request: Request) -> Response:
        return json_response(world.snapshot())

    async def plan_route(request: Request) -> Response:
        return json_response(plan)

    control = Starlette(routes=[
        Route("/_bench/configure", configure, methods=["POST"]),
        Route("/_bench/refresh", do_refresh, methods=["POST"]),
        Route("/_bench/requests", requests), Route("/_bench/truth", truth), Route("/_bench/plan", plan_route),
    ])  # fmt: skip

    async def app(scope: Any, receive: Any, send: Any) -> None:
        target = control if scope["type"] == "http" and scope["path"].startswith("/_bench/") else api
        await target(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", access_log=False)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.budget_fake")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    serve(args.port, args.users, args.seed)


if __name__ == "__main__":
    main()
