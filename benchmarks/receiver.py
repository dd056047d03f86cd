"""Benchmark 1: the receiver against a bare Starlette endpoint, under the same uvicorn settings.

  python -m benchmarks.receiver [--seconds 10] [--connections 64]

Both apps run as `uvicorn` with uvloop and httptools, one process, on loopback. The receiver
runs for real: a Redis-compatible server (its own valkey-server, AOF on, or REDIS_URL), the
signature check, de-duplication, the archive and the enqueue. Every request carries a
distinct signed event, so every 200 must leave exactly one job.

1. Throughput: wrk, closed loop, the same connections and duration against each app.
   Target: the receiver serves at least 50 % of the bare app's requests per second.
2. Latency: an open-loop generator sends 1,000 requests/s on a schedule and measures each
   latency from its scheduled time (so queueing counts). Target: p99 ≤ 10 ms.
3. Accounting: every event id the receiver answered `queued` for is in the queue exactly once.

Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
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


def bodies(path: Path, count: int) -> None:
    with path.open("w") as f:
        for i in range(count):
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
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(
            f"http://127.0.0.1:{port}/livez" if "serve" in command else f"http://127.0.0.1:{port}/", proc
        )
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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=int, default=1000)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: `apt-get install wrk` (make bench does it)")

    work = Path(tempfile.mkdtemp(prefix="bench-receiver-"))
    bodies_file, lua = work / "bodies.txt", work / "bodies.lua"
    lua.write_text(LUA)
    needed = 40_000 * args.seconds + args.rate * args.seconds
    bodies(bodies_file, needed)
    python = sys.executable
    results: dict[str, dict[str, float]] = {}
    with embedded_redis(work) as redis_url:
        r = redis.Redis.from_url(redis_url)
        port = free_port()
        with serving([python, "-m", "benchmarks.bare_app", str(port)], dict(os.environ), port) as url:
            results["bare"] = wrk(url, lua, bodies_file, args.seconds, args.connections)
        env = {**os.environ, "REDIS_URL": redis_url, "BRIDGE_WEBHOOK_SECRETS": SECRET,
               "BRIDGE_ALLOWED_IPS": "127.0.0.1", "LOG_LEVEL": "info"}  # fmt: skip
        port = free_port()
        command = [python, "-m", "bridgehook", "serve", "--host", "127.0.0.1", "--port", str(port)]
        with serving(command, env, port) as url:
            results["receiver"] = wrk(url, lua, bodies_file, args.seconds, args.connections)
            time.sleep(0.5)  # requests wrk cut off at its deadline finish server-side
            after_wrk = r.llen("rq:queue:bridgehook")
            offset = needed - args.rate * args.seconds
            uvloop.install()
            latencies, queued = asyncio.run(open_loop(url, bodies_file, offset, args.rate, args.seconds))
            in_queue = [v.decode() for v in r.lrange("rq:queue:bridgehook", 0, -1)]  # type: ignore[union-attr]
        r.close()
    shutil.rmtree(work, ignore_errors=True)

    ratio = results["receiver"]["rps"] / results["bare"]["rps"]
    counts = {job: 0 for job in queued}
    for job in in_queue:
        if job in counts:
            counts[job] += 1
    # Open loop: every answered `queued` is in the queue exactly once. Under wrk: as many jobs as
    # 200s, plus at most one per connection for requests wrk stopped waiting for at its deadline.
    exact = all(n == 1 for n in counts.values()) and len(in_queue) == len(set(in_queue))
    wrk_queued = int(results["receiver"]["queued"])
    bounded = wrk_queued <= after_wrk <= wrk_queued + args.connections
    p50, p99 = percentile(latencies, 0.50) * 1000, percentile(latencies, 0.99) * 1000
    print(f"machine: {machine()}")
    print(f"{'':12}{'req/s':>10}{'p99 (ms)':>10}{'non-2xx':>9}")
    for name, res in results.items():
        print(f"{name:12}{res['rps']:>10.0f}{res['p99_ms']:>10.2f}{res['non2xx']:>9.0f}")
    print(
        f"open loop {args.rate}/s for {args.seconds}s: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
        f"max {max(latencies) * 1000:.2f} ms ({len(latencies)} requests)"
    )
    cut = f"+{args.connections} at most, cut off by wrk's deadline"
    print(f"jobs under wrk: {wrk_queued} answered queued, {after_wrk} in the queue ({cut})")
    print(f"jobs under the open loop: {len(queued)} answered queued, each in the queue once: {exact}")
    print(f"RATIO receiver/bare throughput {ratio:.2f} (target ≥ 0.50)")
    print(f"RATIO p99 at {args.rate}/s {p99:.2f} ms (target ≤ 10 ms)")
    failed = ratio < 0.5 or p99 > 10 or not exact or not bounded or results["receiver"]["non2xx"] > 0
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
