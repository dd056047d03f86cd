"""`python -m benchmarks` (what `make bench` runs): every benchmark in turn, then a summary.

Each benchmark prints its own figures and ratios against a baseline measured in the same run,
and exits 1 when it misses its target; this runs them all and fails if any did.
"""

from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = ["receiver", "write_path", "incremental", "e2e", "budget", "powens_bodies"]


def main() -> int:
    results = []
    for name in sys.argv[1:] or BENCHMARKS:
        print(f"\n=== benchmarks.{name} ===", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        results.append((name, code, time.monotonic() - started))
    print("\n=== summary ===")
    for name, code, seconds in results:
        print(f"{name:14} {'PASS' if code == 0 else 'FAIL'}  ({seconds:.0f}s)")
    return 1 if any(code for _, code, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
