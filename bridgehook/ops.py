"""Operations commands: dead letters, replays, resyncs and reconciliation (status: bridgehook.status).

Named the way RQ's own CLI names things. Tables for people, ``--json`` lines for scripts.
Exit codes: 0 done, 1 something failed (or an id is unknown, or Redis is unreachable:
nothing is done then), 2 bad usage. Under ``make run`` the commands find the embedded
Redis through ``.bridgehook/redis.url`` when ``REDIS_URL`` is not set.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, NoReturn, TypeVar

import click
import psycopg
import redis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bridgehook import devenv
from bridgehook.exits import Exit, fail
from service.events import normalise_type
from service.sealing import SealError
from service.settings import Settings, SettingsError
from workers.codec import CodecError, codec_from_settings
from workers.db import Database
from workers.deadletters import DeadLetter, DeadLetters, Filters, UnknownId, redact, traceback_of
from workers.providers import PROVIDERS, subject
from workers.replay import Enqueuer, from_ledger
from workers.schema import SchemaNotReady, require_current
from workers.storage import TEMPORARY_STATUSES, Storage

F = TypeVar("F", bound=Callable[..., Any])
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
CONFIRM_ABOVE = 10


class When(click.ParamType):  # type: ignore[type-arg]
    """``30m``, ``2h``, ``3d``, ``1w`` ago, or an ISO date/time (UTC unless it says otherwise)."""

    name = "WHEN"
    _AGO = re.compile(r"^(\d+)([smhdw])$")
    _UNITS: ClassVar[dict[str, str]] = {
        "s": "seconds",
        "m": "minutes",
        "h": "hours",
        "d": "days",
        "w": "weeks",
    }

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        ago = self._AGO.match(text)
        if ago:
            return datetime.now(UTC) - timedelta(**{self._UNITS[ago[2]]: int(ago[1])})
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{text!r} is neither a duration ago (30m, 2h, 3d) nor an ISO date/time", param, ctx)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class Duration(When):
    name = "AGE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:  # type: ignore[override]
        ago = self._AGO.match(str(value).strip())
        if not ago:
            self.fail(f"{value!r} is not a duration such as 30m, 6h, 2d", param, ctx)
        return timedelta(**{self._UNITS[ago[2]]: int(ago[1])})


class PerSecond(click.ParamType):  # type: ignore[type-arg]
    """``20``, ``20/s`` or ``600/m``: a rate in operations per second."""

    name = "N/s"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        count, _, unit = str(value).strip().partition("/")
        seconds = {"": 1, "s": 1, "m": 60, "h": 3600}.get(unit.strip())
        try:
            rate = float(count) / seconds if seconds else -1.0
        except ValueError:
            rate = -1.0
        if rate <= 0:
            self.fail(f"{value!r} is not a rate such as 20/s or 600/m", param, ctx)
        return rate


PROVIDER_OPTION = click.option(
    "--provider", type=click.Choice(PROVIDERS), help="Only this provider's events (default: both)."
)
ITEM_HELP = "Item id (Powens's connection N is item -N)."


def filter_options(f: F) -> F:
    for option in reversed(
        [
            PROVIDER_OPTION,
            click.option("--type", "type_", help="Event type, e.g. item.refreshed or connection.synced."),
            click.option("--item", "item_id", type=int, help=ITEM_HELP),
            click.option("--since", type=When(), help="Received at or after (30m, 2h, 3d, or ISO)."),
            click.option("--until", type=When(), help="Received before."),
            click.option("--error", help="Text the last error contains."),
            click.option("--limit", type=click.IntRange(min=1), help="At most this many, oldest first."),
        ]
    ):
        f = option(f)
    return f


def _filters(kw: dict[str, Any]) -> Filters:
    names = ("type_", "item_id", "since", "until", "error", "limit", "provider")
    return Filters(*(kw.get(name) for name in names))


def settings() -> Settings:
    devenv.adopt_local_state(os.environ)
    try:
        loaded = Settings.from_env()
        loaded.require("REDIS_URL", "ENCRYPTION_KEYS")
    except SettingsError as exc:
        fail(str(exc), Exit.USAGE)
    return loaded


@contextmanager
def ops() -> Iterator[tuple[Settings, redis.Redis, Storage]]:
    """Redis (checked) and the database, with one clear line when either is unreachable."""
    s = settings()
    connection = redis_connection(s)
    db = open_database(s)
    try:
        yield s, connection, Storage(db, codec_from_settings(s))
    # What a command meets midway that we know (issue #17: a key missing from ENCRYPTION_KEYS dumped a
    # traceback): one line naming it and what to do, as for the checks above. Anything else is a bug.
    except CodecError as exc:
        key_missing(exc)
    except SealError as exc:
        fail(str(exc), Exit.FAILED)  # each names the variable to set
    except redis.RedisError as exc:
        fail(
            f"Redis at {s.redis_url_for_logs} failed: {exc}; check it, then run the command again",
            Exit.FAILED,
        )
    except DATABASE_ERRORS as exc:
        database_failed(s, exc)
    finally:
        db.close()
        connection.close()


DATABASE_ERRORS = (psycopg.Error, sqlite3.Error)


def redis_connection(s: Settings) -> redis.Redis:
    """Redis (REDIS_URL's), answering, or one line saying it is unreachable (exit 1)."""
    assert s.redis_url is not None
    connection = redis.Redis.from_url(s.redis_url, socket_connect_timeout=5, socket_timeout=30)
    try:
        connection.ping()
    except redis.RedisError as exc:
        fail(
            f"Redis at {s.redis_url_for_logs} is unreachable: {exc}; check it (or REDIS_URL), "
            "then run the command again",
            Exit.FAILED,
        )
    return connection


def open_database(s: Settings, *, migrate: bool = False) -> Database:
    """The database a command needs (DATABASE_URL's, or ``migrate``: `db upgrade`'s), or one line
    saying why not.

    A URL that cannot work as written is configuration (exit 2): a SQLite file whose directory cannot
    be made or written, a malformed PostgreSQL URL. A server that does not answer or refuses us, or a
    schema `db upgrade` has not brought, is a failure (exit 1) that the line says how to mend."""
    where = s.migrate_url_for_logs if migrate else s.database_url_for_logs
    variable = "DATABASE_URL_MIGRATE" if migrate and s.database_url_migrate else "DATABASE_URL"
    try:
        db = Database.from_url(s.migrate_url if migrate else s.database_url)
    except (OSError, *DATABASE_ERRORS) as exc:
        if isinstance(exc, OSError | psycopg.ProgrammingError) or "unable to open" in str(exc):
            fail(f"{variable}: cannot open {where}: {exc}; set it to a usable database", Exit.USAGE)
        fail(
            f"database {where} is unreachable: {type(exc).__name__}: {exc}; "
            "check it, then run the command again",
            Exit.FAILED,
        )
    if migrate:  # what `db upgrade` opens: the schema is what it brings
        return db
    try:
        require_current(db)
    except (SchemaNotReady, *DATABASE_ERRORS) as exc:
        db.close()
        if isinstance(exc, SchemaNotReady):
            fail(str(exc), Exit.FAILED)
        database_failed(s, exc)
    return db


def database_failed(s: Settings, exc: Exception, where: str | None = None) -> NoReturn:
    """The database (``where``, else DATABASE_URL's) failed midway through a command: one line, not a
    traceback."""
    fail(
        f"database {where or s.database_url_for_logs} failed: {type(exc).__name__}: {exc}; "
        "check it, then run the command again",
        Exit.FAILED,
    )


def key_missing(exc: CodecError, done: str = "") -> NoReturn:
    """A stored value names a key ENCRYPTION_KEYS does not list (or does not authenticate); ``done``
    says what the command did before it met the value."""
    then = f"; {done}" if done else ""
    fail(f"{exc}: add the key to ENCRYPTION_KEYS (docs/operations.md, Key rotation){then}", Exit.FAILED)


def age(when: datetime | None) -> str:
    """``5m ago``, or ``in 5m`` for a time to come (a scheduled retry)."""
    if when is None:
        return "?"
    seconds = int((datetime.now(UTC) - when).total_seconds())
    span = f"{abs(seconds)}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            span = f"{abs(seconds) // size}{unit}"
            break
    return f"in {span}" if seconds < 0 else f"{span} ago"


def _confirm(verb: str, n: int, yes: bool) -> None:
    if n > CONFIRM_ABOVE and not yes:
        click.confirm(f"{verb} {n} events?", abort=True)


# -- dlq ------------------------------------------------------------------------------------------


@click.group()
def dlq() -> None:
    """Dead letters: jobs in RQ's failed-job registry, with their webhook_events rows."""


@dlq.command("list")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(as_json: bool, **kw: Any) -> None:
    """One line per failed event: id, type, item, received, attempts, last error."""
    with ops() as (s, r, storage):
        letters = DeadLetters(r, s.queue_name, storage).select(_filters(kw))
    if as_json:
        for d in letters:
            click.echo(json.dumps(d.as_json()))
        return
    table = Table(
        "id", "type", "item", "received", "attempts", "last error", title=f"{len(letters)} dead letter(s)"
    )
    for d in letters:
        table.add_row(
            d.id[:12], d.type, str(d.item_id or ""), age(d.received_at), str(d.attempts), d.error[:70]
        )
    console.print(table)


@dlq.command("show")
@click.argument("job_id")
def dlq_show(job_id: str) -> None:
    """The whole record: event (bank data redacted), every attempt, the last traceback."""
    with ops() as (s, r, storage):
        letters = DeadLetters(r, s.queue_name, storage)
        try:
            [full] = letters.resolve([job_id])
        except UnknownId as exc:
            fail(str(exc), Exit.FAILED)
        [d] = letters.load([full])
        attempts = letters.attempts(d.job) if d.job is not None else []
    console.print(f"[bold]{d.id}[/bold]  {d.type}  item {d.item_id or '-'}")
    console.print(f"received  {d.received_at.isoformat() if d.received_at else '?'}  ({age(d.received_at)})")
    console.print(f"failed    {d.failed_at.isoformat() if d.failed_at else '?'}   attempts {d.attempts}")
    console.print("event (bank data redacted):")
    console.print(json.dumps(redact(d.event), indent=2, sort_keys=True, default=str))
    table = Table("#", "at", "outcome", "error", title="attempts")
    for n, a in enumerate(attempts, 1):
        table.add_row(str(n), a["at"].isoformat() if a["at"] else "?", a["outcome"], a["error"][:90])
    console.print(table)
    console.print("last traceback:")
    console.print(traceback_of(d.job) or "(none kept)", markup=False)


def _say_which(ids: Sequence[str], all_: bool, kw: dict[str, Any]) -> None:
    """A usage error before any connection: whether Redis answers does not change it."""
    if not ids and not all_ and _filters(kw) == Filters():
        fail(
            "say which: give IDs, --all, or a filter (--type, --item, --since, --until, --error)", Exit.USAGE
        )


def _selection(letters: DeadLetters, ids: Sequence[str], all_: bool, kw: dict[str, Any]) -> list[DeadLetter]:
    filters = _filters(kw)
    if ids:
        try:
            return letters.load(letters.resolve(ids))
        except UnknownId as exc:
            fail(f"{exc}; nothing was done", Exit.FAILED)
    return letters.select(filters)


def _would(verb: str, chosen: list[DeadLetter]) -> None:
    """What a dry run prints: how many, and which."""
    click.echo(f"would {verb} {len(chosen)} dead letter(s)")
    for d in chosen:
        click.echo(f"  {d.id}  {d.type}  item {d.item_id or '-'}")


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every dead letter.")
@filter_options
@click.option("--dry-run", is_flag=True, help="Say how many and which would go; change nothing.")
@click.option("--yes", "-y", is_flag=True, help=f"Do not ask, even above {CONFIRM_ABOVE}.")
@click.option(
    "--rate",
    type=PerSecond(),
    default="20/s",
    show_default=True,
    help="At most this many requeues (20/s, 600/m): the jobs share Bridge's request budget.",
)
def dlq_replay(ids: tuple[str, ...], all_: bool, dry_run: bool, yes: bool, rate: float, **kw: Any) -> None:
    """Requeue dead letters (idempotent; safe to interrupt and run again)."""
    _say_which(ids, all_, kw)
    with ops() as (s, r, storage):
        letters = DeadLetters(r, s.queue_name, storage)
        chosen = _selection(letters, ids, all_, kw)
        if dry_run:
            _would("replay", chosen)
            return
        _confirm("Replay", len(chosen), yes)
        with Progress(console=console, disable=not console.is_terminal or len(chosen) < 2) as bar:
            task = bar.add_task("replaying", total=len(chosen))
            outcomes = letters.replay(
                [d.id for d in chosen], rate=rate, progress=lambda _id, _o: bar.advance(task)
            )
    click.echo(f"requeued {outcomes['requeued']}, missing {outcomes['missing']}")
    if outcomes["missing"]:
        sys.exit(Exit.FAILED)


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every dead letter.")
@filter_options
@click.option("--dry-run", is_flag=True, help="Say how many and which would go; change nothing.")
@click.option("--yes", "-y", is_flag=True, help=f"Do not ask, even above {CONFIRM_ABOVE}.")
def dlq_purge(ids: tuple[str, ...], all_: bool, dry_run: bool, yes: bool, **kw: Any) -> None:
    """Remove dead letters from the registry; their webhook_events rows stay, marked purged."""
    _say_which(ids, all_, kw)
    with ops() as (s, r, storage):
        letters = DeadLetters(r, s.queue_name, storage)
        chosen = _selection(letters, ids, all_, kw)
        if dry_run:
            _would("purge", chosen)
            return
        _confirm("Purge", len(chosen), yes)
        click.echo(f"purged {letters.purge(chosen)}")


# -- events replay, resync, reconcile ---------------------------------------------------------------


@click.group()
def events() -> None:
    """Archived events (the receiver's stream, or the webhook_events table)."""


@events.command("replay")
@click.option("--since", type=When(), required=True, help="Received at or after (30m, 2h, 3d, or ISO).")
@click.option("--until", type=When(), help="Received before.")
@PROVIDER_OPTION
@click.option("--type", "type_", help="Only this event type.")
@click.option("--item", "item_id", type=int, help=ITEM_HELP)
@click.option(
    "--from",
    "source",
    type=click.Choice(["archive", "ledger"]),
    default="archive",
    show_default=True,
    help="The receiver's archive stream, or webhook_events (beyond the archive's reach).",
)
@click.option("--dry-run", is_flag=True, help="Say how many and which would go; change nothing.")
@click.option("--yes", "-y", is_flag=True, help=f"Do not ask, even above {CONFIRM_ABOVE}.")
def events_replay(
    since: datetime,
    until: datetime | None,
    provider: str | None,
    type_: str | None,
    item_id: int | None,
    source: str,
    dry_run: bool,
    yes: bool,
) -> None:
    """Re-enqueue the events received in a time window ("we lost the workers for an hour")."""
    with ops() as (s, r, storage):
        enqueuer = Enqueuer(r, s)
        archived = source == "archive"
        found = enqueuer.archived(since, until, provider) if archived else from_ledger(storage, since, until)
        chosen = [
            (event_id, event, received)
            for event_id, event, received in found
            if (type_ is None or normalise_type(str(event.get("type"))) == normalise_type(type_))
            and (provider is None or subject(event).provider == provider)
            and (item_id is None or subject(event).item_id == item_id)
        ]
        if dry_run:
            click.echo(f"would replay {len(chosen)} event(s) from the {source}")
            for event_id, event, _ in chosen:
                click.echo(f"  {event_id}  {event.get('type')}  item {subject(event).item_id}")
            return
        _confirm("Replay", len(chosen), yes)
        outcomes: dict[str, int] = {}
        for event_id, event, received in chosen:
            outcome = enqueuer.event(event_id, event, received)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    click.echo(", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "nothing to replay")


@click.command()
@click.option("--item", "item_id", type=int, help="One item (its user comes from the items table).")
@click.option(
    "--user", "user_uuid", help="Every item Bridge lists for this user, but those whose bank is down."
)
@click.option(
    "--all-stale", "stale", type=Duration(), help="Every usable item not synced for this long (6h, 2d)."
)
@click.option("--dry-run", is_flag=True, help="Say what would be enqueued; change nothing.")
def resync(item_id: int | None, user_uuid: str | None, stale: timedelta | None, dry_run: bool) -> None:
    """Enqueue a full resync (cursors reset), without any webhook."""
    if sum(x is not None for x in (item_id, user_uuid, stale)) != 1:
        fail("give exactly one of --item ID, --user UUID, --all-stale AGE", Exit.USAGE)
    from workers.reconcile import stale_items

    with ops() as (s, r, storage):
        enqueuer = Enqueuer(r, s)
        if user_uuid is not None:
            with storage.transaction() as tx:
                held = tx.execute(
                    "SELECT id, status FROM items WHERE user_uuid = %s", (user_uuid,)
                ).fetchall()
            skip = _bank_down(held)
            click.echo(
                f"would resync user {user_uuid}"
                if dry_run
                else f"user {user_uuid}: {enqueuer.resync_user(user_uuid, skip)}"
            )
            return
        if item_id is not None:
            with storage.transaction() as tx:
                row = tx.execute("SELECT user_uuid, status FROM items WHERE id = %s", (item_id,)).fetchone()
            if row is None:
                fail(
                    f"item {item_id} is not in the items table; use --user UUID to resync a user's items",
                    Exit.FAILED,
                )
            if _bank_down([(item_id, row[1])]):
                return
            targets = [(item_id, str(row[0]))]
        else:
            assert stale is not None
            targets = stale_items(storage, datetime.now(UTC), stale)
        for target, user in targets:
            click.echo(
                f"item {target}: " + ("would resync" if dry_run else enqueuer.resync_item(target, user))
            )
        if not targets:
            click.echo("nothing to resync")


def _bank_down(items: Sequence[tuple[int, int | None]]) -> list[int]:
    """The items, of (id, status), whose bank is unavailable (1003, -2, -3), each said in one line:
    a resync job would fail on them and retry into the dead letters (issue #17), and Bridge's
    item.refreshed when the bank is back syncs them anyway."""
    down = [(item, status) for item, status in items if status in TEMPORARY_STATUSES]
    for item, status in down:
        click.echo(
            f"item {item}: skipped: its bank is unavailable (status {status}); it syncs when "
            "Bridge sends item.refreshed, or resync it once `bridgehook status` shows it back"
        )
    return [item for item, _ in down]


@click.command()
def reconcile() -> None:
    """Enqueue a reconciliation sweep now (the scheduler enqueues one every period)."""
    with ops() as (s, r, _):
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        outcome = Enqueuer(r, s).sweep(stamp)
    click.echo(f"sweep reconcile-manual-{stamp}: {outcome}")
