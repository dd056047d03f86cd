"""Benchmark 6: what Powens's largest deliveries cost the receiver, in memory and in 503s.

  python -m benchmarks.powens_bodies [--size-mb 8.1] [--deliveries 1 4 8 16] [--gzip] [--clear]

Powens's CONNECTION_SYNCED carries a connection's accounts and their new transactions: on a first
sync, bodies near ``POWENS_WEBHOOK_MAX_BODY_BYTES`` (8 MiB). For each count of deliveries, a fresh
``bridgehook serve`` (uvicorn, uvloop, httptools, as in production) and a private valkey-server
(AOF on), on loopback: its resident set at rest, then that many distinct signed deliveries of the
size asked, all at once (one thread and connection each, released together), and the process's
peak resident set (VmHWM, which the kernel keeps: nothing between two polls escapes it). The body
is the fake Powens's own CONNECTION_SYNCED (fakebridge/powens_world.py), its transactions
multiplied until it reaches the size; each delivery has its own ``id_webhook_data``. The receiver
seals the bodies (``BODY_SEAL_PUBLIC_KEY``, as production requires), unless ``--clear``.

Targets: every delivery answered 200 ``queued``, each of them in the queue (a 200 means in Redis);
one delivery's peak above rest at most ``--max-one-mb`` (64 MB). Exit status 1 when one is missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import redis

from benchmarks.common import ROOT, _hwm_kib, machine, table, verdict
from benchmarks.receiver import free_port, wait_http
from bridgehook.devenv import embedded_redis
from fakebridge.powens import PowensSender
from fakebridge.powens_world import PowensWorld
from fakebridge.world import render_json
from service.sealing import generate_pair

SECRET = "benchmark-powens-secret-0123456789"  # noqa: S105 (a throwaway secret for loopback)
BRIDGE_SECRET = "benchmark-bridge-secret-0123456789"  # noqa: S105 (required by serve, unused)
QUEUE = "bridgehook-bench-powens"


def body_of(size: int) -> bytes:
    """A CONNECTION_SYNCED body of about ``size`` bytes, without its ``id_webhook_data`` (added per
    delivery): the fake's connection of two enabled accounts, their transactions repeated."""
    world = PowensWorld(seed=11)
    user = world.add_user()
    connection = world.add_connection(user.id, accounts=2, transactions=200)
    for account in list(world.accounts.values()):
        world.enable_account(account.id)
    sample = world.connection_synced(connection.id)
    del sample["id_webhook_data"]
    accounts = sample["connection"]["accounts"]
    rows = [t for a in accounts for t in a["transactions"]]
    per_row = len(render_json(rows)) / len(rows)
    wanted = max(1, int(size / per_row / len(accounts)))
    for account in accounts:
        own = account["transactions"]
        account["transactions"] = [
            {**own[n % len(own)], "id": account["id"] * 1_000_000 + n} for n in range(wanted)
        ]
    return render_json(sample).encode()


def rss_kib(pid: int, field: str = "VmRSS:") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class Result(NamedTuple):
    rest: float  # MB
    peak: float
    after: float
    answers: list[tuple[int, str, float, str]]  # status, outcome or error, seconds, event id
    errors: list[str]  # the receiver's rejection lines


