"""POST /webhooks/powens/<event>, check by check, against the real app and a real Redis."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Callable

import httpx
import pytest
import redis
from prometheus_client import REGISTRY
from rq.job import Job
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from service.app import create_app
from service.powens import signature_date
from service.powens_events import JOB_FUNCTIONS
from service.queue import ARCHIVE_KEY
from tests.support import (
    POWENS_OLD_SECRET,
    POWENS_SECRET,
    SECRET,
    fixture_body,
    free_port,
    make_settings,
    powens_fixture,
    powens_signed,
    powens_url,
    queued_ids,
    running_receiver,
    signed,
)

SYNCED = powens_url("connection.synced")
MAX_SKEW_SECONDS = 300  # POWENS_SIGNATURE_MAX_AGE_SECONDS's default
PROCESSED = {
    "connection.synced": "CONNECTION_SYNCED",
    "connection.deleted": "CONNECTION_DELETED",
    "account.disabled": "ACCOUNT_DISABLED",
    "account.enabled": "ACCOUNT_ENABLED",
    "user.deleted": "USER_DELETED",
}


def count(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "bridgehook_webhook_requests_total", {"outcome": outcome, "provider": "powens"}
        )
        or 0.0
    )


@pytest.fixture
def powens(client_factory: Callable[..., TestClient]) -> TestClient:
    """A client from an address Bridge never uses: Powens has no allow-list."""
    return client_factory(peer="198.51.100.40", POWENS_WEBHOOK_SECRETS=f"{POWENS_SECRET},{POWENS_OLD_SECRET}")


def refused(response: httpx.Response, status: int, reason: str, r: redis.Redis) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == reason and response.json()["detail"]
    assert queued_ids(r) == []


# -- signature ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [POWENS_SECRET, POWENS_OLD_SECRET])
def test_either_secret_of_a_rotation_is_accepted(powens: TestClient, r: redis.Redis, secret: str) -> None:
    body = powens_fixture("connection.synced")
    response = powens.post(SYNCED, **powens_signed("connection.synced", body, secret))
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "queued", "event_id": "powens-connection_synced-5537101"}
    assert queued_ids(r) == ["powens-connection_synced-5537101"]


@pytest.mark.parametrize("name", sorted(PROCESSED))
def test_processed_fixture_is_queued_with_its_job_and_envelope(
    powens: TestClient, r: redis.Redis, name: str
) -> None:
    body = powens_fixture(name)
    response = powens.post(powens_url(name), **powens_signed(name, body))
    assert response.json()["status"] == "queued"
    job = Job.fetch(queued_ids(r)[0], connection=r, serializer=JSONSerializer)
    event_type = PROCESSED[name]
    assert job.func_name == JOB_FUNCTIONS[event_type] == f"workers.powens_jobs.{name.replace('.', '_')}"
    (event,) = job.args
    assert event["type"] == event_type and event["provider"] == "powens"
    assert event["content"] == json.loads(body)
    assert event["id_webhook_data"] == json.loads(body)["id_webhook_data"]


def test_missing_or_wrong_signature_is_401_and_nothing_is_kept(powens: TestClient, r: redis.Redis) -> None:
    body = powens_fixture("connection.synced")
    kwargs = powens_signed("connection.synced", body)
    before = count("invalid_signature")
    headers = kwargs["headers"]
    refused(
        powens.post(SYNCED, content=body, headers={**headers, "BI-Signature": ""}),
        401,
        "missing_signature",
        r,
    )
    no_date = {k: v for k, v in headers.items() if k != "BI-Signature-Date"}
    refused(powens.post(SYNCED, content=body, headers=no_date), 401, "missing_signature_date", r)
    other = powens_signed("connection.synced", body, "powens-someone-else-000")["headers"]
    refused(powens.post(SYNCED, content=body, headers=other), 401, "invalid_signature", r)
    refused(powens.post(SYNCED, content=body, headers={**headers, "BI-Signature": "not base64!"}), 401,
            "invalid_signature", r)  # fmt: skip
    tampered = body.replace(b"1523.47", b"9523.47")
    refused(powens.post(SYNCED, content=tampered, headers=headers), 401, "invalid_signature", r)
    assert count("invalid_signature") == before + 3
    assert r.xlen(ARCHIVE_KEY) == 0


def test_the_path_is_signed_so_the_type_cannot_be_swapped(powens: TestClient, r: redis.Redis) -> None:
    """A USER_DELETED delivery posted to another event's path does not verify."""
    body = powens_fixture("user.deleted")
    kwargs = powens_signed("user.deleted", body)
    refused(powens.post(powens_url("connection.deleted"), **kwargs), 401, "invalid_signature", r)


