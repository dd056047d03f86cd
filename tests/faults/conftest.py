"""Fixtures of the fault suite, and the summary table printed at the end of the run.

Each scenario runs the project's real processes against the machine's Redis (``REDIS_URL``, or a
private server where the scenario crashes Redis) and PostgreSQL (a fresh schema), with the fake
Bridge as ground truth. Each is bounded in time twice over: every wait has its own deadline, and a
watchdog kills the scenario's processes and interrupts the run if a scenario still runs after
``SCENARIO_LIMIT`` seconds, so that nothing can hang.
"""

from __future__ import annotations

import _thread
import faulthandler
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from fakebridge.server import FakeBridgeServer
from fakebridge.world import World
from tests.faults.support import Outcome, Processes, Recorder
from tests.harness import worker_environ
from tests.powens_harness import PowensHarness, powens_environ
from tests.support import SECRET

SCENARIO_LIMIT = 180.0
RESULTS = pytest.StashKey[list[Outcome]]()


class Watchdog:
    """Past its limit: dump every thread's stack, run the registered cleanups (which kill processes and
    so unblock whatever waits on them), then interrupt the test run."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.cleanups: list[Callable[[], None]] = []
        self._timer = threading.Timer(limit, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        sys.stderr.write(f"\nfault scenario still running after {self.limit:.0f}s: stopping it\n")
        faulthandler.dump_traceback(all_threads=True)
        for cleanup in self.cleanups:
            try:
                cleanup()
            except Exception as exc:  # the others must run all the same
                sys.stderr.write(f"cleanup failed: {exc!r}\n")
        _thread.interrupt_main()

    def cancel(self) -> None:
        self._timer.cancel()


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[Watchdog]:
    """Every test of the suite under a time limit, cancelled when it ends."""
    dog = Watchdog(SCENARIO_LIMIT)
    yield dog
    dog.cancel()


@pytest.fixture
def environ(
    redis_url: str, r: redis.Redis, database_url: str, fake: FakeBridgeServer, world: World, tmp_path: Path
) -> dict[str, str]:
    """The environment of every `bridgehook` process of a scenario: the tests' worker settings (the same
    helper builds the in-process harness's), the receiver's secret, loopback as Bridge's address, no
    metrics port, and a home of its own."""
    return {
        **os.environ,
        **worker_environ(redis_url, database_url, fake.api_url, world),
        "BRIDGE_WEBHOOK_SECRETS": SECRET,
        "BRIDGE_ALLOWED_IPS": "127.0.0.1",
        "METRICS_PORT": "0",
        "BRIDGEHOOK_HOME": str(tmp_path / "home"),
    }


@pytest.fixture
def processes(environ: dict[str, str], tmp_path: Path, watchdog: Watchdog) -> Iterator[Processes]:
    """The scenario's processes (logs under tmp_path/logs, kept by pytest for the last runs); none
    outlives the scenario, nor the watchdog's limit."""
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(environ, logs)
    watchdog.cleanups.append(procs.close)
    yield procs
    procs.close()


@pytest.fixture
def powens(ph: PowensHarness, processes: Processes) -> PowensHarness:
    """The Powens side of a scenario: its harness (tests.powens_harness, the fake Powens as ground truth),
    and every process the scenario starts configured for that fake Powens as well."""
    processes.env.update(powens_environ(ph.powens, ph.pworld))
    return ph


@pytest.fixture
def recorder(request: pytest.FixtureRequest) -> Recorder:
    """Where a scenario settles and records its outcome, for the summary table."""
    results = request.config.stash.setdefault(RESULTS, [])
    return Recorder(request.node.name, results)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """One line per scenario: what was sent and acknowledged, rows expected and found, and lost (which
    must be 0). For the hostile-input scenario, "rows" are the jobs its accepted deliveries queued."""
    results = config.stash.get(RESULTS, [])
    if not results:
        return
    header = ("scenario", "sent", "acked", "rows expected", "rows found", "lost", "seconds", "notes")
    lines = [
        (
            o.scenario,
            o.sent,
            o.acknowledged,
            o.rows_expected,
            o.rows_found,
            o.lost,
            f"{o.seconds:.1f}",
            o.notes,
        )
        for o in results
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    terminalreporter.write_sep("=", "fault scenarios")
    for line in (header, *lines):
        # The scenario and the notes read from the left, the numbers from the right.
        cells = [
            str(c).ljust(w) if i in (0, 7) else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        terminalreporter.write_line("  ".join(cells).rstrip(), red=line[5] not in (0, "lost"))