def scenario(env: dict[str, str], base: bytes, count: int, compress: bool, first_id: int) -> Result:
    """One fresh receiver, ``count`` deliveries at once; its rest and peak RSS and the answers."""
    port, admin = free_port(), free_port()
    command = [sys.executable, "-m", "bridgehook", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, env={**env, "ADMIN_PORT": str(admin)}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    answers: list[tuple[int, str, float, str]] = []
    try:
        wait_http(f"http://127.0.0.1:{admin}/livez", proc)
        time.sleep(1.0)
        rest = rss_kib(proc.pid)
        bodies = [base[:-1] + b',"id_webhook_data":%d}' % (first_id + n) for n in range(count)]
        gate = threading.Barrier(count)
        lock = threading.Lock()

        def deliver(body: bytes) -> None:
            with httpx.Client(timeout=120) as client:
                sender = PowensSender(f"http://127.0.0.1:{port}", SECRET, client)
                gate.wait()
                started = time.monotonic()
                response = sender.send("CONNECTION_SYNCED", body, compress=compress)
                seconds = time.monotonic() - started
                answer = response.json()
                outcome = answer.get("status") or answer.get("error")
                with lock:
                    answers.append((response.status_code, str(outcome), seconds, str(answer.get("event_id"))))

        threads = [threading.Thread(target=deliver, args=(b,)) for b in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        peak = _hwm_kib(proc.pid)
        time.sleep(0.5)
        after = rss_kib(proc.pid)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    errors = sorted({line for line in stderr.decode(errors="replace").splitlines() if "rejected" in line})
    return Result(rest / 1024, peak / 1024, after / 1024, answers, errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=8.1, help="each body, in MB (10^6 bytes)")
    parser.add_argument("--deliveries", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--gzip", action="store_true", help="send the bodies gzipped")
    parser.add_argument(
        "--max-one-mb", type=float, default=64.0, help="target: one delivery's peak above rest"
    )
    parser.add_argument("--clear", action="store_true", help="bodies not sealed (ALLOW_PLAINTEXT_STORAGE)")
    args = parser.parse_args()

    base = body_of(int(args.size_mb * 1_000_000))
    print(f"machine: {machine()}")
    print(f"body: CONNECTION_SYNCED of {len(base) / 1e6:.2f} MB{', gzipped' if args.gzip else ''}")
    rows: list[list[object]] = []
    ok = True
    one_above: float | None = None
    with tempfile.TemporaryDirectory(prefix="bench-powens-") as work, embedded_redis(Path(work)) as url:
        r = redis.Redis.from_url(url)
        env = {**os.environ, "REDIS_URL": url, "RQ_QUEUE": QUEUE, "POWENS_WEBHOOK_SECRETS": SECRET,
               "BRIDGE_WEBHOOK_SECRETS": BRIDGE_SECRET, "LOG_LEVEL": "info"}  # fmt: skip
        if args.clear:  # bodies in Redis as they came (the cost of sealing, by difference)
            env["ALLOW_PLAINTEXT_STORAGE"] = "1"
        else:  # as production runs: the bodies sealed (service/sealing.py)
            env["BODY_SEAL_PUBLIC_KEY"] = generate_pair()[1]
        for n, count in enumerate(args.deliveries):
            r.flushall()
            result = scenario(env, base, count, args.gzip, 7_000_000 + n * 1000)
            answers = result.answers
            queued = [a for a in answers if a[0] == 200 and a[1] == "queued"]
            in_queue = {v.decode() for v in r.lrange(f"rq:queue:{QUEUE}", 0, -1)}  # type: ignore[union-attr]
            all_in = {a[3] for a in queued} <= in_queue
            kinds = sorted({(a[0], a[1]) for a in answers})
            statuses = ", ".join(f"{sum(1 for a in answers if a[:2] == k)} x {k[0]} {k[1]}" for k in kinds)
            if count == 1:
                one_above = result.peak - result.rest
            slowest = max(a[2] for a in answers) if answers else float("nan")
            above = result.peak - result.rest
            figures = [f"{mb:.0f}" for mb in (result.rest, result.peak, above, result.after)]
            rows.append([count, *figures, statuses, f"{slowest:.2f}", all_in])
            ok &= len(queued) == count and all_in
            for line in result.errors:
                print(f"  receiver: {line[:300]}")
        r.close()
    print(table(["deliveries", "rest MB", "peak MB", "peak - rest", "after MB", "answers",
                 "slowest s", "queued in Redis"], rows))  # fmt: skip
    if one_above is not None:
        ok &= one_above <= args.max_one_mb
        print(f"one delivery: {one_above:.0f} MB above rest (target ≤ {args.max_one_mb:.0f}): "
              f"{verdict(one_above <= args.max_one_mb)}")  # fmt: skip
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
