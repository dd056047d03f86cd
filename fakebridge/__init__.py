"""A local fake of Bridge's v3 aggregation API (Starlette over uvicorn) and a webhook sender.

Standalone: it never imports the service, the workers or the CLI.

    world = World(); seed_demo(world)
    with FakeBridgeServer(world) as server:      # server.api_url == "http://127.0.0.1:<port>/v3/aggregation"
        ...
    WebhookSender(receiver_url, secret).send(*world.event_item_created(4568477))

The fake Powens lives beside it (``fakebridge.powens``, ``fakebridge.powens_world``): a PowensWorld
served by FakePowensServer at ``/2.0``, and PowensSender for its signed (optionally gzipped) webhooks.
"""

from fakebridge.app import create_app
from fakebridge.sender import WebhookSender, sign, webhook_body
from fakebridge.server import FakeBridgeServer
from fakebridge.world import Budgets, Fault, Faults, Refusal, RequestRecord, World, seed_demo

__all__ = [
    "Budgets",
    "FakeBridgeServer",
    "Fault",
    "Faults",
    "Refusal",
    "RequestRecord",
    "WebhookSender",
    "World",
    "create_app",
    "seed_demo",
    "sign",
    "webhook_body",
]
