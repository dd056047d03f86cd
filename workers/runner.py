"""``bridgehook worker``: an RQ worker, with RQ's scheduler so that retries fire.

A ``SimpleWorker`` runs jobs in this process instead of forking one per job, so the Bridge
client's HTTP connections and the database pool are reused from job to job; job timeouts
still apply (SIGALRM). RQ's warm shutdown applies too: on SIGTERM the current job finishes,
a second SIGTERM abandons it, and RQ's abandoned-job cleanup retries it on another worker.

What :class:`Worker` adds to ``SimpleWorker``: heartbeats while a job runs, and fewer round trips
for the worker's own heartbeat between jobs (see :meth:`Worker.heartbeat`). RQ's forking worker
sends them from its monitoring loop; ``SimpleWorker`` has none, so it registers each job as
started for the job's whole timeout (10 minutes), and a worker killed mid-job leaves its job
unclaimed for that long plus RQ's 10-minute maintenance period. Here a thread renews the job's
lease every ``HEARTBEAT_SECONDS`` for ``HEARTBEAT_SECONDS + 60`` seconds, and maintenance runs
every ``MAINTENANCE_SECONDS``: a killed worker's job is requeued (with one retry fewer) about two
minutes later.

Both stop without waiting for their pub/sub thread (see :class:`PlainWorker`), which RQ's own
shutdown may do for a minute.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import redis
from prometheus_client import start_http_server
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.job_lifecycle import call_exception_handlers
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker

from service.logs import get_logger
from service.settings import Settings
from workers import context
from workers.context import WorkerContext
from workers.errors import TransientError
from workers.jobs import ItemBusy

log = get_logger("bridgehook.worker")
SCHEDULER_RETRY_SECONDS = 10
HEARTBEAT_SECONDS = 10
MAINTENANCE_SECONDS = 60
# A sync's rows hold no cycles (reference counting frees them), so collecting every 700 allocations, as
# CPython does, only holds the lock its fetching and writing threads share (see docs/performance.md).
GC_YOUNGEST_THRESHOLD = 10_000
PUBSUB_STOP_SECONDS = 1.0  # how long a stopping worker waits for its pub/sub thread (as RQ meant to)


# Conditions we expect and retry (a bank down: 1003, -2, -3; a spent budget; 5xx, timeouts; an item
# another job holds): the job's own warning line says when it runs again, and a traceback says nothing.
EXPECTED: tuple[type[Exception], ...] = (TransientError, ItemBusy)


class PlainWorker(SimpleWorker):
    """RQ's ``SimpleWorker``, whose shutdown does not wait up to a minute for its pub/sub thread.

    The thread (RQ's, for `rq` commands sent to the worker) reads its channel a minute at a time.
    RQ stops it by unsubscribing, whose reply wakes it, and then clearing its running flag: if the
    thread reads the reply first, it finds the flag still set and, subscribed to nothing now, waits
    a minute to be subscribed again; and redis-py's ``stop()``, unlike before, joins it without a
    bound. Both a loaded worker's exit and every ``--burst`` run (the tests' drains) would take a
    minute more, now and then. Here the flag is cleared first, so the reply ends the thread, and the
    wait for it is bounded anyway."""

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """RQ logs every exception a job raises as an error with its traceback; an expected one that
        will be retried is left to the job's own warning (workers.jobs._failed), as the issue #17 logs
        showed 27 lines of traceback per retry of a bank that is down. The unexpected, and a last
        failure (a dead letter), are still logged by RQ; its exception handlers run either way, and
        RQ's failure handling (the retry, the failed-job registry with the traceback) is unchanged."""
        if isinstance(exc_info[1], EXPECTED) and job.should_retry:
            call_exception_handlers(self._exc_handlers, job, *exc_info)
            return
        super().handle_exception(job, *exc_info)

    def unsubscribe(self) -> None:
        thread = self.pubsub_thread
        if not thread:
            return
        self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
        # redis-py's run-loop flag (a threading.Event); stop() both clears it and joins the thread
        running = getattr(thread, "_running", None)
        if running is not None:
            running.clear()
        try:
            self.pubsub.unsubscribe()
        except redis.RedisError as exc:  # the thread's connection is gone: nothing to wake
            log.warning("worker.unsubscribe_failed", error=str(exc))
        thread.join(timeout=PUBSUB_STOP_SECONDS)
        self.pubsub.close()


