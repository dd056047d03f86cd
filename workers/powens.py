"""Powens's API 2.0: one client class around one ``httpx.Client``.

The exceptions a caller may catch are :mod:`workers.errors`'s, as for Bridge:

=================== =====================================================================================
``TransientError``  5xx, timeouts, connection errors, still failing after ``max_attempts``
``BudgetExhausted`` a spent budget: ours (workers.ratelimit, Powens's own keys) or Powens's (a ``429``
                    still refused after the short waits below); ``retry_after`` says when it frees
``AuthError``       401/403: a bad client id/secret (``auth_init``) or a user's token refused. Powens's
                    user tokens are permanent: there is nothing to renew, so no second try
``NotFound``        404: the user or connection is gone at Powens
``PermanentError``  any other 4xx (``code`` is Powens's: ``invalidValue``…)
=================== =====================================================================================

A ``409 noAccount`` (a user without an activated account) answers a listing with nothing: an empty
listing, not an error. Inside one call the client retries what is worth retrying: 5xx and network errors
with exponential backoff and full jitter, a ``429`` after its ``Retry-After`` when short (a longer wait is
the scheduler's, not a worker's). Every request takes one from the application's budget and, for a
user's call, one from that user's (``POWENS_RATE_LIMIT_APP``, ``POWENS_RATE_LIMIT_USER``: the sandbox
allows 30 calls a minute per user), both or neither, shared by every worker through Redis.

What it returns is Powens's JSON as Powens wrote it (numbers exact: fractions as ``Decimal``);
:mod:`workers.powens_rows` reads it into our rows. Tokens never reach a log line or an exception's text.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, Unpack

import httpx
import redis

from service.logs import get_logger
from service.settings import Settings
from workers.attempts import Attempts, Tuning, on_origin, read_json, spend
from workers.errors import AuthError, NotFound, PermanentError, ProviderError
from workers.powens_rows import powens_time

log = get_logger("bridgehook.powens")

PAGE_LIMIT = 1000  # Powens's most per page of transactions
DEFAULT_BUDGET_WAIT = 60.0  # a 429 without a usable Retry-After: Powens counts its budgets per minute
_NO_ACCOUNT = "noAccount"


class PowensClient:
    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        *,
        transport: httpx.BaseTransport | None = None,
        **tuning: Unpack[Tuning],
    ) -> None:
        """``tuning``: how it tries, as for Bridge (:class:`workers.attempts.Tuning`: ``max_attempts``,
        ``backoff_base``, ``backoff_cap``, ``max_retry_after``, ``sleep``, ``jitter``)."""
        url, client_id, secret = (
            settings.powens_api_url,
            settings.powens_client_id,
            settings.powens_client_secret,
        )
        if not url or not client_id or secret is None:
            raise ValueError("POWENS_API_URL, POWENS_CLIENT_ID and POWENS_CLIENT_SECRET are required")
        self._settings = settings
        self._client_id, self._client_secret = client_id, secret
        self._attempts = Attempts("Powens", DEFAULT_BUDGET_WAIT, **tuning)
        self._limiter = self._attempts.limiter(connection)
        self._base = url.rstrip("/")
        self._origin = httpx.URL(self._base)
        self._http = httpx.Client(
            base_url=self._base,  # a path is under it; a URL (a page's link, on its host) is itself
            transport=transport,
            timeout=httpx.Timeout(settings.powens_timeout_seconds, connect=5.0),
            limits=httpx.Limits(max_connections=10, max_keepalive_connections=10),
            headers={"Accept": "application/json", "User-Agent": "bridgehook"},
        )

    def __repr__(self) -> str:
        return f"PowensClient({self._base!r})"

    def close(self) -> None:
        self._http.close()

    # -- the API -------------------------------------------------------------------------------

    def auth_init(self) -> tuple[int, str]:
        """``POST /auth/init``: a new Powens user, as (``id_user``, its permanent token). The token is a
        credential: store it encrypted, never log it."""
        body = {"client_id": self._client_id, "client_secret": self._client_secret.reveal()}
        data = self._request("POST", "/auth/init", body=body)
        return int(data["id_user"]), str(data["auth_token"])

    def connections(self, user_id: int, token: str) -> list[dict[str, Any]]:
        """``GET /users/{id}/connections``: the user's connections (their ``state``, ``last_update``…)."""
        data = self._request("GET", f"/users/{int(user_id)}/connections", user_id=user_id, token=token)
        return list(data.get("connections") or [])

    def accounts(self, user_id: int, token: str, all: bool = True) -> list[dict[str, Any]]:
        """``GET /users/{id}/accounts``; ``all``: disabled and deleted ones too (Powens leaves them out
        by default), which a sync needs to see consent withdrawn and accounts gone."""
        params = {"all": "true"} if all else None
        path = f"/users/{int(user_id)}/accounts"
        data = self._request(
            "GET", path, user_id=user_id, token=token, params=params, empty_on_no_account=True
        )
        return list(data.get("accounts") or [])

    def transactions(
        self, user_id: int, token: str, last_update: datetime | None = None, include_all: bool = True
    ) -> Iterator[list[dict[str, Any]]]:
        """The user's transactions, a page (up to 1000) at a time, following ``_links.next``. With
        ``last_update`` (aware): those updated after it (the delta); ``include_all``: deleted ones too
        (``all``), which a delta needs. A user with no activated account: one empty page."""
        return (page for page, _ in self.transaction_listing(user_id, token, last_update, include_all))

    def transaction_listing(
        self,
        user_id: int,
        token: str,
        last_update: datetime | None = None,
        include_all: bool = True,
        *,
        start: str | None = None,
    ) -> Iterator[tuple[list[dict[str, Any]], str | None]]:
        """:meth:`transactions`' pages, each with the ``_links.next`` that follows it (None after the
        last): where a listing stopped, to go on from there with ``start`` (a link it gave)."""
        params: dict[str, Any] = {"limit": PAGE_LIMIT}
        if last_update is not None:
            params["last_update"] = powens_time(last_update)
        if include_all:
            params["all"] = "true"
        url = self._resolve(start) if start else f"/users/{int(user_id)}/transactions"
        query = None if start else params
        while True:
            data = self._request(
                "GET", url, user_id=user_id, token=token, params=query, empty_on_no_account=True
            )
            link = (data.get("_links") or {}).get("next")
            following = (
                link.get("href") if isinstance(link, dict) else link if isinstance(link, str) else None
            )
            yield list(data.get("transactions") or []), following or None
            if not following:
                return
            url, query = self._resolve(following), None

    def delete_user(self, user_id: int, token: str) -> bool:
        """``DELETE /users/{id}``: the user and everything under it erased at Powens; False if Powens
        had no such user (404). A token Powens no longer knows (the user deleted already, with it) is
        an AuthError, as Powens cannot say more."""
        try:
            self._request("DELETE", f"/users/{int(user_id)}", user_id=user_id, token=token)
        except NotFound:
            return False
        return True

    # -- plumbing ------------------------------------------------------------------------------

    def _resolve(self, link: str) -> str:
        return on_origin(self._origin, link, "_links.next")

    def _request(
        self,
        method: str,
        path: str,
        *,
        user_id: int | None = None,
        token: str | None = None,
        params: Any = None,
        body: Any = None,
        empty_on_no_account: bool = False,
    ) -> Any:
        where = f"{method} {httpx.URL(path).path}"
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        # Every request is the application's (the domain's); a user's call is that user's too.
        budgets = [("powens:app", self._settings.powens_rate_app)]
        if user_id is not None:
            budgets.append((f"powens:user:{int(user_id)}", self._settings.powens_rate_user))
        attempt = 0
        while True:
            attempt += 1
            spend(self._limiter, budgets)
            try:
                response = self._http.request(method, path, params=params, json=body, headers=headers)
            except httpx.TransportError as exc:
                self._attempts.unsent(attempt, exc, where)
                continue
            response.stream = httpx.ByteStream(b"")  # the body is read: no cycle to wait for (see bridge.py)
            if response.status_code < 400:
                return read_json(response.content)
            if self._attempts.again(attempt, response, where):
                continue
            error = self._error(response, where)
            if empty_on_no_account and error.status == 409 and error.code == _NO_ACCOUNT:
                return {}
            raise error

    @staticmethod
    def _error(response: httpx.Response, where: str) -> ProviderError:
        """Powens's ``{"code", "description", "message"}`` as our exception; its text goes in the
        exception (never bank data: Powens's error texts describe the request), the code in the log."""
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        payload = payload if isinstance(payload, dict) else {}
        code, message = payload.get("code"), payload.get("description") or payload.get("message")
        status = response.status_code
        if not (status == 409 and code == _NO_ACCOUNT):
            log.warning("powens.error", status=status, code=code, request=where)
        text = f"{status} {code or ''} on {where}: {message or response.reason_phrase}"
        cls = {401: AuthError, 403: AuthError, 404: NotFound}.get(status, PermanentError)
        return cls(text, status=status, code=code if isinstance(code, str) else None)
