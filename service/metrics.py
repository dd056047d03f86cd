"""Prometheus metrics of the receiver, and the ``/metrics`` endpoint.

Every answer of the webhook endpoints counts once in ``bridgehook_webhook_requests_total``
with its outcome (``queued``, ``duplicate``, ``ignored`` or the rejection's machine code) and its
provider (``bridge``, ``powens``),
so a spike of any one rejection reason is one PromQL query away.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

REQUESTS = Counter(
    "bridgehook_webhook_requests",
    "Webhook deliveries answered, by outcome (queued, duplicate, ignored or a rejection) and provider.",
    ["outcome", "provider"],
)
ENQUEUE_SECONDS = Histogram(
    "bridgehook_enqueue_seconds",
    "Time of each atomic dedupe + enqueue + archive round trip to Redis (one per batch of deliveries).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
BATCH_SIZE = Histogram(
    "bridgehook_enqueue_batch_size",
    "Deliveries sharing one script call to Redis (micro-batching under load).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 200),
)
QUEUE_DEPTH = Gauge("bridgehook_queue_depth", "Jobs waiting in the RQ queue, read at scrape time.", ["queue"])
DEAD_LETTERS = Gauge(
    "bridgehook_dead_letter_jobs", "Jobs in RQ's failed-job registry (the dead-letter queue).", ["queue"]
)
REDIS_UP = Gauge("bridgehook_redis_up", "1 if Redis answered the last scrape, 0 otherwise.")


async def metrics_endpoint(request: Request) -> Response:
    queue = request.app.state.queue
    name = request.app.state.settings.queue_name
    try:
        QUEUE_DEPTH.labels(name).set(await queue.depth())
        DEAD_LETTERS.labels(name).set(await queue.dead_letters())
        REDIS_UP.set(1)
    except Exception:  # a scrape must answer even when Redis does not
        REDIS_UP.set(0)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
