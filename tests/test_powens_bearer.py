"""POWENS_WEBHOOK_AUTH=bearer: the user's permanent token checked against the digest in Redis, against
the real app and a real Redis."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Callable

import httpx
import pytest
import redis
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from service import bearer
from service.app import create_app
from service.queue import ARCHIVE_KEY
from service.rejections import last_hour
from tests.support import free_port, make_settings, powens_fixture, powens_url, queued_ids

TOKEN = "powens-permanent-token-of-user-1093-" + "x" * 40  # the fixtures' user is 1093
USER = 1093
PROCESSED = ("connection.synced", "connection.deleted", "account.disabled", "account.enabled", "user.deleted")


@pytest.fixture
def powens(client_factory: Callable[..., TestClient], r: redis.Redis) -> TestClient:
    """Bearer mode, no HMAC secret (it needs none), the fixtures' user's token published."""
    r.hset(bearer.KEY, str(USER), hashlib.sha256(TOKEN.encode()).hexdigest())
    return client_factory(peer="198.51.100.40", POWENS_WEBHOOK_AUTH="bearer")


def post(
    client: TestClient, event: str, body: bytes, token: str | None = TOKEN, **headers: str
) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.post(
        powens_url(event), content=body, headers={"Content-Type": "application/json", **headers}
    )


def refused(response: httpx.Response, status: int, reason: str, r: redis.Redis) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == reason and response.json()["detail"]
    assert queued_ids(r) == []


@pytest.mark.parametrize("event", PROCESSED)
def test_the_users_token_is_accepted_whichever_field_names_the_user(
    powens: TestClient, r: redis.Redis, event: str
) -> None:
    response = post(powens, event, powens_fixture(event))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "queued"
    [(_, fields)] = r.xrange(ARCHIVE_KEY)
    assert fields[b"signature"] == b"bearer"  # never the token


def test_gzip_bodies_and_the_scheme_in_any_case(powens: TestClient, r: redis.Redis) -> None:
    body = gzip.compress(powens_fixture("connection.synced"))
    headers = {"Content-Encoding": "gzip", "Authorization": f"bearer  {TOKEN}"}
    response = post(powens, "connection.synced", body, None, **headers)
    assert response.json()["status"] == "queued", response.text


def test_a_missing_or_other_scheme_is_missing_token(powens: TestClient, r: redis.Redis) -> None:
    body = powens_fixture("connection.synced")
    refused(post(powens, "connection.synced", body, None), 401, "missing_token", r)
    refused(
        post(powens, "connection.synced", body, None, Authorization=f"Basic {TOKEN}"), 401, "missing_token", r
    )
    refused(post(powens, "connection.synced", body, None, Authorization="Bearer "), 401, "missing_token", r)


def test_a_wrong_token_and_an_unknown_user_are_one_answer(powens: TestClient, r: redis.Redis) -> None:
    body = powens_fixture("connection.synced")
    refused(post(powens, "connection.synced", body, TOKEN + "y"), 401, "invalid_token", r)
    other = json.loads(body)
    other["user"]["id"] = 4242  # no token of ours: answered as a wrong one
    refused(post(powens, "connection.synced", json.dumps(other).encode()), 401, "invalid_token", r)
    r.hset(bearer.KEY, "4242", hashlib.sha256(b"the-other-users-token").hexdigest())
    refused(post(powens, "connection.synced", json.dumps(other).encode()), 401, "invalid_token", r)


@pytest.mark.parametrize(
    ("event", "body"),
    [
        ("connection.synced", b'{"connection": {"id": 1}, "id_webhook_data": 1}'),
        ("connection.deleted", b'{"id": 4102, "id_webhook_data": 2}'),  # no id_user
        ("user.deleted", b'{"id": "1093"}'),  # not an integer
        ("user.created", b'{"signin": "2024-01-01"}'),  # a type we only archive, naming no user
        ("connection.synced", b"not json"),
    ],
)
def test_a_body_naming_no_user_is_401(powens: TestClient, r: redis.Redis, event: str, body: bytes) -> None:
    refused(post(powens, event, body), 401, "missing_user_id", r)


def test_other_types_name_their_user_by_id_user_or_user_id(powens: TestClient, r: redis.Redis) -> None:
    response = post(powens, "accounts.fetched", powens_fixture("accounts.fetched"))
    assert response.json()["status"] == "ignored", response.text
    assert post(powens, "account.synced", b'{"id": 5, "id_user": 1093}').json()["status"] == "ignored"


def test_the_token_is_in_no_log_line(
    powens: TestClient, r: redis.Redis, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    body = powens_fixture("connection.synced")
    for token in (TOKEN, TOKEN + "y", None):
        post(powens, "connection.synced", body, token)
    post(powens, "connection.synced", body, None, Authorization=f"Basic {TOKEN}")
    out = capsys.readouterr()
    logged = caplog.text + out.out + out.err
    assert "invalid_token" in logged and "missing_token" in logged  # the rejections were logged
    assert TOKEN not in logged
    assert all(
        TOKEN.encode() not in value for _, fields in r.xrange(ARCHIVE_KEY) for value in fields.values()
    )


def test_rejections_are_counted_as_every_other(
    settings_factory: Callable[..., object], r: redis.Redis
) -> None:
    """In the metric at once, and in Redis for `bridgehook status` once the receiver flushes (at its stop)."""

    def metric(reason: str) -> float:
        return (
            REGISTRY.get_sample_value(
                "bridgehook_webhook_requests_total", {"outcome": reason, "provider": "powens"}
            )
            or 0.0
        )

    before = {reason: metric(reason) for reason in ("missing_token", "invalid_token", "missing_user_id")}
    body = powens_fixture("connection.synced")
    with TestClient(
        create_app(settings_factory(POWENS_WEBHOOK_AUTH="bearer")), client=("198.51.100.40", 1)
    ) as c:
        post(c, "connection.synced", body, None)
        post(c, "connection.synced", body, "nobody-holds-this-token")
        post(c, "connection.synced", body, "nobody-holds-this-token")
        post(c, "connection.synced", b"{}")
    assert {reason: metric(reason) - n for reason, n in before.items()} == {
        "missing_token": 1,
        "invalid_token": 2,
        "missing_user_id": 1,
    }
    assert last_hour(r) == {"missing_token": 1, "invalid_token": 2, "missing_user_id": 1}


def test_two_authorization_headers_or_one_too_large(powens: TestClient, r: redis.Redis) -> None:
    body = powens_fixture("connection.synced")
    twice = [
        ("Authorization", f"Bearer {TOKEN}"),
        ("Authorization", "Bearer other"),
        ("Content-Type", "application/json"),
    ]
    refused(
        powens.post(powens_url("connection.synced"), content=body, headers=twice),
        400,
        "duplicate_signature",
        r,
    )
    refused(post(powens, "connection.synced", body, "x" * 1100), 431, "signature_too_large", r)


def test_a_token_checked_without_redis_is_503() -> None:
    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0", POWENS_WEBHOOK_AUTH="bearer")
    with TestClient(create_app(settings), client=("198.51.100.40", 1)) as client:
        response = post(client, "connection.synced", powens_fixture("connection.synced"))
    assert response.status_code == 503 and response.json()["error"] == "queue_unavailable"


def test_hmac_stays_the_default(client_factory: Callable[..., TestClient], r: redis.Redis) -> None:
    r.hset(bearer.KEY, str(USER), hashlib.sha256(TOKEN.encode()).hexdigest())
    hmac_mode = client_factory(peer="198.51.100.40", POWENS_WEBHOOK_SECRETS="powens-secret-0001")
    refused(post(hmac_mode, "user.deleted", powens_fixture("user.deleted")), 401, "missing_signature", r)
    unconfigured = client_factory(peer="198.51.100.40")  # neither secrets nor bearer: not served
    assert post(unconfigured, "user.deleted", powens_fixture("user.deleted")).status_code == 404
