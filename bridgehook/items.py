"""``bridgehook items attention``: the items that need their user (or Bridge's support), by action.

The same words as the API's ``action`` (:mod:`workers.actions`), oldest first: what has waited
longest comes first. Exit 1 when any item needs attention, 0 when none does, so that a cron job or
a CI step can say so (``bridgehook items attention --json || notify``).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta

import click
from rich.table import Table

from bridgehook.exits import Exit
from bridgehook.ops import age, console, ops
from workers.actions import attention


@click.group()
def items() -> None:
    """Items as the application sees them: what each one needs."""


@items.command("attention")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the items, and a count per action.")
def items_attention(as_json: bool) -> None:
    """List the items that need an action, oldest first (exit 1 when there is any)."""
    with ops() as (s, _, storage):
        found = attention(storage, datetime.now(UTC), timedelta(days=s.consent_warning_days))
    if as_json:
        by_action: dict[str, int] = {}
        for item in found:
            by_action[item["action"]] = by_action.get(item["action"], 0) + 1
        click.echo(json.dumps({"items": found, "by_action": by_action}, default=str))
    else:
        table = Table("item", "action", "status", "since", "user", "consent ends")
        table.title = f"{len(found)} item(s)"
        for item in found:
            ends = item["consent_expires_at"]
            table.add_row(
                str(item["item_id"]), item["action"], str(item["status"]), age(item["since"]),
                item["external_user_id"] or item["user_uuid"], ends.date().isoformat() if ends else "",
            )  # fmt: skip
        console.print(table)
    sys.exit(int(Exit.FAILED) if found else 0)
