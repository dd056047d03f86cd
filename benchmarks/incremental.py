"""Benchmark 3: after a full sync, a change of 100 transactions costs only the page(s) they are on.

``python -m benchmarks.incremental [--runs N] [--overlap SECONDS]``

A full sync (``item.created``, 20 accounts x 5,000 transactions) by a real ``bridgehook worker
--burst`` process into PostgreSQL, with ``SYNC_OVERLAP_SECONDS`` small (1 s by default). Then, once
more than the overlap has passed, each run changes 100 transactions spread over one account's history
at the fake Bridge (another account each run), and has a worker process the ``item.account.updated``
event Bridge sends for it. The fake's own request log says what the worker asked for. Targets: the
incremental job requests only the page(s) the changed transactions fit on (one page of 500 for 100
of them, plus what the overlap re-reads) and takes <= 5 % of the full sync's time (RQ's started ->
ended, both). The 100 changes must be in the database afterwards. Exit 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from typing import Any

import psycopg

from benchmarks.common import (
    event,
    fake_bridge,
    machine,
    pg_schema,
    redis_url,
    run_job,
    table,
    upgrade,
    verdict,
    worker_env,
)

TIME_TARGET = 0.05
CHANGED = 100
PAGE = 500  # Bridge's largest page, what the worker asks for


def shape(path: str) -> str:
    """A request path with its ids folded: /v3/aggregation/accounts/20000007 → /accounts/{id}."""
    parts = path.split("/aggregation", 1)[-1].split("/")
    return "/".join("{id}" if p.isdigit() else p for p in parts)


def check_changes(url: str, changed: list[int]) -> bool:
    with psycopg.connect(url) as conn:
        sql = "SELECT id, amount, clean_description FROM transactions WHERE id = ANY(%s) ORDER BY id"
        rows = conn.execute(sql, (changed,)).fetchall()
    # The fake's /_bench/change set amount -(n+1).99 and "Changed n" on the n-th changed id.
    wanted = {t: (f"-{n + 1}.99", f"Changed {n}") for n, t in enumerate(changed)}
    return len(rows) == len(changed) and all((str(a), d) == wanted[i] for i, a, d in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.incremental", description="benchmark 3")
    parser.add_argument("--runs", type=int, default=3, help="incremental rounds after the full sync")
    parser.add_argument("--overlap", type=int, default=1, help="SYNC_OVERLAP_SECONDS")
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--transactions", type=int, default=5000, help="per account")
    args = parser.parse_args(argv)
    total = args.accounts * args.transactions
    print(f"incremental sync: {args.accounts} accounts x {args.transactions} transactions = {total} rows, "
          f"{CHANGED} changed per run; {machine()}", flush=True)  # fmt: skip
    runs: list[dict[str, Any]] = []
    with redis_url() as redis, fake_bridge(args.accounts, args.transactions) as fake, pg_schema() as url:
        env = worker_env(redis, url, fake, SYNC_OVERLAP_SECONDS=str(args.overlap))
        upgrade(env)
        item = {"item_id": fake.info["item_id"], "user_uuid": fake.info["user_uuid"]}
        full = run_job(env, "workers.jobs.item_created", event("item.created", item))
        if (written := full.result.get("transactions")) != total:
            raise SystemExit(f"the full sync wrote {written} transactions, not {total}")
        print(f"full sync: {full.seconds:.2f} s ({total / full.seconds:,.0f} rows/s), worker peak RSS "
              f"{full.rss_mb:.0f} MB", flush=True)  # fmt: skip
        # The fake's history ends minutes ago (one transaction every 1.2 s), so the overlap re-reads at
        # most each account's newest transaction; waiting past it keeps the changes clear of it too.
        wait = args.overlap + 0.5
        print(f"waiting {wait:.1f} s (> SYNC_OVERLAP_SECONDS={args.overlap}) before changing anything",
              flush=True)  # fmt: skip
        time.sleep(wait)
        for n in range(args.runs):
            account = fake.info["accounts"][(7 + n) % len(fake.info["accounts"])]
            fake.control("POST", "reset")
            change = fake.control("POST", "change", {"account_id": account, "count": CHANGED})
            kind, content = change["event"]
            inc = run_job(env, "workers.jobs.account_updated", event(kind, content))
            requests = fake.control("GET", "requests")
            paths = Counter(shape(path) for _, path, _, _ in requests)
            written = int(inc.result.get("transactions") or 0)
            runs.append({
                "account": account, "seconds": inc.seconds, "paths": paths, "written": written,
                "pages": paths["/transactions"], "needed": math.ceil(written / PAGE),
                "ok_rows": check_changes(url, change["changed"]), "rss": inc.rss_mb,
            })  # fmt: skip
            print(f"  run {n + 1}: account {account}, {inc.seconds * 1000:.0f} ms, requests "
                  f"{dict(paths)}, transactions written {written}", flush=True)  # fmt: skip
    print()
    print(table(
        ["run", "account", "incremental ms", "% of full", "transaction pages fetched", "rows fetched",
         "re-read by overlap", "all requests", "changes stored"],
        [[n, r["account"], f"{r['seconds'] * 1000:.0f}", f"{100 * r['seconds'] / full.seconds:.1f}",
          r["pages"], r["written"], r["written"] - CHANGED, sum(r["paths"].values()), r["ok_rows"]]
         for n, r in enumerate(runs, 1)],
    ))  # fmt: skip
    print()
    worst = max(r["seconds"] for r in runs)
    ratio = worst / full.seconds
    pages_ok = all(r["pages"] == r["needed"] == math.ceil(CHANGED / PAGE) for r in runs)
    rows_ok = all(r["ok_rows"] for r in runs)
    times = f"worst {worst * 1000:.0f} ms of {len(runs)} vs {full.seconds * 1000:.0f} ms"
    print(f"RATIO incremental / full sync time = {ratio:.3f} ({times}; target <= {TIME_TARGET:.2f}) "
          f"{verdict(ratio <= TIME_TARGET)}")  # fmt: skip
    print(f"PAGES transaction pages fetched per incremental sync = "
          f"{sorted({r['pages'] for r in runs})} (the {CHANGED} changes fit on {math.ceil(CHANGED / PAGE)}; "
          f"overlap {args.overlap} s re-read {sorted({r['written'] - CHANGED for r in runs})} row(s)) "
          f"{verdict(pages_ok)}")  # fmt: skip
    print(f"ROWS the {CHANGED} changes are in the database after each run {verdict(rows_ok)}")
    return 0 if ratio <= TIME_TARGET and pages_ok and rows_ok else 1


if __name__ == "__main__":
    sys.exit(main())
