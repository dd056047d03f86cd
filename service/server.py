"""How uvicorn runs the receiver, shared by ``bridgehook serve`` and the tests."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.settings import Settings


def uvicorn_config(settings: Settings, host: str = "0.0.0.0", port: int = 8000) -> uvicorn.Config:  # noqa: S104
    return uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        # We decide whom to trust (TRUSTED_PROXIES); uvicorn's default trusts 127.0.0.1.
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=25,
    )
