"""``bridgehook scheduler``: enqueues the reconciliation sweep on a fixed period, and exports
the global gauges (:mod:`workers.observe`) for Prometheus.

Run exactly one (a Deployment of 1). Should two run by mistake, they still enqueue one sweep
per period: the sweep's job id is the period's number, and RQ's unique enqueue writes a job only
when no job with its id exists, queued, running, done or failed (one Redis script, no window
between the check and the write).
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from prometheus_client import REGISTRY, start_http_server

from service.logs import get_logger
from service.settings import Settings
from workers import context
from workers.context import WorkerContext
from workers.observe import StatusCollector
from workers.replay import RECONCILE, Enqueuer

log = get_logger("bridgehook.scheduler")


def enqueue_sweep(enqueuer: Enqueuer, interval: int, now: float | None = None) -> str:
    """``queued``, or ``duplicate`` when this period's sweep was already enqueued (by us or another)."""
    slot = int((time.time() if now is None else now) // interval)
    event = {"type": "bridgehook.reconcile", "content": {"slot": slot}, "timestamp": slot * interval * 1000}
    return enqueuer.enqueue_once(f"reconcile-sweep-{slot}", RECONCILE, event)


def run_scheduler(settings: Settings, *, once: bool = False) -> None:
    """Enqueue sweeps until SIGTERM or SIGINT (with ``once``, one); refuses to start, as the workers
    do, on a schema that lacks migrations (:class:`workers.schema.SchemaNotReady`): its gauges read
    the tables."""
    ctx = WorkerContext.start(settings)
    context.configure(ctx)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("scheduler.stopping", signal=signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if settings.metrics_port and not once:
        REGISTRY.register(StatusCollector(ctx.settings, ctx.redis, ctx.storage))
        start_http_server(settings.metrics_port)
    enqueuer = Enqueuer(ctx.redis, settings)
    interval = settings.reconcile_interval_seconds
    log.info("scheduler.started", interval=interval, metrics_port=settings.metrics_port)
    try:
        while not stop.is_set():
            outcome = enqueue_sweep(enqueuer, interval)
            log.info("scheduler.sweep", outcome=outcome)
            if once:
                return
            stop.wait(interval - time.time() % interval + 0.5)
    finally:
        context.configure(None)
