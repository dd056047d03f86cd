"""Commands for the bank data at rest: encryption keys and decrypted reads.

``keys`` needs only the database and ``ENCRYPTION_KEYS``; ``accounts show`` prints decrypted
values to the terminal (IBANs masked unless ``--reveal``) and never to a log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bridgehook import devenv
from bridgehook.exits import Exit, fail
from bridgehook.ops import DATABASE_ERRORS, console, database_failed, key_missing, open_database
from service.settings import Settings, SettingsError
from workers.codec import AESGCMCodec, CodecError, codec_from_settings, generate_key
from workers.reader import Reader


@contextmanager
def reader() -> Iterator[Reader]:
    devenv.adopt_local_state(os.environ)
    try:
        settings = Settings.from_env()
        codec = codec_from_settings(settings)
    except SettingsError as exc:
        fail(str(exc), Exit.USAGE)
    with Reader(open_database(settings), codec) as built:
        try:
            yield built
        except DATABASE_ERRORS as exc:
            database_failed(settings, exc)


# -- keys -------------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Encryption keys of the bank data at rest (ENCRYPTION_KEYS, newest first)."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new key. Put it FIRST in ENCRYPTION_KEYS, keep the old ones after it until
    `bridgehook keys rotate` has run."""
    click.echo(generate_key())


@keys.command("seal-pair")
def keys_seal_pair() -> None:
    """Print a new key pair for Powens's bodies in Redis: BODY_SEAL_PUBLIC_KEY for the receiver, and
    the private key FIRST in BODY_SEAL_PRIVATE_KEYS of the workers and the CLI (keep the old ones
    after it until the archive's age has passed: what was sealed to them is still in Redis)."""
    from service.sealing import generate_pair

    private, public = generate_pair()
    click.echo(f"BODY_SEAL_PUBLIC_KEY={public}\nBODY_SEAL_PRIVATE_KEYS={private}")


@keys.command("rotate")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--dry-run", is_flag=True, help="Count the rows to rotate and decrypt them; change nothing.")
def keys_rotate(batch_size: int, dry_run: bool) -> None:
    """Re-encrypt every encrypted value (and any plaintext one) with the first key.

    Batches commit one by one: interrupted, it resumes where it stopped when run again.
    Safe while workers run (they write with the first key already). On `make run`'s database,
    .bridgehook/encryption-key is kept in step: the first key goes first in it, the old ones stay.
    """
    from workers.rotation import Rotation

    local = devenv.local_keys_file(os.environ)
    with reader() as r:
        if not isinstance(r.codec, AESGCMCodec):
            fail("ENCRYPTION_KEYS is not set: there is no key to rotate to", Exit.USAGE)
        assert isinstance(r.codec, AESGCMCodec)
        if local is not None:
            _local_stack_first(local, r.codec.current_key_id, dry_run)
        rotation = Rotation(r.db, r.codec, batch_size)
        pending = rotation.pending()
        total = sum(pending.values())
        counts = ", ".join(f"{n} {table}" for table, n in pending.items())
        click.echo(f"key {r.codec.current_key_id}: {total} rows to rotate ({counts})", err=True)
        if dry_run:
            try:  # the real run stops at a value it cannot decrypt: say so now, as it would
                rotation.check()
            except CodecError as exc:
                key_missing(exc, "nothing was changed (dry run)")
            return
        if total == 0:
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            tasks = {table: bar.add_task(table, total=n) for table, n in pending.items() if n}
            try:
                done = rotation.run(lambda table, n: bar.advance(tasks[table], n) if table in tasks else None)
            except CodecError as exc:
                key_missing(exc, "the rows before it were rotated, none after it")
        left = sum(rotation.pending().values())
        click.echo(f"rotated {done} rows; {left} left" + (" (run again)" if left else ""), err=True)
        if left:
            raise SystemExit(Exit.FAILED)


def _local_stack_first(path: Path, current: str, dry_run: bool) -> None:
    """On `make run`'s database, put the key being rotated to first in its key file (the file's other
    keys after it, so that what they wrote stays readable), and stop while a running `bridgehook dev`
    still encrypts with another: its worker would write under the old key again."""
    keys = [k.reveal() for k in Settings.from_env().encryption_keys]
    listed = [k.strip() for k in path.read_text().strip().split(",") if k.strip()]
    wanted = [*keys, *(k for k in listed if k not in keys)]
    if wanted[: len(keys)] != listed[: len(keys)]:
        if dry_run:
            click.echo(f"would put key {current} first in {path}", err=True)
        else:
            devenv.save_local_keys(path, wanted)
            click.echo(f"{path}: key {current} first, then the {len(wanted) - 1} older key(s)", err=True)
    running = devenv.running_key(path.parent)
    if running is not None and running[1] != current:
        stale = (
            f"the `bridgehook dev` running from {path.parent} (pid {running[0]}) encrypts with key "
            f"{running[1] or '?'}, not {current}: restart it (Ctrl-C, then `make run`), then run "
            "`bridgehook keys rotate` again"
        )
        if not dry_run:
            fail(stale, Exit.FAILED)
        click.echo(f"would stop: {stale}", err=True)


# -- accounts ---------------------------------------------------------------------------------------


@click.group()
def accounts() -> None:
    """Accounts and transactions, decrypted."""


def mask_iban(iban: str | None) -> str:
    if not iban:
        return ""
    compact = iban.replace(" ", "")
    return f"{compact[:4]} **** {compact[-4:]}" if len(compact) > 8 else "****"


@accounts.command("show")
@click.argument("account_id", type=int)
@click.option("--transactions", "-t", "limit", default=10, show_default=True, help="Latest transactions.")
@click.option("--reveal", is_flag=True, help="Print the whole IBAN (masked by default).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the account and its transactions.")
def accounts_show(account_id: int, limit: int, reveal: bool, as_json: bool) -> None:
    """One account with its latest transactions, bank data decrypted."""
    with reader() as r:
        try:
            account = r.account(account_id)
            transactions = r.transactions(account_id, limit=limit) if account else []
        except CodecError as exc:
            key_missing(exc)
    if account is None:
        fail(f"no account {account_id}", Exit.FAILED)
    assert account is not None
    if not reveal:
        account["iban"] = mask_iban(account["iban"])
    if as_json:
        click.echo(json.dumps({**account, "transactions": transactions}, default=str))
        return
    summary = Table(show_header=False, title=f"account {account_id}")
    for name, value in account.items():
        summary.add_row(name, "" if value is None else str(value))
    console.print(summary)
    table = Table("date", "amount", "description", "category", "id", title=f"latest {len(transactions)}")
    for t in transactions:
        table.add_row(
            str(t["date"]),
            f"{t['amount']} {t['currency_code'] or ''}",
            _description(t),
            str(t["category_id"]),
            str(t["id"]),
        )
    console.print(table)


def _description(t: dict[str, Any]) -> str:
    return str(t["clean_description"] or t["provider_description"] or "")
