"""Encryption at rest: the codec, the settings that require it, what lands in the tables, key
rotation (resumable, explicit about unknown keys) and the decrypted read API and command."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bridgehook import devenv
from bridgehook.cli import main
from fakebridge.world import World
from service.settings import Settings, SettingsError
from tests.harness import Harness, worker_settings
from tests.support import TEST_ENCRYPTION_KEY
from workers.codec import (
    AESGCMCodec,
    PlainCodec,
    TamperedValueError,
    UnknownKeyError,
    codec_from_settings,
    generate_key,
    key_id,
)
from workers.reader import Reader
from workers.rotation import Rotation

NEW_KEY = "Qy0yY2kq3m4rKj8cC0bBvXU7H0G4sWQbN8l2y7l1vZE="
IBAN = "FR7630006000011234567890189"


def key(text: str) -> bytes:
    return base64.urlsafe_b64decode(text)


# -- the codec ----------------------------------------------------------------------------------------


def test_values_round_trip_and_never_show_the_plaintext() -> None:
    codec = AESGCMCodec([key(TEST_ENCRYPTION_KEY)])
    sealed = codec.encode(IBAN, "accounts.iban")
    assert sealed is not None and sealed.startswith(f"bh1:{key_id(key(TEST_ENCRYPTION_KEY))}:")
    assert IBAN not in sealed and "1234567890" not in sealed
    assert codec.decode(sealed, "accounts.iban") == IBAN
    assert codec.encode(IBAN, "accounts.iban") != sealed  # a fresh nonce each time
    assert codec.encode(None, "accounts.iban") is None and codec.decode(None, "accounts.iban") is None
    assert codec.decode("Compte courant", "accounts.name") == "Compte courant"  # plaintext from before
    assert TEST_ENCRYPTION_KEY not in repr(codec) and "Secret" not in repr(codec)


def test_tampered_moved_and_foreign_values_are_errors_not_garbage() -> None:
    codec = AESGCMCodec([key(TEST_ENCRYPTION_KEY)])
    sealed = codec.encode(IBAN, "accounts.iban")
    assert sealed is not None
    with pytest.raises(TamperedValueError, match=r"accounts\.name"):
        codec.decode(sealed, "accounts.name")  # the column is bound in as associated data
    head, _, sealed_b64 = sealed.rpartition(":")
    raw = bytearray(base64.b64decode(sealed_b64))
    raw[len(raw) // 2] ^= 0x01  # one bit of the ciphertext (a base64 letter may only touch padding bits)
    flipped = f"{head}:{base64.b64encode(bytes(raw)).decode()}"
    with pytest.raises(TamperedValueError):
        codec.decode(flipped, "accounts.iban")
    with pytest.raises(TamperedValueError):
        codec.decode(sealed[:-12], "accounts.iban")
    other = AESGCMCodec([key(NEW_KEY)])
    with pytest.raises(UnknownKeyError, match=key_id(key(TEST_ENCRYPTION_KEY))):
        other.decode(sealed, "accounts.iban")
    with pytest.raises(UnknownKeyError, match="set ENCRYPTION_KEYS"):
        PlainCodec().decode(sealed, "accounts.iban")
    # The old key still decrypts when listed after the new one; the new one encrypts.
    both = AESGCMCodec([key(NEW_KEY), key(TEST_ENCRYPTION_KEY)])
    assert both.decode(sealed, "accounts.iban") == IBAN
    assert not both.is_current(sealed) and both.is_current(both.encode(IBAN, "accounts.iban"))


def test_keys_are_checked_at_start_up_without_showing_them() -> None:
    with pytest.raises(SettingsError, match=r"^ENCRYPTION_KEYS: each key must be 32 bytes") as bad:
        Settings.from_env({"ENCRYPTION_KEYS": "not-a-key-at-all"})
    assert "not-a-key" not in str(bad.value)
    with pytest.raises(SettingsError, match="listed twice"):
        Settings.from_env({"ENCRYPTION_KEYS": f"{NEW_KEY},{NEW_KEY}"})
    with pytest.raises(SettingsError, match=r"^ENCRYPTION_KEYS: required; .*ALLOW_PLAINTEXT_STORAGE=1"):
        codec_from_settings(Settings.from_env({}))
    assert isinstance(codec_from_settings(Settings.from_env({"ALLOW_PLAINTEXT_STORAGE": "1"})), PlainCodec)
    with pytest.raises(SettingsError, match="ALLOW_PLAINTEXT_STORAGE: expected 1 or 0"):
        Settings.from_env({"ALLOW_PLAINTEXT_STORAGE": "maybe"})
    settings = Settings.from_env({"ENCRYPTION_KEYS": f"{NEW_KEY}, {TEST_ENCRYPTION_KEY}"})
    assert NEW_KEY not in repr(settings) and TEST_ENCRYPTION_KEY not in repr(settings)
    codec = codec_from_settings(settings)
    assert isinstance(codec, AESGCMCodec) and codec.current_key_id == key_id(key(NEW_KEY))


def test_the_worker_refuses_to_start_without_keys(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("ENCRYPTION_KEYS", "ALLOW_PLAINTEXT_STORAGE")},
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "BRIDGE_CLIENT_ID": "id",
        "BRIDGE_CLIENT_SECRET": "secret-secret",
        "BRIDGEHOOK_HOME": str(tmp_path),
    }
    for command in (["worker", "--burst"], ["scheduler"], ["dlq", "list"]):
        done = subprocess.run(
            [sys.executable, "-m", "bridgehook", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (command, done.stderr)
        assert "ENCRYPTION_KEYS: required" in done.stderr, command


def test_generate_prints_a_new_valid_key() -> None:
    first, second = (CliRunner().invoke(main, ["keys", "generate"]).output.strip() for _ in range(2))
    assert first != second
    assert all(len(key(k)) == 32 for k in (first, second))
    assert Settings.from_env({"ENCRYPTION_KEYS": first}).encryption_keys


# -- the tables, rotation and reads ---------------------------------------------------------------------


def synced(harness: Harness, world: World, per_account: int = 40) -> dict[str, Any]:
    user = world.add_user(external_user_id="app-user-1")
    item = world.add_item(user)
    accounts = [world.add_account(item, name=f"Compte joint {n}", iban=f"FR76300060000112345678{n:05d}")
                for n in range(3)]  # fmt: skip
    for account in accounts:
        world.add_transactions(account, per_account)
    assert harness.send(world.event_item_created(item)) == "queued"
    harness.drain()
    assert harness.tables() == harness.truth()
    return {"item": item, "accounts": accounts}


def bank_values(world: World) -> set[str]:
    snap = world.snapshot()
    values = {a[f] for a in snap["accounts"].values() for f in ("name", "iban") if a.get(f)}
    fields = ("clean_description", "provider_description")
    values |= {t[f] for t in snap["transactions"].values() for f in fields if t.get(f)}
    return {v for v in values if len(v) >= 8}  # a shorter one (EDF) may occur in base64 by chance


def test_bank_data_is_ciphertext_in_the_tables(harness: Harness, world: World) -> None:
    synced(harness, world)
    raw = harness.rows("SELECT name, iban FROM accounts") + harness.rows(
        "SELECT clean_description, provider_description FROM transactions"
    )
    raw += harness.rows("SELECT body FROM webhook_events")
    stored = [v for row in raw for v in row if v is not None]
    assert len(stored) > 200 and all(v.startswith("bh1:") for v in stored)
    dump = "\n".join(stored)
    assert not [v for v in bank_values(world) if v in dump]


def rotation_settings(harness: Harness, keys: str) -> Settings:
    s = harness.settings
    assert s.redis_url is not None
    return worker_settings(s.redis_url, s.database_url, s.bridge_api_url, harness.world, ENCRYPTION_KEYS=keys)


def cli_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    keys = ",".join(k.reveal() for k in settings.encryption_keys)
    return {"DATABASE_URL": settings.database_url, "ENCRYPTION_KEYS": keys, "BRIDGEHOOK_HOME": str(tmp_path)}


def test_rotation_reencrypts_every_row_and_resumes(harness: Harness, world: World, tmp_path: Path) -> None:
    synced(harness, world)
    truth = harness.tables()
    rotated = rotation_settings(harness, f"{NEW_KEY},{TEST_ENCRYPTION_KEY}")
    codec = codec_from_settings(rotated)
    assert isinstance(codec, AESGCMCodec)
    rotation = Rotation(harness.db, codec, batch_size=7)
    before = rotation.pending()
    assert before == {"accounts": 3, "transactions": 120, "webhook_events": 1, "user_tokens": 0}

    class Interrupted(Exception):
        pass

    seen: list[int] = []

    def stop_after_two_batches(table: str, n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        rotation.run(stop_after_two_batches)
    partly = rotation.pending()
    assert sum(partly.values()) == sum(before.values()) - 3 - 7  # the committed batches stay done

    env = cli_env(rotated, tmp_path)
    result = CliRunner().invoke(main, ["keys", "rotate", "--batch-size", "50"], env=env)
    assert result.exit_code == 0, result.output
    assert "rotated 114 rows; 0 left" in result.output
    assert rotation.pending() == {"accounts": 0, "transactions": 0, "webhook_events": 0, "user_tokens": 0}

    # Only the new key is needed now: the old one can be dropped.
    harness.reader = Reader(harness.db, codec_from_settings(rotation_settings(harness, NEW_KEY)))
    assert harness.tables() == truth
    again = CliRunner().invoke(main, ["keys", "rotate"], env=env)
    assert again.exit_code == 0 and "0 rows to rotate" in again.output


def test_rotation_encrypts_plaintext_rows_and_stops_at_an_unknown_key(
    harness: Harness, world: World, tmp_path: Path
) -> None:
    synced(harness, world)
    [(account,)] = harness.rows("SELECT min(id) FROM accounts")
    with harness.db.transaction() as tx:  # a row from before encryption, and one from a lost key
        tx.execute("UPDATE accounts SET name = %s WHERE id = %s", ("Compte en clair", account))
        foreign = AESGCMCodec([key(generate_key())]).encode("Autre", "transactions.clean_description")
        first = "(SELECT min(id) FROM transactions)"
        tx.execute(f"UPDATE transactions SET clean_description = %s WHERE id = {first}", (foreign,))  # noqa: S608
    env = cli_env(harness.settings, tmp_path)
    assert harness.reader.account(account)["name"] == "Compte en clair"  # type: ignore[index]

    # Issue #17: the dry run counted the row and said nothing of its key. It decrypts what it counts
    # and stops at that row with the real run's line and exit code, changing nothing.
    dry = CliRunner().invoke(main, ["keys", "rotate", "--dry-run"], env=env)
    assert dry.exit_code == 1 and "1 transactions" in dry.stderr
    [why] = [line for line in dry.stderr.splitlines() if line.startswith("bridgehook:")]
    assert why.endswith("; nothing was changed (dry run)")
    assert harness.rows("SELECT name FROM accounts WHERE id = %s", (account,)) == [("Compte en clair",)]

    failed = CliRunner().invoke(main, ["keys", "rotate"], env=env)
    assert failed.exit_code == 1
    assert "transactions id=" in failed.output and "ENCRYPTION_KEYS does not list" in failed.output
    assert failed.stderr.splitlines()[-1].startswith(why.removesuffix("; nothing was changed (dry run)"))
    [(name,)] = harness.rows("SELECT name FROM accounts WHERE id = %s", (account,))
    assert name.startswith("bh1:")  # the accounts before it were rotated
    assert harness.reader.account(account)["name"] == "Compte en clair"  # type: ignore[index]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # `make run`'s: SQLite in its home
def test_rotating_the_local_stacks_key_keeps_its_key_file_in_step(
    harness: Harness, world: World, tmp_path: Path
) -> None:
    """Issue #17: after `ENCRYPTION_KEYS=NEW,OLD bridgehook keys rotate` on `make run`'s database,
    .bridgehook/encryption-key still held OLD: `accounts show` failed and the running worker went on
    writing under OLD. Now the file gets NEW first (OLD after it, for what OLD wrote), and while a
    `bridgehook dev` started with OLD runs, nothing is rotated until it is restarted."""
    b = synced(harness, world, per_account=5)
    home = tmp_path  # the harness's SQLite database is home/bridgehook.db, as `make run`'s
    assert harness.settings.database_url == devenv.local_database_url(home)
    keyfile = home / "encryption-key"
    keyfile.write_text(TEST_ENCRYPTION_KEY + "\n")
    local = {"BRIDGEHOOK_HOME": str(home), "DATABASE_URL": None, "ENCRYPTION_KEYS": None}
    both = {**local, "ENCRYPTION_KEYS": f"{NEW_KEY},{TEST_ENCRYPTION_KEY}"}
    old_id, new_id = key_id(key(TEST_ENCRYPTION_KEY)), key_id(key(NEW_KEY))

    with devenv.claim(home, print) as stack:  # a running `bridgehook dev`, started with OLD
        stack.note(key=devenv.first_key_id(keyfile.read_text()))
        dry = CliRunner().invoke(main, ["keys", "rotate", "--dry-run"], env=both)
        assert dry.exit_code == 0, dry.output
        assert f"would put key {new_id} first in {keyfile}" in dry.stderr and "would stop" in dry.stderr
        assert keyfile.read_text().strip() == TEST_ENCRYPTION_KEY
        refused = CliRunner().invoke(main, ["keys", "rotate"], env=both)
        assert refused.exit_code == 1
        assert f"(pid {os.getpid()}) encrypts with key {old_id}, not {new_id}: restart it" in refused.stderr
        assert refused.stderr.splitlines()[-1].startswith("bridgehook: the `bridgehook dev` running from")
        assert keyfile.read_text().strip() == f"{NEW_KEY},{TEST_ENCRYPTION_KEY}"
        assert keyfile.stat().st_mode & 0o777 == 0o600
        assert sum(Rotation(harness.db, AESGCMCodec([key(NEW_KEY)])).pending().values()) == 19

    # Restarted (here: stopped), the stack reads NEW,OLD from the file: no key to export any more.
    done = CliRunner().invoke(main, ["keys", "rotate"], env=local)
    assert done.exit_code == 0, done.output
    assert f"key {new_id}: 19 rows to rotate" in done.stderr and "rotated 19 rows; 0 left" in done.stderr
    assert keyfile.read_text().strip() == f"{NEW_KEY},{TEST_ENCRYPTION_KEY}"  # in step: left alone
    shown = CliRunner().invoke(main, ["accounts", "show", str(b["accounts"][0]), "--json"], env=local)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["name"] == "Compte joint 0"
    harness.reader = Reader(harness.db, AESGCMCodec([key(NEW_KEY)]))  # OLD can go now
    assert harness.tables() == harness.truth()


def test_accounts_show_prints_decrypted_values(harness: Harness, world: World, tmp_path: Path) -> None:
    b = synced(harness, world, per_account=15)
    account = b["accounts"][1]
    env = cli_env(harness.settings, tmp_path)
    masked = CliRunner().invoke(main, ["accounts", "show", str(account), "-t", "5"], env=env)
    assert masked.exit_code == 0, masked.output
    assert "Compte joint 1" in masked.output and "FR76 **** 0001" in masked.output
    assert "FR7630006000011234567800001" not in masked.output
    latest = harness.reader.transactions(account, limit=5)
    assert len(latest) == 5 and latest[0]["clean_description"] in masked.output
    shown = CliRunner().invoke(main, ["accounts", "show", str(account), "--reveal", "--json"], env=env)
    data = json.loads(shown.output)
    assert data["iban"] == "FR7630006000011234567800001" and data["name"] == "Compte joint 1"
    assert len(data["transactions"]) == 10
    missing = CliRunner().invoke(main, ["accounts", "show", "999"], env=env)
    assert missing.exit_code == 1 and "no account 999" in missing.output
    # Under a key that is not the rows': one line naming the column and what to do (issue #17).
    foreign = CliRunner().invoke(
        main, ["accounts", "show", str(account)], env={**env, "ENCRYPTION_KEYS": generate_key()}
    )
    assert foreign.exit_code == 1 and foreign.stdout == ""
    assert len(foreign.stderr.splitlines()) == 1 and "ENCRYPTION_KEYS does not list" in foreign.stderr
    assert "add the key to ENCRYPTION_KEYS" in foreign.stderr
