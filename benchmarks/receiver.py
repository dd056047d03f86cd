"""Benchmark 1: the receiver against a bare Starlette endpoint, under the same uvicorn settings.

  python -m benchmarks.receiver [--seconds 2] [--rounds 7] [--connections 64] [--rate 1000]

Both apps run as `uvicorn` with uvloop and httptools, one process, on loopback. The receiver
runs for real: a Redis-compatible server (its own valkey-server, AOF on, or REDIS_URL), the
signature check, de-duplication, the archive and the enqueue. Every request carries a
distinct signed event, so every 200 must leave exactly one job.

1. Throughput: wrk, closed loop, the same connections and duration against each app. The two
   apps take turns in short runs (bare, receiver, receiver, bare, …), so that both see the
   same moments of the machine's load, and the ratio is the median of the rounds' ratios: on
   a shared 2-core machine, one long run of each swung by half either way with what else ran.
   After each receiver run, Redis's background work (an AOF rewrite its writes set off) is
   waited out, so that it never lands on the next run. Guard rail: the receiver serves at least
   50 % of the bare app's requests per second. Nothing is pinned to a CPU: with the server
   alone on one core and wrk and Redis on the other, the receiver waited for Redis behind
   wrk (and whatever else ran there) while its own core idled: the ratio fell from about 0.7
   to about 0.4 in runs taking turns with unpinned ones.
2. Latency: an open-loop generator sends 1,000 requests/s on a schedule and measures each
   latency from its scheduled time (so queueing counts). Guard rail: p99 ≤ 10 ms.
3. Accounting: every event id the receiver answered `queued` for is in the queue exactly once,
   and under wrk each round's jobs match its `queued` answers.

The receiver is never the bottleneck (Bridge's request budget is: benchmark 5), so these are guard
rails against regressions rather than goals to tune for. Exit status 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
import uvloop

from benchmarks.common import machine
from bridgehook.devenv import embedded_redis

SECRET = "benchmark-webhook-secret-0123456789"  # noqa: S105 (a throwaway secret for loopback)
PATH = "/webhooks/bridge"
LUA = r"""
local lines, idx = {}, 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  for line in io.lines(args[1]) do lines[#lines + 1] = line end
  queued, wrapped = 0, 0
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  idx = idx + 1
  if idx > #lines then idx, wrapped = 1, 1 end
  local line = lines[idx]
  local tab = line:find("\t")
  wrk.headers["BridgeApi-Signature"] = "v1=" .. line:sub(1, tab - 1)
  return wrk.format(nil, nil, nil, line:sub(tab + 1))
end
function response(status, headers, body)
  if status == 200 and body:find('"queued"', 1, true) then queued = queued + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do
    total = total + t:get("queued")
    if t:get("wrapped") == 1 then io.write("WRAPPED\n") end
  end
  io.write(string.format("QUEUED %d\n", total))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    sys.exit(f"{url} did not answer in {timeout}s")


def bodies(path: Path, count: int, start: int = 0) -> None:
    with path.open("w") as f:
        for i in range(start, start + count):
            body = json.dumps(
                {"content": {"item_id": 1000 + i % 1000, "user_uuid": "766b2f5d-a942-492c-9ea7-2e5aa88cb672",
                             "status_code": 0, "full_refresh": False},
                 "timestamp": 1_700_000_000_000 + i, "type": "item.refreshed"},
                separators=(",", ":"),
            )  # fmt: skip
            sig = hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).hexdigest().upper()
            f.write(f"{sig}\t{body}\n")


