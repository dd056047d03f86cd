"""What an item needs from its user (or from us), as one word an application can switch on.

Bridge's status codes say what is wrong; an application wants to know what to ask its user. The
mapping follows Bridge's integration checklist:

=====================  ================================================================
``update_credentials``  402: the user updates their credentials through Connect
``complete_sca``        1007, 1009, 1010: strong customer authentication, through Connect
``validate_pro_account`` 1100: identity validation of a professional account (never
                        announced by webhook: the reconciliation sweep polls for it)
``act_on_bank_site``    429: something to accept on the bank's own site
``renew_password``      430: the password expired at the bank
``wait``                1003 for less than 24 h, -2, -3: Bridge retries by itself
``contact_support``     1003 for 24 h or more: the checklist says to contact Bridge then
``renew_consent``       a usable item whose consent (``authentication_expires_at``) ends
                        within ``CONSENT_WARNING_DAYS``
=====================  ================================================================

A status that needs the user wins over a consent about to end: Connect renews both at once.

A Powens connection's ``state`` is stored as the Bridge status that asks the same of the user
(:data:`POWENS_STATUS`; the state itself stays in ``status_code_info``), so that one vocabulary and
one ``status`` column serve both providers. ``bug`` and any state Powens may add later are
:data:`PROVIDER_ERROR`, which only the provider's support can clear.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from workers.db import to_datetime
from workers.storage import Storage

STUCK_AFTER = timedelta(hours=24)  # 1003 for longer: contact Bridge's support
BY_STATUS: dict[int, str] = {
    402: "update_credentials",
    1007: "complete_sca",
    1009: "complete_sca",
    1010: "complete_sca",
    1100: "validate_pro_account",
    429: "act_on_bank_site",
    430: "renew_password",
    -2: "wait",
    -3: "wait",
}
PROVIDER_ERROR = -100  # ours, not Bridge's: the provider reports an error its support must fix
BY_STATUS[PROVIDER_ERROR] = "contact_support"
# Powens's connection states (null or "" is a usable connection: status 0).
POWENS_STATUS: dict[str, int] = {
    **dict.fromkeys(("SCARequired", "webauthRequired", "decoupled", "additionalInformationNeeded"), 1010),
    **dict.fromkeys(("wrongpass", "passwordExpired"), 402),
    "actionNeeded": 429,
    **dict.fromkeys(("websiteUnavailable", "rateLimiting", "validating"), -2),
    "bug": PROVIDER_ERROR,
}


def powens_status(state: str | None) -> int:
    """The status a Powens connection in ``state`` is stored with (see the module's docstring)."""
    return 0 if not state else POWENS_STATUS.get(state, PROVIDER_ERROR)


ACTIONS = (
    "update_credentials", "complete_sca", "validate_pro_account", "act_on_bank_site", "renew_password",
    "wait", "contact_support", "renew_consent",
)  # fmt: skip
REPAIRABLE = frozenset({402, 1007, 1009, 1010, 1100})  # what a Connect session with item_id repairs


def action(
    status: int | None,
    status_changed_at: datetime | None,
    consent_expires_at: datetime | None,
    now: datetime,
    warning: timedelta,
) -> str | None:
    if status is not None and status in BY_STATUS:
        return BY_STATUS[status]
    if status == 1003:
        since = status_changed_at or now
        return "contact_support" if now - since >= STUCK_AFTER else "wait"
    if consent_expires_at is not None and consent_expires_at - now <= warning:
        return "renew_consent"
    return None


def attention(storage: Storage, now: datetime, warning: timedelta) -> list[dict[str, Any]]:
    """The live items that need something, oldest first: since their status changed, or, for a
    consent, since it started to end (``warning`` before it does)."""
    with storage.transaction() as tx:
        rows = tx.execute(
            "SELECT i.id, i.user_uuid, u.external_user_id, i.status, i.status_changed_at, "
            "i.authentication_expires_at FROM items i LEFT JOIN users u ON u.uuid = i.user_uuid "
            "WHERE i.deleted_at IS NULL ORDER BY i.id"
        ).fetchall()
    found = []
    for item_id, user_uuid, external, status, changed, expires in rows:
        changed, expires = to_datetime(changed), to_datetime(expires)
        what = action(status, changed, expires, now, warning)
        if what is None:
            continue
        since = expires - warning if what == "renew_consent" and expires is not None else changed
        found.append(
            {"item_id": int(item_id), "user_uuid": user_uuid, "external_user_id": external, "status": status,
             "action": what, "since": since, "consent_expires_at": expires}
        )  # fmt: skip
    found.sort(key=lambda a: (a["since"] is None, a["since"] or now, a["item_id"]))
    return found


def counts(items: list[dict[str, Any]]) -> dict[str, int]:
    """Items per action (every action named, 0 included), for the metrics."""
    out = dict.fromkeys(ACTIONS, 0)
    for item in items:
        out[item["action"]] += 1
    return out
