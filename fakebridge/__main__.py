"""``python -m fakebridge serve [--host H] [--port P] [--seed-demo] [--seed N]``: the fake (foreground)."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from fakebridge.app import PREFIX, create_app
from fakebridge.world import World, seed_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fakebridge", description="A local fake of Bridge's API v3."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the fake aggregation API over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8990)
    serve.add_argument("--seed-demo", action="store_true", help="populate the demo users, items and accounts")
    serve.add_argument("--seed", type=int, default=0, help="seed of generated content")
    args = parser.parse_args(argv)

    world = World(
        client_id=os.environ.get("FAKE_BRIDGE_CLIENT_ID", "fake-client-id"),
        client_secret=os.environ.get("FAKE_BRIDGE_CLIENT_SECRET", "fake-client-secret"),
        seed=args.seed,
    )
    if args.seed_demo:
        seed_demo(world)
    print(
        f"fake Bridge API at http://{args.host}:{args.port}{PREFIX} (client id {world.client_id})", flush=True
    )
    uvicorn.run(create_app(world), host=args.host, port=args.port, lifespan="off", log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