@contextmanager
def serving(command: list[str], env: dict[str, str], port: int) -> Iterator[str]:
    ready = f"http://127.0.0.1:{port}/"  # the bare app answers there; the receiver on its admin port
    if "serve" in command:
        admin = free_port()
        env, ready = {**env, "ADMIN_PORT": str(admin)}, f"http://127.0.0.1:{admin}/livez"
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(ready, proc)
        yield f"http://127.0.0.1:{port}{PATH}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wrk(url: str, lua: Path, bodies_file: Path, seconds: int, connections: int) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(lua), url]
    out = subprocess.run(
        [*command, "--", str(bodies_file)], capture_output=True, text=True, timeout=seconds + 60
    )
    if out.returncode != 0 or "WRAPPED" in out.stdout:
        sys.exit(f"wrk failed or ran out of distinct bodies:\n{out.stdout}\n{out.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)[1])  # type: ignore[index]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out.stdout)
    scale = {"us": 0.001, "ms": 1, "s": 1000}
    return {
        "queued": float(re.search(r"QUEUED (\d+)", out.stdout)[1]),  # type: ignore[index]
        "rps": rps,
        "non2xx": float(non2xx[1]) if non2xx else 0.0,
        "p99_ms": float(p99[1]) * scale[p99[2]] if p99 else float("nan"),
    }


async def open_loop(
    url: str, bodies_file: Path, offset: int, rate: int, seconds: int
) -> tuple[list[float], list[str]]:
    """Send `rate` requests/s on a fixed schedule; each latency counts from its scheduled time."""
    lines = bodies_file.read_text().splitlines()[offset : offset + rate * seconds]
    host, port = "127.0.0.1", int(url.split(":")[2].split("/")[0])
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(64):
        idle.put_nowait(await asyncio.open_connection(host, port))
    latencies: list[float] = []
    queued: list[str] = []

    async def fire(line: str, scheduled: float) -> None:
        sig, body = line.split("\t", 1)
        raw = body.encode()
        request = (
            f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\nBridgeApi-Signature: v1={sig}\r\n\r\n"
        ).encode() + raw
        reader, writer = await idle.get()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
        answer = json.loads(await reader.readexactly(length))
        latencies.append(time.perf_counter() - scheduled)
        if answer.get("status") == "queued":
            queued.append(answer["event_id"])
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode())
        idle.put_nowait((reader, writer))

    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    start = time.perf_counter() + 0.1
    tasks = []
    for i, line in enumerate(lines):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(fire(line, scheduled)))
    await asyncio.gather(*tasks)
    return latencies, queued


