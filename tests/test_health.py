"""Probes and metrics."""

from __future__ import annotations

from starlette.testclient import TestClient

from tests.support import fixture_body, signed


def test_livez_and_readyz(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok"}


def test_metrics_expose_outcomes_latency_and_depth(client: TestClient) -> None:
    client.post("/webhooks/bridge", **signed(fixture_body("item.created")))
    client.post("/webhooks/bridge", content=b"{}")
    text = client.get("/metrics").text
    assert 'bridgehook_webhook_requests_total{outcome="queued"}' in text
    assert 'bridgehook_webhook_requests_total{outcome="missing_signature"}' in text
    assert "bridgehook_enqueue_seconds_bucket" in text
    assert 'bridgehook_queue_depth{queue="bridgehook"} 1.0' in text
    assert 'bridgehook_dead_letter_jobs{queue="bridgehook"} 0.0' in text
    assert "bridgehook_redis_up 1.0" in text
