"""``bridgehook worker``: an RQ worker, with RQ's scheduler so that retries fire.

A ``SimpleWorker`` runs jobs in this process instead of forking one per job, so the Bridge
client's HTTP connections and the database pool are reused from job to job; job timeouts
still apply (SIGALRM). RQ's warm shutdown applies too: on SIGTERM the current job finishes,
a second SIGTERM abandons it, and RQ's abandoned-job cleanup retries it on another worker.
"""

from __future__ import annotations

from prometheus_client import start_http_server
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from service.logs import get_logger
from service.settings import Settings
from workers import context, schema
from workers.context import WorkerContext

log = get_logger("bridgehook.worker")


class SchemaOutdated(Exception):
    pass


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None) -> bool:
    """Work until stopped (or, with ``burst``, until the queue is empty). True if jobs ran cleanly."""
    ctx = WorkerContext.build(settings)
    missing = schema.pending(ctx.storage.db)
    if missing:
        ctx.close()
        raise SchemaOutdated(f"the database lacks migrations {missing}: run `bridgehook db upgrade` first")
    context.configure(ctx)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)  # bridgehook_jobs_total, bridgehook_sync_lag_seconds
    try:
        queue = Queue(settings.queue_name, connection=ctx.redis, serializer=JSONSerializer)
        worker = SimpleWorker([queue], connection=ctx.redis, serializer=JSONSerializer, name=name)
        log.info("worker.started", queue=settings.queue_name, burst=burst, name=worker.name)
        return bool(worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level.upper()))
    finally:
        context.configure(None)
