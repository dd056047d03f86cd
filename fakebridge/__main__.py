"""``python -m fakebridge serve [--host H] [--port P] [--seed-demo] [--seed N] [--latency-ms MS]
[--jitter-ms MS] [--budget-app N/S] [--budget-user N/S] [--budget-token N/S] [--webhook-url URL]``: the
fake (foreground). With ``--webhook-url``, its Connect page delivers the webhooks it causes there,
signed with ``FAKE_BRIDGE_WEBHOOK_SECRET``.

The latency and budget options make the fake as slow and as strict as the real API (whose documented
limits are 2000/300 per application, 60/60 per user and 10/60 token requests per user), so that a client
is tried against them before production; without them it answers at once and never throttles.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from fakebridge.app import PREFIX, create_app
from fakebridge.sender import WebhookSender
from fakebridge.world import Limit, World, seed_demo


def budget(text: str) -> Limit:
    """``N/S``: at most N requests per S seconds (S may be fractional)."""
    count, slash, seconds = text.partition("/")
    try:
        limit = (int(count), float(seconds))
    except ValueError:
        limit = (0, 0.0)
    if not slash or limit[0] < 1 or not limit[1] > 0:
        raise argparse.ArgumentTypeError(f"expected N/S (N >= 1 requests per S > 0 seconds), not {text!r}")
    return limit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fakebridge", description="A local fake of Bridge's API v3."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the fake aggregation API over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8990)
    serve.add_argument("--seed-demo", action="store_true", help="populate the demo users, items and accounts")
    serve.add_argument("--seed", type=int, default=0, help="seed of generated content and latency draws")
    serve.add_argument("--latency-ms", type=float, default=0.0, help="mean latency of every request")
    serve.add_argument("--jitter-ms", type=float, default=0.0, help="latency spread: mean ± jitter")
    for kind, real in (("app", "2000/300"), ("user", "60/60"), ("token", "10/60")):
        serve.add_argument(
            f"--budget-{kind}",
            type=budget,
            metavar="N/S",
            help=f"{kind} rate limit, N requests per S seconds (Bridge: {real}; default unlimited)",
        )
    serve.add_argument(
        "--webhook-url",
        help="where the Connect page sends its webhooks (a receiver's /webhooks/bridge), signed with "
        "FAKE_BRIDGE_WEBHOOK_SECRET",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.jitter_ms <= args.latency_ms:
        parser.error("--jitter-ms must be between 0 and --latency-ms")
    return args


def make_world(args: argparse.Namespace) -> World:
    """The World the options describe (credentials from FAKE_BRIDGE_CLIENT_ID / _SECRET)."""
    world = World(
        client_id=os.environ.get("FAKE_BRIDGE_CLIENT_ID", "fake-client-id"),
        client_secret=os.environ.get("FAKE_BRIDGE_CLIENT_SECRET", "fake-client-secret"),
        seed=args.seed,
    )
    if args.seed_demo:
        seed_demo(world)
    world.faults.latency(args.latency_ms / 1000, args.jitter_ms / 1000, seed=args.seed)
    world.budgets.set(app=args.budget_app, user=args.budget_user, token=args.budget_token)
    if args.webhook_url:
        secret = os.environ.get("FAKE_BRIDGE_WEBHOOK_SECRET", "")
        if not secret:
            raise SystemExit("--webhook-url needs FAKE_BRIDGE_WEBHOOK_SECRET, the receiver's webhook secret")
        world.webhooks = WebhookSender(args.webhook_url, secret).send
    return world


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = make_world(args)
    print(
        f"fake Bridge API at http://{args.host}:{args.port}{PREFIX} (client id {world.client_id})", flush=True
    )
    uvicorn.run(create_app(world), host=args.host, port=args.port, lifespan="off", log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