def test_two_signature_headers_are_refused(powens: TestClient, r: redis.Redis) -> None:
    body = powens_fixture("user.deleted")
    kwargs = powens_signed("user.deleted", body)
    headers = [(k, v) for k, v in kwargs["headers"].items()] + [("BI-Signature", "AAAA")]
    refused(
        powens.post(powens_url("user.deleted"), content=body, headers=headers), 400, "duplicate_signature", r
    )


# -- the date window ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-MAX_SKEW_SECONDS - 60, MAX_SKEW_SECONDS + 60])
def test_a_date_beyond_five_minutes_is_refused(powens: TestClient, r: redis.Redis, offset: int) -> None:
    body = powens_fixture("connection.synced")
    kwargs = powens_signed("connection.synced", body, date=signature_date(time.time() + offset))
    refused(powens.post(SYNCED, **kwargs), 401, "signature_date_out_of_window", r)


@pytest.mark.parametrize("date", ["%Y-%m-%d %H:%M:%S", "yesterday"])
def test_a_date_powens_would_not_write_is_refused(powens: TestClient, r: redis.Redis, date: str) -> None:
    """Now, but not as ISO 8601 with its T (which Python would read); or no date at all."""
    date = time.strftime(date, time.gmtime())
    body = powens_fixture("connection.synced")
    refused(powens.post(SYNCED, **powens_signed("connection.synced", body, date=date)), 401,
            "signature_date_out_of_window", r)  # fmt: skip


def test_the_window_is_a_setting(client_factory: Callable[..., TestClient], r: redis.Redis) -> None:
    client = client_factory(POWENS_WEBHOOK_SECRETS=POWENS_SECRET, POWENS_SIGNATURE_MAX_AGE_SECONDS="3600")
    body = powens_fixture("connection.synced")
    late = powens_signed("connection.synced", body, date=signature_date(time.time() - 1800))
    assert client.post(SYNCED, **late).json()["status"] == "queued"


def test_a_date_within_the_window_is_accepted(powens: TestClient, r: redis.Redis) -> None:
    body = powens_fixture("connection.synced")
    kwargs = powens_signed(
        "connection.synced", body, date=signature_date(time.time() - MAX_SKEW_SECONDS + 30)
    )
    assert powens.post(SYNCED, **kwargs).json()["status"] == "queued"


# -- gzip ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed_over", ["compressed", "inflated"])
def test_gzip_body_is_inflated_whichever_bytes_were_signed(
    powens: TestClient, r: redis.Redis, signed_over: str
) -> None:
    body = powens_fixture("connection.synced")
    packed = gzip.compress(body)
    kwargs = powens_signed(
        "connection.synced", packed, signed_body=packed if signed_over == "compressed" else body
    )
    kwargs["headers"]["Content-Encoding"] = "gzip"
    assert powens.post(SYNCED, **kwargs).json()["status"] == "queued"
    job = Job.fetch(queued_ids(r)[0], connection=r, serializer=JSONSerializer)
    assert job.args[0]["content"] == json.loads(body)
    (_, fields), = r.xrange(ARCHIVE_KEY)  # fmt: skip
    assert fields[b"body"] == body  # the archive keeps the JSON a replay reads


def test_gzip_bomb_is_413_within_the_limit(client_factory: Callable[..., TestClient], r: redis.Redis) -> None:
    client = client_factory(POWENS_WEBHOOK_SECRETS=POWENS_SECRET, POWENS_WEBHOOK_MAX_BODY_BYTES="65536")
    bomb = gzip.compress(b'{"id": 1, "pad": "' + b"0" * 50_000_000 + b'"}')
    assert len(bomb) < 65536  # it passes the limit on the wire: only the inflation can catch it
    kwargs = powens_signed("user.deleted", bomb)
    kwargs["headers"]["Content-Encoding"] = "gzip"
    refused(client.post(powens_url("user.deleted"), **kwargs), 413, "body_too_large", r)


