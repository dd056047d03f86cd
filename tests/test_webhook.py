"""POST /webhooks/bridge, check by check, against the real app and a real Redis."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest
import redis
from prometheus_client import REGISTRY
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from service.queue import ARCHIVE_KEY, dedupe_key
from service.settings import BRIDGE_SOURCE_IPS
from service.signing import sign
from tests.support import (
    OLD_SECRET,
    SECRET,
    event_body,
    fixture_body,
    queued_ids,
    signed,
)

URL = "/webhooks/bridge"
PROCESSED = ["item.created", "item.refreshed", "item.account.created", "item.account.updated"]
IGNORED = [
    "payment.link.updated",
    "payment.transaction.created",
    "payment.transaction.updated",
    "transfer.account.created",
    "transfer.account.updated",
    "transfer.created",
    "transfer.updated",
]


def count(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "bridgehook_webhook_requests_total", {"outcome": outcome, "provider": "bridge"}
        )
        or 0.0
    )


def assert_rejected(response, status: int, reason: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.json()["error"] == reason
    assert response.json()["detail"]


# -- 1. source address -------------------------------------------------------------------------


@pytest.mark.parametrize("ip", BRIDGE_SOURCE_IPS)
def test_each_bridge_address_is_accepted(
    client_factory: Callable[..., TestClient], r: redis.Redis, ip: str
) -> None:
    client = client_factory(peer=ip)
    response = client.post(URL, **signed(fixture_body("item.refreshed")))
    assert response.status_code == 200
    assert response.json()["status"] == "queued"


def test_unknown_address_is_forbidden_before_anything_else(
    client_factory: Callable[..., TestClient], r: redis.Redis
) -> None:
    client = client_factory(peer="198.51.100.7")
    before = count("forbidden_source")
    response = client.post(URL, **signed(fixture_body("item.refreshed")))
    assert_rejected(response, 403, "forbidden_source")
    assert count("forbidden_source") == before + 1
    assert queued_ids(r) == []
    assert r.xlen(ARCHIVE_KEY) == 0


def test_forged_forwarded_for_from_an_untrusted_peer_is_ignored(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(peer="198.51.100.7")  # no TRUSTED_PROXIES: the peer is the client
    kwargs = signed(fixture_body("item.refreshed"))
    kwargs["headers"]["X-Forwarded-For"] = BRIDGE_SOURCE_IPS[0]
    assert_rejected(client.post(URL, **kwargs), 403, "forbidden_source")


def test_trusted_proxy_hop_is_believed(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(peer="10.0.0.5", TRUSTED_PROXIES="10.0.0.0/8")
    kwargs = signed(fixture_body("item.refreshed"))
    kwargs["headers"]["X-Forwarded-For"] = BRIDGE_SOURCE_IPS[1]
    assert client.post(URL, **kwargs).status_code == 200


def test_forged_leftmost_forwarded_for_behind_a_trusted_proxy_never_passes(
    client_factory: Callable[..., TestClient],
) -> None:
    # The attacker writes Bridge's address; our proxy appends the real one on the right.
    client = client_factory(peer="10.0.0.5", TRUSTED_PROXIES="10.0.0.0/8")
    kwargs = signed(fixture_body("item.refreshed"))
    kwargs["headers"]["X-Forwarded-For"] = f"{BRIDGE_SOURCE_IPS[0]}, 198.51.100.7"
    assert_rejected(client.post(URL, **kwargs), 403, "forbidden_source")


def test_chain_of_trusted_proxies_is_walked_from_the_right(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(peer="10.0.0.5", TRUSTED_PROXIES="10.0.0.0/8")
    kwargs = signed(fixture_body("item.refreshed"))
    kwargs["headers"]["X-Forwarded-For"] = f"198.51.100.7, {BRIDGE_SOURCE_IPS[2]}, 10.1.2.3"
    assert client.post(URL, **kwargs).status_code == 200


def test_forwarded_for_from_an_untrusted_proxy_is_ignored(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(peer="192.0.2.10", TRUSTED_PROXIES="10.0.0.0/8")
    kwargs = signed(fixture_body("item.refreshed"))
    kwargs["headers"]["X-Forwarded-For"] = BRIDGE_SOURCE_IPS[0]
    assert_rejected(client.post(URL, **kwargs), 403, "forbidden_source")


def test_allowed_ips_accept_cidrs_and_ipv4_mapped_ipv6(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(peer="::ffff:203.0.113.9", BRIDGE_ALLOWED_IPS="203.0.113.0/24")
    assert client.post(URL, **signed(fixture_body("item.created"))).status_code == 200


# -- 2. method, size, content type -------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(client: TestClient, method: str) -> None:
    response = client.request(method, URL)
    assert_rejected(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_body_over_the_limit_is_413(client_factory: Callable[..., TestClient], r: redis.Redis) -> None:
    client = client_factory(WEBHOOK_MAX_BODY_BYTES="1024")
    body = event_body(
        "item.created", {"item_id": 1, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8", "pad": "x" * 2000}
    )
    assert_rejected(client.post(URL, **signed(body)), 413, "body_too_large")
    assert queued_ids(r) == []


def test_ten_megabyte_body_is_413(client: TestClient) -> None:
    body = b"{" + b" " * (10 * 1024 * 1024) + b"}"
    assert_rejected(client.post(URL, **signed(body)), 413, "body_too_large")


def test_body_at_the_limit_is_read(client_factory: Callable[..., TestClient]) -> None:
    body = event_body("item.created", {"item_id": 1, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"})
    client = client_factory(WEBHOOK_MAX_BODY_BYTES=str(len(body)))
    assert client.post(URL, **signed(body)).status_code == 200


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_wrong_content_type_is_415(client: TestClient, content_type: str) -> None:
    response = client.post(URL, **signed(fixture_body("item.created"), content_type=content_type))
    assert_rejected(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", ""]
)
def test_json_or_absent_content_type_is_accepted(client: TestClient, content_type: str) -> None:
    assert (
        client.post(URL, **signed(fixture_body("item.created"), content_type=content_type)).status_code == 200
    )


# -- 3. signature ------------------------------------------------------------------------------


def test_missing_signature_is_401(client: TestClient, r: redis.Redis) -> None:
    before = count("missing_signature")
    response = client.post(
        URL, content=fixture_body("item.created"), headers={"Content-Type": "application/json"}
    )
    assert_rejected(response, 401, "missing_signature")
    assert count("missing_signature") == before + 1
    assert queued_ids(r) == []


def test_signature_with_another_secret_is_401(client: TestClient, r: redis.Redis) -> None:
    response = client.post(URL, **signed(fixture_body("item.created"), "not-our-secret-at-all"))
    assert_rejected(response, 401, "invalid_signature")
    assert queued_ids(r) == []


def test_signature_of_another_body_is_401(client: TestClient) -> None:
    kwargs = signed(fixture_body("item.created"))
    kwargs["content"] = fixture_body("item.refreshed")
    assert_rejected(client.post(URL, **kwargs), 401, "invalid_signature")


@pytest.mark.parametrize("case", [str.upper, str.lower])
def test_hex_case_does_not_matter(client: TestClient, case: Callable[[str], str]) -> None:
    body = fixture_body("item.created")
    headers = {"BridgeApi-Signature": f"v1={case(sign(body, SECRET))}", "Content-Type": "application/json"}
    assert client.post(URL, content=body, headers=headers).status_code == 200


def test_truncated_signature_is_401(client: TestClient) -> None:
    body = fixture_body("item.created")
    headers = {"BridgeApi-Signature": f"v1={sign(body, SECRET)[:-2]}"}
    assert_rejected(client.post(URL, content=body, headers=headers), 401, "invalid_signature")


@pytest.mark.parametrize("header", ["", "v0=ABCDEF", "sha256=abc", "v1", "v1=", "garbage"])
def test_header_without_a_usable_v1_element(client: TestClient, header: str) -> None:
    response = client.post(URL, content=fixture_body("item.created"), headers={"BridgeApi-Signature": header})
    assert response.status_code == 401
    assert response.json()["error"] in ("missing_signature", "invalid_signature")


@pytest.mark.parametrize("order", [(SECRET, OLD_SECRET), (OLD_SECRET, SECRET)])
def test_rotation_two_v1_elements_either_order(client: TestClient, order: tuple[str, str]) -> None:
    assert client.post(URL, **signed(fixture_body("item.created"), *order)).status_code == 200


@pytest.mark.parametrize("sender_secret", [SECRET, OLD_SECRET])
def test_rotation_two_configured_secrets_either_signs(
    client_factory: Callable[..., TestClient], sender_secret: str
) -> None:
    client = client_factory(BRIDGE_WEBHOOK_SECRETS=f"{SECRET},{OLD_SECRET}")
    assert client.post(URL, **signed(fixture_body("item.created"), sender_secret)).status_code == 200


def test_other_schemes_are_ignored_beside_a_valid_v1(client: TestClient) -> None:
    body = fixture_body("item.created")
    header = f"v0=DEADBEEF, v2=00, v1={sign(body, SECRET)}"
    assert client.post(URL, content=body, headers={"BridgeApi-Signature": header}).status_code == 200


# -- 4. event shape ----------------------------------------------------------------------------


def test_empty_body_unsigned_is_401_and_signed_is_400(client: TestClient) -> None:
    assert_rejected(client.post(URL, content=b""), 401, "missing_signature")
    assert_rejected(client.post(URL, **signed(b"")), 400, "malformed_event")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'"a string"',
        b'{"type": "item.created", "content": {"item_id": 1, "user_uuid": "'
        b'16369a41-6d2b-4750-85cd-60e366fbdcb8"}}',
        b'{"type": "item.created", "timestamp": 1}',
        b'{"content": {}, "timestamp": 1}',
        b'{"type": 5, "content": {}, "timestamp": 1}',
        b'{"type": "item.created", "content": [], "timestamp": 1}',
        b'{"type": "item.created", "content": {"item_id": 1, "user_uuid": "'
        b'16369a41-6d2b-4750-85cd-60e366fbdcb8"}, "timestamp": "1"}',
        b'{"type": "item.created", "content": {"item_id": "1", "user_uuid": "'
        b'16369a41-6d2b-4750-85cd-60e366fbdcb8"}, "timestamp": 1}',
        b'{"type": "item.created", "content": {"item_id": true, "user_uuid": "'
        b'16369a41-6d2b-4750-85cd-60e366fbdcb8"}, "timestamp": 1}',
        b'{"type": "item.created", "content": {"item_id": 1, "user_uuid": 7}, "timestamp": 1}',
        b'{"type": "item.created", "content": {"user_uuid": "'
        b'16369a41-6d2b-4750-85cd-60e366fbdcb8"}, "timestamp": 1}',
        b'{"type": "item.account.updated", "content": {"item_id": 1, "user_uuid": "'
        b'16369a41-6d2b-4750-85cd-60e366fbdcb8"}, "timestamp": 1}',
        b'{"type": "item.refreshed", "content": {"item_id": 1, "user_uuid": "'
        b'16369a41-6d2b-4750-85cd-60e366fbdcb8", "status_code": "0"}, '
        b'"timestamp": 1}',
        b'{"type": "", "content": {}, "timestamp": 1}',
        b"[" * 30000 + b"]" * 30000,
        b'{"type": "item.created", "content": {"item_id": 1'
        + b"0" * 5000
        + b', "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"}, "timestamp": 1}',
    ],
)
def test_malformed_signed_events_are_400_and_never_queued(
    client: TestClient, r: redis.Redis, body: bytes
) -> None:
    before = count("malformed_event")
    assert_rejected(client.post(URL, **signed(body)), 400, "malformed_event")
    assert count("malformed_event") == before + 1
    assert queued_ids(r) == []


# -- 5. enqueue, dedupe, ignore ----------------------------------------------------------------


@pytest.mark.parametrize("name", PROCESSED)
def test_processed_fixture_is_queued_as_an_rq_job(client: TestClient, r: redis.Redis, name: str) -> None:
    body = fixture_body(name)
    response = client.post(URL, **signed(body))
    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    event_id = hashlib.sha256(body).hexdigest()
    assert response.json()["event_id"] == event_id
    assert queued_ids(r) == [event_id]
    job = Job.fetch(event_id, connection=r, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED
    assert (
        job.func_name
        == {
            "item.created": "workers.jobs.item_created",
            "item.refreshed": "workers.jobs.item_refreshed",
            "item.account.created": "workers.jobs.account_created",
            "item.account.updated": "workers.jobs.account_updated",
        }[name]
    )
    assert job.args == [json.loads(body)]
    assert r.ttl(dedupe_key(event_id)) > 259000


@pytest.mark.parametrize(
    ("event_type", "content", "function"),
    [
        (
            "item.account.deleted",
            {"item_id": 1, "account_id": 2, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"},
            "workers.jobs.account_deleted",
        ),
        (
            "item.deleted",
            {"item_id": 1, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"},
            "workers.jobs.item_deleted",
        ),
        ("user.deleted", {"user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"}, "workers.jobs.user_deleted"),
    ],
)
def test_deletion_events_are_queued(
    client: TestClient, r: redis.Redis, event_type: str, content: dict[str, object], function: str
) -> None:
    body = event_body(event_type, content)
    assert client.post(URL, **signed(body)).json()["status"] == "queued"
    job = Job.fetch(hashlib.sha256(body).hexdigest(), connection=r, serializer=JSONSerializer)
    assert job.func_name == function


def test_uppercase_legacy_names_are_normalised(client: TestClient, r: redis.Redis) -> None:
    body = event_body(
        "ITEM_ACCOUNT_UPDATED",
        {"item_id": 1, "account_id": 2, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"},
    )
    assert client.post(URL, **signed(body)).json()["status"] == "queued"
    job = Job.fetch(queued_ids(r)[0], connection=r, serializer=JSONSerializer)
    assert job.func_name == "workers.jobs.account_updated"
    assert job.args[0]["type"] == "item.account.updated"


def test_duplicate_delivery_is_acknowledged_once(client: TestClient, r: redis.Redis) -> None:
    body = fixture_body("item.refreshed")
    first = client.post(URL, **signed(body))
    second = client.post(URL, **signed(body))
    assert first.json()["status"] == "queued"
    assert second.status_code == 200
    assert second.json()["status"] == "duplicate"
    assert len(queued_ids(r)) == 1
    decisions = [fields[b"decision"] for _, fields in r.xrange(ARCHIVE_KEY)]
    assert decisions == [b"queued", b"duplicate"]


def test_enqueue_survives_a_redis_that_lost_its_scripts(client: TestClient, r: redis.Redis) -> None:
    """A restarted or failed-over Redis has no cached scripts: the next delivery loads ours again."""
    first = fixture_body("item.created")
    assert client.post(URL, **signed(first)).json()["status"] == "queued"
    r.script_flush()  # server-wide, as a restart would leave it
    second = fixture_body("item.refreshed")
    response = client.post(URL, **signed(second))
    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert queued_ids(r) == [hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()]


def test_duplicate_window_expires(client_factory: Callable[..., TestClient], r: redis.Redis) -> None:
    client = client_factory(WEBHOOK_DEDUPE_SECONDS="1")
    body = fixture_body("item.created")
    assert client.post(URL, **signed(body)).json()["status"] == "queued"
    assert r.ttl(dedupe_key(hashlib.sha256(body).hexdigest())) <= 1
    r.delete(dedupe_key(hashlib.sha256(body).hexdigest()))  # what expiry does, without sleeping
    r.delete(*r.keys("rq:job:*"))
    r.delete("rq:queue:bridgehook")
    assert client.post(URL, **signed(body)).json()["status"] == "queued"


@pytest.mark.parametrize("name", IGNORED)
def test_payment_and_transfer_events_are_archived_not_queued(
    client: TestClient, r: redis.Redis, name: str
) -> None:
    body = fixture_body(name)
    response = client.post(URL, **signed(body))
    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    assert queued_ids(r) == []
    [(_, fields)] = r.xrange(ARCHIVE_KEY)
    assert fields[b"body"] == body
    assert fields[b"decision"] == b"ignored"


def test_test_event_is_ignored(client: TestClient, r: redis.Redis) -> None:
    body = (
        b'{"content":{"item_id":1234567890,"status":0,"user_uuid":"x"},'
        b'"timestamp":1612783550,"type":"TEST_EVENT"}'
    )
    response = client.post(URL, **signed(body))
    assert response.json()["status"] == "ignored"
    assert queued_ids(r) == []


def test_archive_entry_holds_what_replay_needs(client: TestClient, r: redis.Redis) -> None:
    body = fixture_body("item.account.updated")
    kwargs = signed(body)
    client.post(URL, **kwargs)
    [(_, fields)] = r.xrange(ARCHIVE_KEY)
    assert fields[b"body"] == body
    assert fields[b"id"] == hashlib.sha256(body).hexdigest().encode()
    assert fields[b"type"] == b"item.account.updated"
    assert fields[b"signature"] == kwargs["headers"]["BridgeApi-Signature"].encode()
    assert fields[b"client"] == b"63.32.31.5"
    assert int(fields[b"received_at"]) > 1_700_000_000_000
    assert fields[b"request_id"]


def test_archive_is_trimmed_by_length(client_factory: Callable[..., TestClient], r: redis.Redis) -> None:
    client = client_factory(WEBHOOK_ARCHIVE_MAX_EVENTS="10")
    for i in range(300):
        client.post(URL, **signed(event_body("payment.link.updated", {"n": i})))
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default), never below the limit.
    assert 10 <= r.xlen(ARCHIVE_KEY) <= 110


def test_job_carries_the_retry_schedule(client_factory: Callable[..., TestClient], r: redis.Redis) -> None:
    client = client_factory(WORKER_RETRY_INTERVALS="5,30")
    client.post(URL, **signed(fixture_body("item.refreshed")))
    job = Job.fetch(queued_ids(r)[0], connection=r, serializer=JSONSerializer)
    assert (job.retries_left, job.retry_intervals) == (2, [5, 30])
    assert job.timeout == 600
    assert job.origin == "bridgehook"


def test_response_carries_a_request_id(client: TestClient) -> None:
    response = client.post(URL, **signed(fixture_body("item.created")))
    assert len(response.headers["x-request-id"]) == 32
    kwargs = signed(fixture_body("item.created"))
    kwargs["headers"]["X-Request-Id"] = "abc-123"
    echoed = client.post(URL, **kwargs)
    assert echoed.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize(
    "body",
    [
        fixture_body("item.account.updated"),
        event_body("ITEM_CREATED", {"item_id": 9, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"}),
    ],
)
def test_job_hash_is_what_rq_itself_writes(client: TestClient, r: redis.Redis, body: bytes) -> None:
    """The receiver writes RQ's job hash from a template; RQ's Job.to_dict() must agree field by field."""
    import zlib

    from service.job import build_job
    from tests.support import make_settings

    client.post(URL, **signed(body))
    [job_id] = queued_ids(r)
    written = {k.decode(): v for k, v in r.hgetall(f"rq:job:{job_id}").items()}
    stored = Job.fetch(job_id, connection=r, serializer=JSONSerializer)
    settings = make_settings("redis://127.0.0.1:1/0")  # build_job never connects
    expected = build_job(r, settings, job_id, stored.func_name, stored.args[0],
                         received_at_ms=stored.meta["received_at"],
                         received_seq=stored.meta["received_seq"]).to_dict()  # fmt: skip
    assert set(written) == {k for k, v in expected.items() if v is not None} | {"enqueued_at"}
    for key, value in expected.items():
        if key in ("created_at", "enqueued_at") or value is None:
            continue
        if key == "data":
            assert json.loads(zlib.decompress(written[key])) == json.loads(zlib.decompress(value))
        elif key == "meta":
            assert json.loads(written[key]) == json.loads(value)
        else:
            text = value.decode() if isinstance(value, bytes) else getattr(value, "value", value)
            assert written[key].decode() == str(text), key
    assert stored.args[0]["type"] == json.loads(body)["type"].lower().replace("_", ".")
    assert stored.enqueued_at is not None and stored.created_at is not None
