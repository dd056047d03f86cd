"""The RQ job an event becomes: what the receiver and every replay command enqueue.

The job hash is RQ's own ``Job.to_dict()``, computed once as a template (:class:`JobTemplate`); per
event only the fields that vary (payload, times, description, meta) are built, the way RQ builds
them (a test holds the two equal for the installed RQ). The enqueueing script (service/queue.py)
copies the template to each new job and sets those fields. The payload is framed as a zlib stream
of stored blocks (:func:`stored_zlib`), which RQ reads as it reads its own: compressing a few
hundred bytes costs more than it saves, and a large body is framed around views of it, never copied.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from rq.job import Job, JobStatus, Retry
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from service.settings import Settings

JOB_TIMEOUT_SECONDS = 600
RESULT_TTL_SECONDS = 3600
FAILURE_TTL_SECONDS = 90 * 86400  # dead letters stay inspectable for a quarter
Piece = bytes | bytearray | memoryview
Value = Piece | tuple[Piece, ...]  # a value in pieces: a large job payload, framed around its body

# The job hash fields that differ from one event to the next; everything else is the template.
VARYING = ("data", "description", "meta", "created_at", "enqueued_at")


def build_job(
    connection: redis.Redis,
    settings: Settings,
    job_id: str,
    function: str,
    event: Mapping[str, Any],
    *,
    received_at_ms: int | None = None,
    replayed: bool = False,
    received_seq: int | None = None,
) -> Job:
    """An RQ job for one event, as the receiver and every replay command enqueue it.

    The retry schedule (``WORKER_RETRY_INTERVALS``) travels with the job: RQ's scheduler
    re-queues it, and RQ's abandoned-job cleanup honours it too when a worker dies mid-job.
    ``meta.received_at`` (ms) is when the webhook arrived, for the sync-lag metric;
    ``meta.received_seq``, the receiver's alone, its place in the order of receipt (see
    :data:`service.queue.RECEIVED_SEQ_KEY`): replays from the archive or the ledger and resyncs
    have none, so no earlier sync serves them (see workers.watermark).
    """
    intervals = list(settings.retry_intervals)
    return Job.create(
        function,
        args=[dict(event)],
        id=job_id,
        connection=connection,
        serializer=JSONSerializer,
        origin=settings.queue_name,
        timeout=JOB_TIMEOUT_SECONDS,
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=FAILURE_TTL_SECONDS,
        description=description(event, job_id),
        status=JobStatus.QUEUED,
        retry=Retry(max=len(intervals), interval=intervals) if intervals else None,
        meta={
            "received_at": received_at_ms or int(time.time() * 1000),
            "replayed": replayed,
            **({} if received_seq is None else {"received_seq": received_seq}),
        },
    )


def description(event: Mapping[str, Any], job_id: str) -> str:
    return f"{event.get('type')} {job_id[:12]}"


def _redis_text(value: Any) -> str:
    """What redis-py would write for the value (a str enum such as JobStatus writes its value)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value.encode().decode()
    return str(value)


class JobTemplate:
    """RQ's job hash for our events: the constant part computed once by RQ, the rest per event."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        probe = build_job(connection, settings, "template", "workers.jobs.item_created", {}, received_at_ms=1)
        probe.enqueued_at = rq_now()
        constant = {k: v for k, v in probe.to_dict().items() if k not in VARYING and v is not None}
        self.constant = {k: _redis_text(v) for k, v in constant.items()}
        self.json = json.dumps(self.constant)

    @staticmethod
    def varying(
        job_id: str,
        function: str,
        event: Mapping[str, Any],
        received_at: bytes,
        argument: Sequence[bytes] | None = None,
    ) -> tuple[Value, bytes, bytes]:
        """``data``, ``description`` and ``meta`` as ``Job.to_dict()`` writes them (``received_at``:
        milliseconds in decimal, as archived).

        RQ's JSONSerializer writes ``json.dumps((function, None, [event], {}))``; when the job's
        argument is given as JSON already (``argument``, in pieces: Bridge's raw body when it *is*
        the event, Powens's envelope around its raw body), it is spliced in as it came, which
        decodes to the same arguments without encoding the event again.
        """
        if argument is not None:
            data = stored_zlib(b'["' + function.encode() + b'", null, [', *argument, b"], {}]")
        else:
            data = stored_zlib(json.dumps((function, None, [dict(event)], {})).encode())
        meta = b'{"received_at": %s, "replayed": false}' % received_at
        return data, description(event, job_id).encode(), meta


def stored_zlib(*pieces: Piece) -> bytes | tuple[Piece, ...]:
    """The pieces, concatenated, as a zlib stream of stored (uncompressed) deflate blocks, as level 0
    writes it: one buffer for a payload of one block, the stream's pieces otherwise.

    RQ stores the payload as a zlib stream and reads it with ``zlib.decompress``, which takes
    any valid stream. For a few hundred bytes, compressing costs far more than it saves (the
    defaults some fifty microseconds); even a level-0 compressor's set-up costs more than
    framing the bytes here: a 2-byte header, blocks of at most 65,535 bytes each behind its
    length and the length's complement, and the Adler-32 checksum. A larger payload (a Powens
    body) is framed around views of its pieces: the stream is never assembled here, the queue
    hands its pieces to Redis as they are.
    """
    size = sum(map(len, pieces))
    checksum = 1
    if size <= 65535:  # one block: the usual event
        for piece in pieces:
            checksum = zlib.adler32(piece, checksum)
        header = 1 | size << 8 | (size ^ 0xFFFF) << 24
        return b"".join((b"\x78\x01", header.to_bytes(5, "little"), *pieces, checksum.to_bytes(4, "big")))
    blocks = -(-size // 65535)
    out: list[Piece] = [b"\x78\x01"]
    block = left = 0  # left: bytes of the current block still to come
    for piece in pieces:
        checksum = zlib.adler32(piece, checksum)
        view, done = memoryview(piece), 0
        while done < len(view):
            if not left:
                left = min(65535, size - block * 65535)
                block += 1
                out.append(((block == blocks) | left << 8 | (left ^ 0xFFFF) << 24).to_bytes(5, "little"))
            n = min(left, len(view) - done)
            out.append(view[done : done + n])
            done, left = done + n, left - n
    out.append(checksum.to_bytes(4, "big"))
    return tuple(out)