def test_broken_gzip_and_other_encodings_are_refused(powens: TestClient, r: redis.Redis) -> None:
    body = powens_fixture("user.deleted")
    truncated = gzip.compress(body)[:-12]
    for payload, encoding, status, reason in [
        (body, "gzip", 400, "malformed_encoding"),
        (truncated, "gzip", 400, "malformed_encoding"),
        (gzip.compress(body) + b"trailing", "gzip", 400, "malformed_encoding"),
        (body, "br", 415, "unsupported_content_encoding"),
    ]:
        kwargs = powens_signed("user.deleted", payload)
        kwargs["headers"]["Content-Encoding"] = encoding
        refused(powens.post(powens_url("user.deleted"), **kwargs), status, reason, r)


def test_body_over_the_limit_is_413(client_factory: Callable[..., TestClient], r: redis.Redis) -> None:
    client = client_factory(POWENS_WEBHOOK_SECRETS=POWENS_SECRET, POWENS_WEBHOOK_MAX_BODY_BYTES="1000")
    body = json.dumps({"id": 1, "pad": "x" * 2000}).encode()
    refused(
        client.post(powens_url("user.deleted"), **powens_signed("user.deleted", body)),
        413,
        "body_too_large",
        r,
    )


# -- de-duplication, ignored types, malformed bodies ---------------------------------------------------


def test_dedupe_on_id_webhook_data(powens: TestClient, r: redis.Redis) -> None:
    first = powens_fixture("user.deleted")
    # The same event delivered again with another date (a new signature) is still the same event.
    again = json.dumps(json.loads(first), indent=2).encode()
    assert (
        powens.post(powens_url("user.deleted"), **powens_signed("user.deleted", first)).json()["status"]
        == "queued"
    )
    assert (
        powens.post(powens_url("user.deleted"), **powens_signed("user.deleted", again)).json()["status"]
        == "duplicate"
    )
    assert queued_ids(r) == ["powens-user_deleted-5537301"]
    assert r.xlen(ARCHIVE_KEY) == 2  # both deliveries archived


def test_without_id_webhook_data_the_body_hash_dedupes(powens: TestClient, r: redis.Redis) -> None:
    one, two = b'{"id": 41}', b'{"id": 42}'
    url = powens_url("user.deleted")
    answers = [powens.post(url, **powens_signed("user.deleted", b)).json()["status"] for b in (one, one, two)]
    assert answers == ["queued", "duplicate", "queued"]
    assert queued_ids(r) == [f"powens-user_deleted-{hashlib.sha256(b).hexdigest()}" for b in (one, two)]


@pytest.mark.parametrize("event", ["accounts.fetched", "USER_CREATED", "account-synced", "SOMETHING_NEW"])
def test_other_types_are_archived_and_ignored(powens: TestClient, r: redis.Redis, event: str) -> None:
    body = (
        powens_fixture("accounts.fetched")
        if event == "accounts.fetched"
        else b'{"id_webhook_data": 9, "id": 3}'
    )
    response = powens.post(powens_url(event), **powens_signed(event, body))
    assert response.json()["status"] == "ignored"
    assert queued_ids(r) == []
    (_, fields), = r.xrange(ARCHIVE_KEY)  # fmt: skip
    assert fields[b"decision"] == b"ignored"
    assert fields[b"type"] == event.upper().replace(".", "_").replace("-", "_").encode()
    assert fields[b"body"] == body


@pytest.mark.parametrize(
    ("event", "body"),
    [
        ("user.deleted", b"not json"),
        ("user.deleted", b"[1, 2]"),
        ("user.deleted", b'{"id": "1093"}'),
        ("user.deleted", b'{"id": 0}'),
        ("user.deleted", b'{"id": 1, "id_webhook_data": -4}'),
        ("account.disabled", b'{"id": 1}'),
        ("connection.synced", b'{"user": {"id": 1}, "connection": {}}'),
        ("connection.synced", b'{"user": {"id": 1}, "connection": {"id": 2, "accounts": {}}}'),
        (
            "connection.synced",
            b'{"user": {"id": 1}, "connection": {"id": 2, "accounts": [{"id": 3, "transactions": [{}]}]}}',
        ),
        ("connection.synced", b'{"user": {"id": 1}, "connection": {"id": 2, "state": 5}}'),
        ("user.deleted", b'{"id": 1, "x": NaN}'),
    ],
)
def test_malformed_bodies_are_400(powens: TestClient, r: redis.Redis, event: str, body: bytes) -> None:
    refused(powens.post(powens_url(event), **powens_signed(event, body)), 400, "malformed_event", r)


