"""``bridgehook status`` and ``bridgehook retries``: what runs, what failed, and are we missing data?

Beside queues, workers, dead letters and items, status says when the last delivery was accepted,
how many were rejected in the last hour and why, when the last reconciliation sweep ran and what
it found, and when the soonest scheduled retry runs; ``retries`` lists those retries.

Exit codes: status is a report, not a judgement. It exits 0 whenever it could read Redis and the
database, whatever it shows (dead letters, rejections, a sweep that never ran: the alerts of
docs/deploy.md judge those, with thresholds and durations a single reading cannot have; rejections
in particular are mostly other people's requests, forbidden or forged, and nothing we lost). It
exits 1 only when Redis or the database could not be read (one line on stderr), 2 on bad usage.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click
from rich.table import Table

from bridgehook.ops import age, console, ops
from service.settings import Settings
from workers.observe import DeliveryFigures, Status


@click.command()
@click.option("--json", "as_json", is_flag=True, help="The same, as one JSON object.")
def status(as_json: bool) -> None:
    """Queues, workers, dead letters, items needing attention and missing data, in one screen."""
    from workers.observe import snapshot

    with ops() as (s, r, storage):
        snap = snapshot(s, r, storage)
    if as_json:
        click.echo(json.dumps(_as_json(snap), default=str))
        return
    q = snap.queues
    console.print(
        f"[bold]queue {s.queue_name}[/bold]  queued {q['queued']}  running {q['started']}  "
        f"scheduled (retries) {q['scheduled']}  deferred {q['deferred']}"
    )
    workers = Table(
        "worker", "state", "current job", "last heartbeat", title=f"{len(snap.workers)} worker(s)"
    )
    for w in snap.workers:
        workers.add_row(w["name"], str(w["state"]), (w["job"] or "")[:12], age(w["heartbeat"]))
    console.print(workers)
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(snap.dead_letters_by_type.items())) or "-"
    console.print(
        f"[bold]dead letters[/bold] {snap.dead_letters}  (oldest {age(snap.oldest_dead_letter)}; "
        f"{by_type})  → bridgehook dlq list"
    )
    items = Table("status", "needs user action", "items", title="items")
    for (code, flagged), n in sorted(snap.items_by_status.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        items.add_row(str(code), "yes" if flagged else "", str(n))
    console.print(items)
    console.print(
        f"stuck in 1003 > 24 h: {len(snap.stuck_1003)} {snap.stuck_1003[:10] or ''}   "
        f"stale: {len(snap.stale)} {snap.stale[:10] or ''}"
    )
    for line in _missing_data(s, snap.deliveries, q["scheduled"]):
        console.print(line, markup=False)


def _as_json(snap: Status) -> dict[str, Any]:
    d, last = snap.deliveries, snap.deliveries.last_accepted
    return {
        "queues": snap.queues,
        "workers": [{**w, "heartbeat": str(w["heartbeat"])} for w in snap.workers],
        "dead_letters": snap.dead_letters,
        "dead_letters_by_type": snap.dead_letters_by_type,
        "oldest_dead_letter": _iso(snap.oldest_dead_letter),
        "needs_user_action": snap.needing_attention,
        "stuck_1003": snap.stuck_1003,
        "stale": snap.stale,
        "items": [
            {"status": k[0], "needs_user_action": k[1], "count": v} for k, v in snap.items_by_status.items()
        ],
        "replays": snap.replays,
        "last_delivery": None if last is None else {**last, "at": _iso(last["at"])},
        "rejected_last_hour": d.rejected_last_hour,
        "last_reconciliation": d.last_reconciliation,
        "scheduled_retries": {"count": snap.queues["scheduled"], "next_attempt": _iso(d.next_retry)},
    }


def _missing_data(s: Settings, d: DeliveryFigures, scheduled: int) -> list[str]:
    """The lines that say whether data may be missing."""
    if d.last_accepted is None:
        days = s.archive_max_age_seconds / 86400
        delivery = f"never (none in the archive, which keeps {days:g} d)"
    else:
        last = d.last_accepted
        delivery = f"{age(last['at'])}  ({_iso(last['at'])}, {last['type']}, {last['decision']})"
    rejected = sum(d.rejected_last_hour.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(d.rejected_last_hour.items(), key=lambda kv: -kv[1]))
    sweep = d.last_reconciliation
    if sweep is None:
        reconciliation = "never  → bridgehook reconcile"
    else:
        finished = _datetime(sweep.get("finished_at"))
        found = ", ".join(f"{k} {v}" for k, v in (sweep.get("counts") or {}).items() if k != "partial")
        what = f"{sweep.get('outcome')}: {sweep.get('error')}" if sweep.get("error") else sweep.get("outcome")
        trigger = f", {sweep['trigger']}" if sweep.get("trigger") else ""
        reconciliation = f"{age(finished)}  ({_iso(finished)}{trigger}) {what}{'; ' + found if found else ''}"
    retries = f"{scheduled}, next {age(d.next_retry)}  → bridgehook retries" if scheduled else "0"
    return [
        f"last delivery accepted: {delivery}",
        f"rejected in the last hour: {rejected}{f' ({reasons})' if reasons else ''}",
        f"last reconciliation: {reconciliation}",
        f"scheduled retries: {retries}",
    ]


@click.command()
@click.option("--limit", type=click.IntRange(min=1), help="At most this many, soonest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def retries(limit: int | None, as_json: bool) -> None:
    """One line per scheduled retry, soonest first: id, type, item or user, attempt, next attempt, error."""
    from workers.retries import ScheduledRetries

    with ops() as (s, r, storage):
        waiting = ScheduledRetries(r, s.queue_name, storage).list(limit)
    if as_json:
        for retry in waiting:
            click.echo(json.dumps(retry.as_json()))
        return
    table = Table(
        "id", "type", "item / user", "attempt", "retries left", "next attempt", "last error",
        title=f"{len(waiting)} scheduled retr{'y' if len(waiting) == 1 else 'ies'}",
    )  # fmt: skip
    for retry in waiting:
        d = retry.letter
        table.add_row(
            d.id[:12], d.type, str(d.item_id or d.user_uuid or ""), str(retry.attempt),
            "?" if retry.retries_left is None else str(retry.retries_left),
            age(retry.next_attempt), d.error[:70],
        )  # fmt: skip
    console.print(table)


def _iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when else None


def _datetime(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None
