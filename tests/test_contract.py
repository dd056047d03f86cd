"""The error contract of every command (bridgehook/exits.py), walked over the whole click tree.

Exit 0 done, 1 something failed or needs attention (Redis or the database unreachable), 2 bad usage
or configuration; on an error, one line on stderr naming what is wrong and what to do, never a
traceback and never a secret. A command added later is walked too: :data:`CASES` must then say
what it needs, or :func:`test_every_command_has_a_case` fails.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import click
import pytest
from click.testing import CliRunner, Result

from bridgehook.cli import main
from tests.support import SECRET, TEST_ENCRYPTION_KEY, settings_variables

UNREACHABLE_REDIS = "redis://:redis-pass-1234@127.0.0.1:1/0"
UNREACHABLE_POSTGRES = "postgresql://postgres:pg-pass-5678@127.0.0.1:1/x"
PASSWORDS = ("redis-pass-1234", "pg-pass-5678")
DEADLINE_SECONDS = 60  # a command that starts instead of stopping fails here rather than hanging


@dataclass(frozen=True)
class Case:
    """What a command needs: minimal valid arguments, whether it reads Redis and the database (then
    each is made to fail), and the configuration it must refuse with exit 2: (variable, value), None
    for unset. A command that runs until stopped (serve, dev, worker, scheduler) is given nothing
    with which it could start: every environment here lacks a variable or a working Redis or
    database, and :data:`DEADLINE_SECONDS` fails the test of one that starts anyway."""

    args: tuple[str, ...] = ()
    redis: bool = False
    database: bool = False
    config: tuple[tuple[str, str | None], ...] = ()


# A malformed variable stops every command that reads the settings, as a missing one does.
MALFORMED = (("LOG_LEVEL", "loud"), ("ENCRYPTION_KEYS", "not-a-key"))
WORKER_CONFIG = (
    ("REDIS_URL", None),
    ("BRIDGE_CLIENT_ID", None),
    ("BRIDGE_CLIENT_SECRET", None),
    ("ENCRYPTION_KEYS", None),
    *MALFORMED,
)
OPS_CONFIG = (("REDIS_URL", None), ("ENCRYPTION_KEYS", None), *MALFORMED)
KEYS_CONFIG = (("ENCRYPTION_KEYS", None), *MALFORMED)


def ops(*args: str) -> Case:
    return Case(args, redis=True, database=True, config=OPS_CONFIG)


CASES: dict[tuple[str, ...], Case] = {
    ("serve",): Case(
        ("--host", "127.0.0.1"), config=(("BRIDGE_WEBHOOK_SECRETS", None), ("REDIS_URL", None), *MALFORMED)
    ),
    # dev fills in every variable it needs; a malformed one still stops it before it starts anything.
    ("dev",): Case(("--port", "0"), config=(("REDIS_URL", "http://127.0.0.1:1"), *MALFORMED)),
    ("send",): Case(
        ("--fixture", "item.created", "--url", "http://127.0.0.1:1/webhooks/bridge"),
        config=(("BRIDGE_WEBHOOK_SECRETS", None),),
    ),
    # What a worker and the scheduler need is checked before they start: exercised like the others.
    ("worker",): Case(redis=True, database=True, config=WORKER_CONFIG),
    ("scheduler",): Case(redis=True, database=True, config=WORKER_CONFIG),
    ("db", "upgrade"): Case(database=True, config=(("DATABASE_URL", "mysql://x/y"), *MALFORMED)),
    ("dlq", "list"): ops(),
    ("dlq", "show"): ops("0123456789ab"),
    ("dlq", "replay"): ops("--all", "--yes"),
    ("dlq", "purge"): ops("--all", "--yes"),
    ("events", "replay"): ops("--since", "1h", "--yes"),
    ("resync",): ops("--item", "1"),
    ("reconcile",): ops(),
    ("status",): ops(),
    ("retries",): ops(),
    ("items", "attention"): ops(),
    # The API, like serve, is checked for what it must have before it starts.
    ("api",): Case(
        ("--host", "127.0.0.1"),
        config=(("API_TOKENS", None), ("CONNECT_CALLBACK_URL", None), ("REDIS_URL", None), *MALFORMED),
    ),
    ("keys", "generate"): Case(),
    ("keys", "seal-pair"): Case(),
    ("keys", "rotate"): Case(("--dry-run",), database=True, config=KEYS_CONFIG),
    ("accounts", "show"): Case(("1",), database=True, config=KEYS_CONFIG),
}


def leaves(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command under ``group`` that does something (not a group), by its words."""
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from leaves(command, (*path, name))
        else:
            yield (*path, name)


COMMANDS = sorted(leaves(main))
NAMES = [" ".join(c) for c in COMMANDS]


def cases(where: str) -> list[tuple[str, ...]]:
    return [c for c in COMMANDS if c in CASES and getattr(CASES[c], where)]