def test_a_path_that_names_no_event_is_404_and_get_is_405(powens: TestClient, r: redis.Redis) -> None:
    refused(powens.post("/webhooks/powens/a.b", **powens_signed("x", b"{}")), 404, "unknown_event", r)
    refused(powens.post("/webhooks/powens/", content=b"{}"), 404, "unknown_event", r)
    refused(powens.get(powens_url("user.deleted")), 405, "method_not_allowed", r)


def test_unconfigured_powens_is_not_served(client: TestClient, r: redis.Redis) -> None:
    body = powens_fixture("user.deleted")
    response = client.post(powens_url("user.deleted"), **powens_signed("user.deleted", body))
    assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_an_allow_list_when_one_is_set(client_factory: Callable[..., TestClient], r: redis.Redis) -> None:
    client = client_factory(
        peer="198.51.100.40", POWENS_WEBHOOK_SECRETS=POWENS_SECRET, POWENS_ALLOWED_IPS="203.0.113.0/24"
    )
    body = powens_fixture("user.deleted")
    refused(
        client.post(powens_url("user.deleted"), **powens_signed("user.deleted", body)),
        403,
        "forbidden_source",
        r,
    )


def test_bridge_is_untouched_beside_powens(
    powens: TestClient, client_factory: Callable[..., TestClient], r: redis.Redis
) -> None:
    """Bridge's endpoint keeps its allow-list and its secret when Powens is configured."""
    refused(
        powens.post("/webhooks/bridge", **signed(fixture_body("item.created"))), 403, "forbidden_source", r
    )
    bridge = client_factory(POWENS_WEBHOOK_SECRETS=POWENS_SECRET)
    assert (
        bridge.post("/webhooks/bridge", **signed(fixture_body("item.created"), SECRET)).json()["status"]
        == "queued"
    )
    body = powens_fixture("user.deleted")
    forged = powens_signed("user.deleted", body, SECRET)  # Bridge's secret does not sign Powens's deliveries
    response = bridge.post(powens_url("user.deleted"), **forged)
    assert response.status_code == 401 and response.json()["error"] == "invalid_signature"
    assert len(queued_ids(r)) == 1  # Bridge's event only


def test_redis_down_is_503(r: redis.Redis) -> None:
    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0", POWENS_WEBHOOK_SECRETS=POWENS_SECRET)
    with TestClient(create_app(settings), client=("198.51.100.40", 1)) as client:
        body = powens_fixture("connection.synced")
        response = client.post(SYNCED, **powens_signed("connection.synced", body))
    assert response.status_code == 503 and response.json()["error"] == "queue_unavailable"


# -- a real socket -------------------------------------------------------------------------------------


def test_gzip_delivery_over_a_real_socket(settings_factory: Callable[..., object], r: redis.Redis) -> None:
    settings = settings_factory(POWENS_WEBHOOK_SECRETS=POWENS_SECRET)
    body = powens_fixture("connection.synced")
    packed = gzip.compress(body)
    with running_receiver(settings) as (base, _):  # type: ignore[arg-type]
        kwargs = powens_signed("connection.synced", packed)
        kwargs["headers"]["Content-Encoding"] = "gzip"
        response = httpx.post(base + SYNCED, **kwargs)
        assert response.json()["status"] == "queued", response.text
        bomb = gzip.compress(b"{" + b" " * 20_000_000 + b"}")
        kwargs = powens_signed("connection.synced", bomb)
        kwargs["headers"]["Content-Encoding"] = "gzip"
        response = httpx.post(base + SYNCED, **kwargs)
        assert response.status_code == 413 and response.json()["error"] == "body_too_large"
        assert httpx.post(base + "/webhooks/powens/x/y", content=b"{}").status_code == 404
    assert queued_ids(r) == ["powens-connection_synced-5537101"]
