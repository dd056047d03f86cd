"""Benchmark 5: Bridge's request budget, against Bridge's latency and limits.

  python -m benchmarks.budget [--latency-ms 120] [--jitter-ms 40] [--workers 2] [--users 60]

At scale the scarce resource is Bridge's request budget, not our CPU. The fake Bridge
(`benchmarks/budget_fake.py`, its own process) answers every call after 120 ± 40 ms and enforces a
budget per application and per user (Bridge's documented ones scaled down so that the run lasts about
a minute), answering 429 + Retry-After beyond them. The receiver (`bridgehook serve`), `--workers`
worker processes, Redis (REDIS_URL, else a private valkey) and PostgreSQL (a fresh schema) run as in
production, the workers' own limiter set a little under the fake's budgets.

The items are first synced whole (no latency, no budgets). Then refreshes happen at the fake, each
sending what Bridge would (item.refreshed, an item.account.updated per account, some of which only
changed the balance, now and then an item.account.created or a status change to 402), posted signed
to the receiver, a few of them twice. Two phases: a backlog (more refreshes at once than the budget
serves in half a minute), then a steady rate. Checked (exit 1 when one is missed):

- Bridge calls per refresh, against the minimum the changes need (the fake's ground truth: a
  transactions page per account whose transactions changed, an account call for an account no event
  describes, a token per user per two hours): at most 1.3 times;
- 429s answered by the fake: 0;
- the application budget used during the backlog (whole windows from its first call): ≥ 90 %;
- nothing lost (every queued event done), tables equal to the fake's truth.

Reported: calls by kind, calls in flight (per worker process), receipt → rows lag in the steady phase.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from benchmarks.common import ROOT, machine, pg_schema, redis_url, stop, table, verdict
from benchmarks.receiver import free_port, percentile, wait_http
from fakebridge.sender import signature_header, webhook_body

SECRET = "benchmark-webhook-secret-0123456789"  # noqa: S105 (a throwaway secret for loopback)
TARGET_RATIO, TARGET_USE = 1.3, 0.90


class Bench:
    """The processes of one run and what they share."""

    def __init__(self, args: argparse.Namespace, redis_url: str, database_url: str) -> None:
        self.args, self.redis, self.database_url = args, redis_url, database_url
        self.procs: list[subprocess.Popen[bytes]] = []
        self.fake_port, self.port = free_port(), free_port()
        self.fake = httpx.Client(base_url=f"http://127.0.0.1:{self.fake_port}", timeout=60)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        self.queue = f"bench-budget-{os.getpid()}"
        self.queued: list[str] = []
        # When the receiver queued each event: the ledger's received_at is when the attempt that wrote it
        # was queued, later than the receipt for an event that stepped aside first (SYNC_COALESCE_SECONDS).
        self.received: dict[str, float] = {}
        self.logs = Path(tempfile.mkdtemp(prefix="bench-budget-"))

    def env(self, limited: bool) -> dict[str, str]:
        a = self.args
        app, user = (
            f"{math.floor(n * m)}/{s}"
            for (n, s), m in ((a.app_budget, a.margin), (a.user_budget, a.user_margin))
        )
        inherited = ("BRIDGE_", "SYNC_", "RQ_", "ENCRYPTION_KEYS", "ALLOW_PLAINTEXT_STORAGE")
        return {k: v for k, v in os.environ.items() if not k.startswith(inherited)} | {
            "REDIS_URL": self.redis, "DATABASE_URL": self.database_url, "RQ_QUEUE": self.queue,
            "BRIDGE_WEBHOOK_SECRETS": SECRET, "BRIDGE_ALLOWED_IPS": "127.0.0.1",
            "BRIDGE_API_URL": f"http://127.0.0.1:{self.fake_port}/v3/aggregation",
            "BRIDGE_CLIENT_ID": "fake-client-id", "BRIDGE_CLIENT_SECRET": "fake-client-secret",
            "BRIDGE_RATE_LIMIT_APP": app if limited else "1000000/60",
            "BRIDGE_RATE_LIMIT_USER": user if limited else "1000000/60",
            "BRIDGE_RATE_LIMIT_TOKEN": "10/60" if limited else "1000000/60",
            "METRICS_PORT": "0", "LOG_LEVEL": "warning", "ALLOW_PLAINTEXT_STORAGE": "1",
            "SYNC_COALESCE_SECONDS": str(a.coalesce_seconds if limited else 0),
        }  # fmt: skip

    def start(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        # Each process's stderr in a file of its own, to read when a run fails.
        log = (self.logs / f"{'-'.join(argv[1:3])}-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stderr=log)
        log.close()
        self.procs.append(proc)
        return proc

    def workers(self, limited: bool) -> list[subprocess.Popen[bytes]]:
        env = self.env(limited)
        return [self.start("-m", "bridgehook", "worker", env=env) for _ in range(self.args.workers)]

    def post(self, event: dict[str, Any], times: int = 1) -> None:
        body = webhook_body(event["type"], event["content"], event["timestamp"])
        headers = {
            "Content-Type": "application/json",
            "BridgeApi-Signature": signature_header(body, [SECRET]),
        }
        for _ in range(times):
            answer = self.http.post("/webhooks/bridge", content=body, headers=headers)
            answer.raise_for_status()
            if answer.json()["status"] == "queued":
                self.queued.append(answer.json()["event_id"])
                self.received.setdefault(answer.json()["event_id"], time.time())

    def drain(self, db: psycopg.Connection[Any], ids: list[str], timeout: float) -> float:
        """Wait until every event of ``ids`` is processed; the time it happened (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = db.execute("SELECT count(*) FROM webhook_events WHERE status = 'done' AND id = ANY(%s)",
                             (ids,)).fetchone()  # fmt: skip
            if row is not None and row[0] >= len(ids):
                return time.monotonic()
            time.sleep(0.2)
        raise SystemExit(f"FAIL: events still unprocessed {timeout:.0f} s after the phase; see {self.logs}")


def run(bench: Bench) -> dict[str, Any]:
    a = bench.args
    bench.start("-m", "benchmarks.budget_fake", "--port", str(bench.fake_port), "--users", str(a.users))
    wait_http(f"http://127.0.0.1:{bench.fake_port}/_bench/plan", bench.procs[-1], timeout=120)
    plan = bench.fake.get("/_bench/plan").json()
    subprocess.run([sys.executable, "-m", "bridgehook", "db", "upgrade"], env=bench.env(False), cwd=ROOT,
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    bench.start(
        "-m", "bridgehook", "serve", "--host", "127.0.0.1", "--port", str(bench.port), env=bench.env(False)
    )
    wait_http(f"http://127.0.0.1:{bench.port}/livez", bench.procs[-1])
    db = psycopg.connect(bench.database_url, autocommit=True)
    # Setup: every item synced whole, no latency, no budgets; then tokens and budgets start afresh.
    setup = bench.workers(limited=False)
    now = int(time.time() * 1000)  # (a body seen before, in an earlier run on this Redis, is a duplicate)
    for n, p in enumerate(plan):
        bench.post({"type": "item.created", "content": p, "timestamp": now + n})
    if len(bench.queued) != len(plan):
        raise SystemExit(f"FAIL: {len(plan) - len(bench.queued)} item.created not queued")
    bench.drain(db, bench.queued, 120)
    stop(setup)
    connection = redis.Redis.from_url(bench.redis)
    for pattern in ("bridgehook:token*", "bridgehook:rate:*"):
        for key in connection.scan_iter(pattern):
            connection.delete(key)
    bench.fake.post("/_bench/configure", json={
        "latency_ms": a.latency_ms, "jitter_ms": a.jitter_ms, "app": a.app_budget, "user": a.user_budget,
        "token": [10, 60],
    }).raise_for_status()  # fmt: skip
    bench.workers(limited=True)
    rng = random.Random(a.seed)  # noqa: S311 (a reproducible load)
    minimum: Counter[str] = Counter()
    users: set[str] = set()
    started = time.monotonic()

    def refresh_and_post() -> None:
        p = rng.choice(plan)
        answer = bench.fake.post("/_bench/refresh", json={"item_id": p["item_id"]}).json()
        minimum.update(answer["minimum"])
        minimum["refreshes"] += 1
        users.add(p["user_uuid"])
        for event in answer["events"]:
            bench.post(event, 2 if rng.random() < 0.05 else 1)

    for _ in range(a.backlog):
        refresh_and_post()
    backlog_ids = list(bench.queued[len(plan) :])
    backlog_end = bench.drain(db, backlog_ids, 300)
    backlog_busy = bench.fake.get("/_bench/requests").json()["busy"]  # seconds of calls in flight so far
    steady_from = len(bench.queued)
    steady_start = time.monotonic()
    for n in range(int(a.steady_rate * a.steady_seconds)):
        time.sleep(max(0.0, steady_start + n / a.steady_rate - time.monotonic()))
        refresh_and_post()
    steady_ids = bench.queued[steady_from:]
    bench.drain(db, steady_ids, 120)
    ended = time.monotonic()
    rows = db.execute("SELECT id, EXTRACT(EPOCH FROM processed_at) FROM webhook_events WHERE id = ANY(%s)",
                      (steady_ids,)).fetchall()  # fmt: skip
    done = db.execute("SELECT count(*) FROM webhook_events WHERE id = ANY(%s) AND status = 'done'",
                      (bench.queued,)).fetchone()  # fmt: skip
    tables: dict[str, dict[Any, Any]] = {
        "items": dict(db.execute("SELECT id, status FROM items WHERE deleted_at IS NULL").fetchall()),
        "accounts": {k: (item, str(v)) for k, item, v in db.execute(
            "SELECT id, item_id, balance FROM accounts WHERE deleted_at IS NULL").fetchall()},
        "transactions": {k: (account, str(v)) for k, account, v in db.execute(
            "SELECT id, account_id, amount FROM transactions WHERE deleted_at IS NULL").fetchall()},
    }  # fmt: skip
    db.close()
    requests = bench.fake.get("/_bench/requests").json()
    truth = json.loads(bench.fake.get("/_bench/truth").text, parse_float=Decimal)
    # As tests/test_model.py compares: the data of an item in a status other than 0 is not fetched
    # (a refresh that came before the 402 in a backlog is read once the user has repaired the item),
    # so its accounts and their transactions are left out on both sides.
    waiting = {int(k) for k, v in truth["items"].items() if v["status"] != 0}
    accounts = {int(k): v for k, v in truth["accounts"].items() if v["item_id"] not in waiting}
    expected = {
        "items": {int(k): v["status"] for k, v in truth["items"].items()},
        "accounts": {k: str(v["balance"]) for k, v in accounts.items()},
        "transactions": {int(k): str(v["amount"]) for k, v in truth["transactions"].items()
                         if not v.get("deleted") and v["account_id"] in accounts},
    }  # fmt: skip
    tables["accounts"] = {k: v[1] for k, v in tables["accounts"].items() if v[0] not in waiting}
    tables["transactions"] = {
        k: v[1] for k, v in tables["transactions"].items() if v[0] in tables["accounts"]
    }
    wrong = {k: sorted(i for i in {*tables[k], *expected[k]} if tables[k].get(i) != expected[k].get(i))
             for k in tables}  # fmt: skip
    for k, ids in wrong.items():  # a sample, to start from when a run fails
        for i in ids[:3]:
            print(f"{k} {i}: ours {tables[k].get(i)}, Bridge's {expected[k].get(i)}")
    return {
        "requests": requests, "minimum": minimum, "users": len(users), "started": started,
        "backlog_end": backlog_end, "backlog_busy": backlog_busy, "ended": ended,
        "lags": [float(done_at) - bench.received[i] for i, done_at in rows if done_at is not None],
        "lost": len(set(bench.queued)) - (done or (0,))[0], "queued": len(bench.queued),
        "right": tables == expected, "wrong": {k: len(ids) for k, ids in wrong.items()},
    }  # fmt: skip


def kind(method: str, path: str) -> str:
    tail = path.split("/v3/aggregation", 1)[-1]
    if tail.startswith("/authorization"):
        return "token"
    if tail.startswith("/items/"):
        return "item"
    if tail.startswith("/accounts/"):
        return "account"
    return {"/accounts": "accounts listing", "/transactions": "transactions page"}.get(tail, tail)


def report(args: argparse.Namespace, r: dict[str, Any]) -> bool:
    log = [(kind(m, p), status, t) for m, p, status, t in r["requests"]["log"]]
    answered = [(k, t) for k, status, t in log if status != 429]
    refused = sum(1 for _, status, _ in log if status == 429)
    calls = Counter(k for k, _ in answered)
    m, refreshes = r["minimum"], r["minimum"]["refreshes"]
    least = {"token": r["users"], "item": 0, "accounts listing": 0, "account": m["accounts"],
             "transactions page": m["pages"]}  # fmt: skip
    total, floor = sum(calls.values()), sum(least.values())
    ratio = total / floor
    n_app, s_app = args.app_budget
    times = [t for _, t in answered if r["started"] <= t < r["backlog_end"]]
    first = min(times, default=r["started"])
    use, in_windows, windows = budget_use(times, first, r["backlog_end"], args.app_budget)
    from_start, _, _ = budget_use(times, r["started"], r["backlog_end"], args.app_budget)
    inflight = r["backlog_busy"] / (r["backlog_end"] - r["started"])
    p50, p99 = (percentile(r["lags"], q) * 1000 for q in (0.5, 0.99)) if r["lags"] else (math.nan, math.nan)
    print(f"machine: {machine()}")
    print(f"latency {args.latency_ms} ± {args.jitter_ms} ms; budgets app {n_app}/{s_app} s, user "
          f"{args.user_budget[0]}/{args.user_budget[1]} s (ours: {args.margin:.0%}, {args.user_margin:.0%}); "
          f"{args.workers} worker processes, SYNC_COALESCE_SECONDS={args.coalesce_seconds}; "
          f"{refreshes} refreshes of {args.users} users' items, "
          f"{r['queued']} events queued")  # fmt: skip
    rows = [[k, calls.get(k, 0), least.get(k, 0), f"{calls.get(k, 0) / refreshes:.2f}"]
            for k in ("token", "item", "accounts listing", "account", "transactions page")]  # fmt: skip
    rows += [[k, v, 0, f"{v / refreshes:.2f}"] for k, v in calls.items() if k not in least]
    rows.append(["total", total, floor, f"{total / refreshes:.2f}"])
    print(table(["Bridge calls", "made", "minimum", "per refresh"], rows))
    print(f"(one transactions listing per user instead of per account would need {m['user_pages']} pages)")
    checks = [
        ("calls per refresh / minimum", f"{total / refreshes:.2f} / {floor / refreshes:.2f} = {ratio:.2f}",
         f"≤ {TARGET_RATIO}", ratio <= TARGET_RATIO),
        ("429s answered by Bridge", f"{refused} {r['requests']['refused']}", "0", refused == 0),
        ("app budget used in the backlog", f"{use:.0%} ({in_windows} in {windows} windows of {n_app} from "
         f"its first call, +{first - r['started']:.1f} s; {from_start:.0%} from the phase's start)",
         f"≥ {TARGET_USE:.0%}", use >= TARGET_USE),
        ("calls in flight per worker, backlog", f"{inflight / args.workers:.2f} (fake's peak "
         f"{r['requests']['peak']})", "(report)", True),
        ("steady phase receipt → rows", f"p50 {p50:.0f} ms, p99 {p99:.0f} ms", "(report)", True),
        ("events lost (queued, not done)", r["lost"], "0", r["lost"] == 0),
        ("tables equal to the fake's truth", f"{r['right']} (rows differing {r['wrong']})", "True",
         r["right"]),
    ]  # fmt: skip
    print(table(["check", "measured", "target", ""], [[*c[:3], verdict(c[3]) if c[2] != "(report)" else ""]
                                                    for c in checks]))  # fmt: skip
    return all(c[3] for c in checks)


def budget_use(
    times: list[float], start: float, end: float, budget: tuple[int, int]
) -> tuple[float, int, int]:
    """The share of ``budget`` (N calls per S seconds) the calls at ``times`` used over the whole
    windows from ``start`` until ``end``; the calls and windows counted. Bridge's budget is a sliding
    window: k windows from any start allow k·N and no more.

    The backlog's windows begin at its first call, not when the benchmark begins to post it: until
    then the phase has not begun (the benchmark posts its refreshes one by one, and each event, younger
    than SYNC_COALESCE_SECONDS, steps aside for that long, as a real backlog's old events do not). Our
    limiter spends each window's share in a burst at the workers' pace, and the next burst begins as
    the first calls of this one leave the window: windows counted from the phase's start cut the
    bursts where those first seconds place them (docs/performance.md, budget use from the first call)."""
    n, seconds = budget
    windows = int((end - start) // seconds)
    counted = sum(1 for t in times if start <= t < start + windows * seconds)
    return (counted / (windows * n) if windows else 0.0), counted, windows


def budget(text: str) -> tuple[int, int]:
    count, _, seconds = text.partition("/")
    return int(count), int(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=int, default=120)
    parser.add_argument("--jitter-ms", type=int, default=40)
    # Bridge's 2,000 per 5 minutes and 60 a minute per user, scaled down: a 6-second window, the
    # application's budget 10 calls a second, a user's half a sync of 5 accounts' share of it as at Bridge.
    parser.add_argument("--app-budget", type=budget, default=(60, 6), help="N/S: requests per seconds")
    parser.add_argument("--user-budget", type=budget, default=(30, 6), help="N/S, per user")
    # Our limiter counts a call when it leaves, Bridge when it arrives, 80 to 160 ms later: a user's
    # calls, several in flight at once, need a wider margin than the application's many.
    parser.add_argument("--margin", type=float, default=0.95, help="our limiter's share of the app budget")
    parser.add_argument("--user-margin", type=float, default=0.8, help="our limiter's share of a user's")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--coalesce-seconds", type=int, default=1, help="the workers' SYNC_COALESCE_SECONDS")
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--backlog", type=int, default=60, help="refreshes at once")
    parser.add_argument("--steady-rate", type=float, default=1.0, help="refreshes per second")
    parser.add_argument("--steady-seconds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with redis_url() as url, pg_schema() as database_url:
        bench = Bench(args, url, database_url)
        try:
            ok = report(args, run(bench))
        finally:
            stop(bench.procs)
    if ok:
        shutil.rmtree(bench.logs, ignore_errors=True)
    print("PASS" if ok else f"FAIL (the processes' stderr: {bench.logs})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