Env = dict[str, str | None]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A complete configuration (Redis and the database unreachable), in an empty directory and
    BRIDGEHOOK_HOME, nothing inherited from the process's environment or a `make run` nearby. Every
    variable is named (None: unset), so that the runner restores each after the command, `dev`'s
    defaults included; and none leaves a .bridgehook/ where it ran."""
    monkeypatch.chdir(tmp_path)
    names = settings_variables()
    yield {
        **dict.fromkeys(names | {f"{name}_FILE" for name in names}),
        "BRIDGEHOOK_HOME": str(tmp_path / "home"),
        "BRIDGE_WEBHOOK_SECRETS": SECRET,
        "REDIS_URL": UNREACHABLE_REDIS,
        "DATABASE_URL": UNREACHABLE_POSTGRES,
        "BRIDGE_CLIENT_ID": "client-id",
        "BRIDGE_CLIENT_SECRET": "client-secret",
        "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        "API_TOKENS": "api-token-0123456789",
        "CONNECT_CALLBACK_URL": "https://hooks.example.com/connect/callback",
    }
    assert not (tmp_path / ".bridgehook").exists()


class Started(Exception):
    """The command ran past its deadline: it started instead of stopping on the error."""


def _started(signum: int, frame: FrameType | None) -> None:
    raise Started(f"still running after {DEADLINE_SECONDS}s")


def invoke(command: tuple[str, ...], args: tuple[str, ...], env: Env) -> Result:
    before = dict(os.environ)
    previous = signal.signal(signal.SIGALRM, _started)
    signal.alarm(DEADLINE_SECONDS)
    try:
        result = CliRunner().invoke(main, [*command, *args], env=env)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert dict(os.environ) == before, "the command left variables behind for the next one"
    return result


def one_line(result: Result, code: int, *names: str) -> str:
    """The result kept the contract: exit ``code``, one line on stderr naming ``names``, no traceback
    and no password; the line is returned."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for name in names:
        assert name in lines[0]
    for password in PASSWORDS:
        assert password not in result.output
    return lines[0]


def test_every_command_has_a_case() -> None:
    """A new command needs its entry (what it needs, its minimal arguments); a removed one loses it."""
    assert set(COMMANDS) == set(CASES), "add the new command to CASES, or remove the gone one"
    assert len(COMMANDS) > 15  # the walk sees the groups' commands too


@pytest.mark.parametrize("command", COMMANDS, ids=NAMES)
def test_an_unknown_option_is_a_usage_error(command: tuple[str, ...], env: Env) -> None:
    result = invoke(command, ("--no-such-option",), env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "No such option" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [(c, variable, value) for c in COMMANDS for variable, value in CASES.get(c, Case()).config],
    ids=[f"{' '.join(c)}-{variable}" for c in COMMANDS for variable, _ in CASES.get(c, Case()).config],
)
def test_missing_or_bad_configuration_is_named(
    command: tuple[str, ...], variable: str, value: str | None, env: Env
) -> None:
    """Before any connection and before a long-running command starts: exit 2 naming the variable."""
    result = invoke(command, CASES[command].args, {**env, variable: value})
    one_line(result, 2, variable)


@pytest.mark.parametrize("command", cases("redis"), ids=" ".join)
def test_unreachable_redis_is_a_failure(command: tuple[str, ...], env: Env) -> None:
    line = one_line(invoke(command, CASES[command].args, env), 1, "Redis")
    assert "redis://:***@127.0.0.1:1/0" in line


@pytest.fixture
def reachable_redis(redis_url: str, env: Env) -> Env:
    return {**env, "REDIS_URL": redis_url}


@pytest.mark.parametrize("command", cases("database"), ids=" ".join)
def test_unreachable_postgresql_is_a_failure(command: tuple[str, ...], reachable_redis: Env) -> None:
    """An outage: exit 1, the server named without its password."""
    line = one_line(invoke(command, CASES[command].args, reachable_redis), 1, "unreachable")
    assert "postgres:***@127.0.0.1:1/x" in line


@pytest.mark.parametrize("command", cases("database"), ids=" ".join)
@pytest.mark.parametrize("url", ["sqlite:///{tmp}/file/sub/bridgehook.db", f"{UNREACHABLE_POSTGRES}?bogus=1"])
def test_a_database_url_that_cannot_work_is_a_configuration_error(
    command: tuple[str, ...], url: str, reachable_redis: Env, tmp_path: Path
) -> None:
    """A SQLite directory that cannot be made (a file stands in its way), an option PostgreSQL does
    not know: running again cannot help, DATABASE_URL must change."""
    (tmp_path / "file").write_text("")
    env = {**reachable_redis, "DATABASE_URL": url.format(tmp=tmp_path)}
    one_line(invoke(command, CASES[command].args, env), 2, "DATABASE_URL")


@pytest.mark.parametrize("command", [c for c in cases("database") if c != ("db", "upgrade")], ids=" ".join)
def test_a_database_without_the_schema_is_a_failure(
    command: tuple[str, ...], reachable_redis: Env, tmp_path: Path
) -> None:
    """A missing directory is made, as `db upgrade` needs; a command then meets an empty database."""
    env = {**reachable_redis, "DATABASE_URL": f"sqlite:///{tmp_path / 'missing' / 'bridgehook.db'}"}
    one_line(invoke(command, CASES[command].args, env), 1, "database")


# What a command refuses among its own arguments and inputs: (words and arguments, exit code, named).
REFUSALS = [
    (("send", "--fixture", "item.created", "--url", "notaurl"), 2, "--url"),
    (("send", "--fixture", "item.created", "--url", "http://[::1"), 2, "--url"),
    (("send", "--file", "{tmp}/body.json", "--fresh", "--url", "http://127.0.0.1:1/x"), 2, "--fresh"),
    (("send", "--fixture", "item.created", "--url", "http://127.0.0.1:1/x"), 1, "could not POST"),
    (("resync",), 2, "--item"),
    (("dlq", "replay"), 2, "--all"),
    (("dlq", "purge"), 2, "--all"),
]


@pytest.mark.parametrize(("words", "code", "named"), REFUSALS, ids=[" ".join(w) for w, _, _ in REFUSALS])
def test_a_bad_argument_or_input_is_named(
    words: tuple[str, ...], code: int, named: str, env: Env, tmp_path: Path
) -> None:
    """Before any connection (Redis and the database are unreachable here): usage is usage."""
    (tmp_path / "body.json").write_text("not json")
    command = next(c for c in COMMANDS if words[: len(c)] == c)
    args = tuple(a.format(tmp=tmp_path) for a in words[len(command) :])
    one_line(invoke(command, args, env), code, named)