class Worker(PlainWorker):
    """RQ's ``SimpleWorker`` with heartbeats during jobs (see the module's docstring)."""

    log_result_lifespan = False  # RQ's log line per job saying how long results are kept
    _renewed_at: float | None = None  # when the worker's key last got the default lease
    _scheduler_tried_at = -float("inf")  # when this worker last tried to take over RQ's scheduler

    @property
    def dequeue_timeout(self) -> int:
        """Idle, the worker looks up every few seconds (RQ's default: 405 s) and, in its heartbeat,
        whether RQ's scheduler needs taking over (:meth:`_take_over_scheduler`)."""
        return SCHEDULER_RETRY_SECONDS

    def _take_over_scheduler(self) -> None:
        """RQ's scheduler (it moves retries and deferrals to the queue when they are due) runs in one
        worker, under a lock of 61 s that RQ tries to take only at maintenance, every 60 s here: after
        the worker that held it dies, every due retry, budget deferral and step aside would wait up
        to two minutes. Here a worker without it tries every ``SCHEDULER_RETRY_SECONDS``, so that
        one takes over as soon as the lock lapses."""
        scheduler = self.scheduler
        process = scheduler._process if scheduler is not None else None
        if scheduler is None or (process is not None and process.is_alive()):
            return
        if time.monotonic() - self._scheduler_tried_at < SCHEDULER_RETRY_SECONDS:
            return
        self._scheduler_tried_at = time.monotonic()
        try:
            scheduler.acquire_locks(auto_start=True)  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            log.warning("worker.scheduler_lock_failed", error=str(exc))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("maintenance_interval", MAINTENANCE_SECONDS)
        kwargs.setdefault("job_monitoring_interval", HEARTBEAT_SECONDS)
        super().__init__(*args, **kwargs)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return int(BaseWorker.get_heartbeat_ttl(self, job, working_time))  # the forking worker's lease

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ renews the worker's key (three commands, a round trip each) before and after every job,
        for worker_ttl + 60 s (8 minutes): about a third of its own cost per short job. Here the three
        go in one round trip, and a renewal for that default lease less than a second after the last
        one is skipped, unless a shorter lease (RQ sets one for each job) was set since."""
        if timeout is None and pipeline is None:  # the idle loop's beat (and before and after a job)
            self._take_over_scheduler()
        if timeout is not None:
            self._renewed_at = None  # a shorter lease stands: the next default one goes out
        elif self._renewed_at is not None and time.monotonic() - self._renewed_at < 1:
            return
        else:
            self._renewed_at = time.monotonic()
        if pipeline is not None:
            BaseWorker.heartbeat(self, timeout, pipeline)
            return
        with self.connection.pipeline(transaction=False) as batch:
            BaseWorker.heartbeat(self, timeout, batch)
            batch.execute()

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        beats = threading.Thread(
            target=self._beat, args=(job, execution, done), name="rq-heartbeat", daemon=True
        )
        beats.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beats.join()
        # (SimpleWorker sets the state to idle here; the dequeue that follows does it anyway.)

    def _beat(self, job: Job, execution: Execution, done: threading.Event) -> None:
        while not done.wait(self.job_monitoring_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except redis.RedisError as exc:  # the job itself will meet the outage; keep beating
                log.warning("worker.heartbeat_failed", error=str(exc))


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None) -> bool:
    """Work until stopped (or, with ``burst``, until the queue is empty). True if jobs ran cleanly."""
    ctx = WorkerContext.start(settings)
    context.configure(ctx)
    gc.set_threshold(GC_YOUNGEST_THRESHOLD, *gc.get_threshold()[1:])
    if settings.metrics_port:
        start_http_server(settings.metrics_port)  # bridgehook_jobs_total, bridgehook_sync_lag_seconds
    try:
        queue = Queue(settings.queue_name, connection=ctx.redis, serializer=JSONSerializer)
        worker = Worker([queue], connection=ctx.redis, serializer=JSONSerializer, name=name)
        log.info("worker.started", queue=settings.queue_name, burst=burst, name=worker.name)
        return bool(worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level.upper()))
    finally:
        context.configure(None)
