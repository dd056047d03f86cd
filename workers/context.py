"""What one worker process holds for all its jobs: Redis, the database and the providers' clients.

Built once per process (so HTTP and database connections are reused across jobs) by
``bridgehook worker`` through :func:`configure`, or lazily from the environment the first
time a job runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import httpx
import redis

from service.sealing import Opener
from service.settings import Settings
from workers import schema
from workers.bridge import BridgeClient
from workers.codec import codec_from_settings
from workers.db import Database
from workers.ledger import Ledger
from workers.powens import PowensClient
from workers.powens_sync import PowensSync
from workers.sealed import opener_of
from workers.storage import Storage
from workers.sync import Syncer


@dataclass
class WorkerContext:
    settings: Settings
    redis: redis.Redis
    storage: Storage
    client: BridgeClient

    @classmethod
    def build(cls, settings: Settings, transport: httpx.BaseTransport | None = None) -> WorkerContext:
        settings.require("REDIS_URL", "BRIDGE_CLIENT_ID", "BRIDGE_CLIENT_SECRET", "ENCRYPTION_KEYS")
        assert settings.redis_url is not None
        codec = codec_from_settings(settings)
        connection = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        return cls(
            settings=settings,
            redis=connection,
            storage=Storage(Database.from_url(settings.database_url), codec),
            client=BridgeClient(
                settings,
                connection,
                transport=transport,
                max_attempts=settings.bridge_max_attempts,
                backoff_base=settings.bridge_backoff_ms / 1000,
                max_retry_after=settings.budget_max_wait_seconds,
            ),
        )

    @classmethod
    def start(cls, settings: Settings) -> WorkerContext:
        """:meth:`build` for a worker or scheduler that starts: :class:`workers.schema.SchemaNotReady`
        (the database lacks migrations this code needs) before it does anything, read-only."""
        ctx = cls.build(settings)
        try:
            schema.require_current(ctx.storage.db)
        except BaseException:
            ctx.close()
            raise
        return ctx

    @cached_property
    def opener(self) -> Opener | None:
        """What opens the Powens bodies the receiver sealed (workers.sealed); None without a key."""
        return opener_of(self.settings)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.storage.db, self.storage.codec)

    def syncer(self, heartbeat: object = None) -> Syncer:
        return Syncer(
            self.client,
            self.storage,
            overlap=timedelta(seconds=self.settings.sync_overlap_seconds),
            heartbeat=heartbeat if callable(heartbeat) else (lambda: None),
        )

    @cached_property
    def powens(self) -> PowensClient:
        """Powens's client, built on a Powens job's first use: a deployment without Powens needs
        none of its settings."""
        self.settings.require("POWENS_API_URL", "POWENS_CLIENT_ID", "POWENS_CLIENT_SECRET")
        return PowensClient(self.settings, self.redis)

    def powens_sync(self, heartbeat: object = None) -> PowensSync:
        return PowensSync(
            self.powens,
            self.storage,
            overlap=timedelta(seconds=self.settings.sync_overlap_seconds),
            heartbeat=heartbeat if callable(heartbeat) else (lambda: None),
        )

    def close(self) -> None:
        if "powens" in self.__dict__:
            self.powens.close()
        self.client.close()
        self.storage.db.close()
        self.redis.close()


_current: WorkerContext | None = None


def configure(context: WorkerContext | None) -> None:
    """Install the process's context (None closes and forgets the current one)."""
    global _current
    if _current is not None and _current is not context:
        _current.close()
    _current = context


def current() -> WorkerContext:
    global _current
    if _current is None:
        _current = WorkerContext.build(Settings.from_env())
    return _current
