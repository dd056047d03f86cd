"""Prometheus metrics of a worker process (served on ``METRICS_PORT`` by ``bridgehook worker``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

JOBS = Counter(
    "bridgehook_jobs",
    "Jobs run by this worker, by provider, event type and outcome.",
    ["provider", "type", "outcome"],
)
SYNC_LAG = Histogram(
    "bridgehook_sync_lag_seconds",
    "From the webhook's receipt to its rows committed (first runs, not replays), by provider.",
    ["provider"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