def redis_idle(r: redis.Redis, timeout: float = 60) -> None:
    """Wait out Redis's background work (an AOF rewrite that the receiver's writes set off), so
    that it does not land on the next run, whichever app's run that is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = r.info("persistence")
        busy = ("aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress")
        if not any(info.get(key) for key in busy):
            return
        time.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=2, help="each wrk run")
    parser.add_argument("--rounds", type=int, default=7, help="wrk runs per app, taking turns")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=int, default=1000, help="open loop, requests per second")
    parser.add_argument("--open-seconds", type=int, default=10, help="open loop duration")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: `apt-get install wrk` (make bench does it)")

    work = Path(tempfile.mkdtemp(prefix="bench-receiver-"))
    lua = work / "bodies.lua"
    lua.write_text(LUA)
    # Every receiver round gets bodies of its own (every request a new event); the bare app's
    # rounds read the same files.
    round_files = [work / f"bodies-{n}.txt" for n in range(args.rounds)]
    for n, path in enumerate(round_files):
        bodies(path, 40_000 * args.seconds, start=n * 40_000 * args.seconds)
    open_file = work / "bodies-open.txt"
    bodies(open_file, args.rate * args.open_seconds, start=args.rounds * 40_000 * args.seconds)
    python = sys.executable
    rounds: list[dict[str, dict[str, float]]] = []
    bounded = True
    with embedded_redis(work) as redis_url:
        r = redis.Redis.from_url(redis_url)
        env = {**os.environ, "REDIS_URL": redis_url, "BRIDGE_WEBHOOK_SECRETS": SECRET,
               "BRIDGE_ALLOWED_IPS": "127.0.0.1", "LOG_LEVEL": "info"}  # fmt: skip
        bare_port, receiver_port = free_port(), free_port()
        bare_command = [python, "-m", "benchmarks.bare_app", str(bare_port)]
        command = [python, "-m", "bridgehook", "serve", "--host", "127.0.0.1", "--port", str(receiver_port)]
        with (
            serving(bare_command, dict(os.environ), bare_port) as bare_url,
            serving(command, env, receiver_port) as url,
        ):
            for n, path in enumerate(round_files):
                results: dict[str, dict[str, float]] = {}
                for name in ("bare", "receiver") if n % 2 == 0 else ("receiver", "bare"):
                    before = r.llen("rq:queue:bridgehook")
                    results[name] = wrk(
                        bare_url if name == "bare" else url, lua, path, args.seconds, args.connections
                    )
                    if name == "receiver":
                        time.sleep(0.5)  # requests wrk cut off at its deadline finish server-side
                        redis_idle(r)
                        # As many jobs as 200s, plus at most one per connection for requests wrk
                        # stopped waiting for at its deadline.
                        jobs, answered = r.llen("rq:queue:bridgehook") - before, results[name]["queued"]
                        results[name]["jobs"] = jobs
                        bounded &= answered <= jobs <= answered + args.connections
                rounds.append(results)
            uvloop.install()
            # The generator's own garbage collection stays off while it measures: a full collection
            # of its 10,000 tasks paused it for ~100 ms, counted against the requests in flight.
            gc.freeze()
            gc.disable()
            try:
                latencies, queued = asyncio.run(open_loop(url, open_file, 0, args.rate, args.open_seconds))
            finally:
                gc.enable()
            in_queue = [v.decode() for v in r.lrange("rq:queue:bridgehook", 0, -1)]  # type: ignore[union-attr]
        r.close()
    shutil.rmtree(work, ignore_errors=True)

    ratios = [res["receiver"]["rps"] / res["bare"]["rps"] for res in rounds]
    ratio = statistics.median(ratios)
    counts = {job: 0 for job in queued}
    for job in in_queue:
        if job in counts:
            counts[job] += 1
    # Open loop: every answered `queued` is in the queue exactly once (and no job is in it twice).
    exact = all(n == 1 for n in counts.values()) and len(in_queue) == len(set(in_queue))
    p50, p99 = percentile(latencies, 0.50) * 1000, percentile(latencies, 0.99) * 1000
    print(f"machine: {machine()}")
    print(f"wrk -t1 -c{args.connections} -d{args.seconds}s, {args.rounds} rounds, no CPU pinning")
    print(f"{'':12}{'req/s':>10}{'p99 (ms)':>10}{'non-2xx':>9}{'queued':>9}{'jobs':>9}{'ratio':>8}")
    for n, (res, round_ratio) in enumerate(zip(rounds, ratios, strict=True), 1):
        for name in ("bare", "receiver"):
            arm = res[name]
            line = f"{n} {name:10}{arm['rps']:>10.0f}{arm['p99_ms']:>10.2f}{arm['non2xx']:>9.0f}"
            if name == "receiver":
                line += f"{arm['queued']:>9.0f}{arm['jobs']:>9.0f}{round_ratio:>8.2f}"
            print(line)
    print(
        f"open loop {args.rate}/s for {args.open_seconds}s: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
        f"max {max(latencies) * 1000:.2f} ms ({len(latencies)} requests)"
    )
    cut = f"+{args.connections} at most per round, cut off by wrk's deadline"
    print(f"jobs under wrk: each round's jobs within its queued answers ({cut}): {bounded}")
    print(f"jobs under the open loop: {len(queued)} answered queued, each in the queue once: {exact}")
    print(
        f"RATIO receiver/bare throughput {ratio:.2f}, median of {', '.join(f'{x:.2f}' for x in ratios)} "
        "(guard rail ≥ 0.50)"
    )
    print(f"RATIO p99 at {args.rate}/s {p99:.2f} ms (guard rail ≤ 10 ms)")
    receiver_non2xx = sum(res["receiver"]["non2xx"] for res in rounds)
    failed = ratio < 0.5 or p99 > 10 or not exact or not bounded or receiver_non2xx > 0
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
