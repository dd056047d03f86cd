"""Random bodies and headers: never a 5xx other than 503, never a job for an unsigned body."""

from __future__ import annotations

import json

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from service.signing import signature_header
from tests.support import SECRET, queued_ids

URL = "/webhooks/bridge"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            [
                "item.created",
                "ITEM_REFRESHED",
                "item.account.updated",
                "user.deleted",
                "TEST_EVENT",
                "payment.link.updated",
                "x",
            ]
        )
        | st.text(max_size=10)
        | json_values,
        "content": st.fixed_dictionaries(
            {},
            optional={
                "item_id": json_values | st.integers(),
                "account_id": json_values,
                "user_uuid": json_values | st.text(max_size=36),
            },
        )
        | json_values,
        "timestamp": st.integers() | json_values,
    },
)
header_names = st.sampled_from(
    ["Content-Type", "BridgeApi-Signature", "X-Forwarded-For", "X-Request-Id", "X-Other"]
)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2048), headers=st.dictionaries(header_names, header_values, max_size=5))
def test_random_unsigned_requests(
    client: TestClient, r: redis.Redis, body: bytes, headers: dict[str, str]
) -> None:
    response = client.post(URL, content=body, headers=headers)
    assert response.status_code < 500 or response.status_code == 503
    # Nothing random carries a valid HMAC: refused on the content type or the signature.
    assert response.status_code in (401, 415), response.text
    assert queued_ids(r) == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=event_like)
def test_random_signed_events(client: TestClient, r: redis.Redis, event: dict[str, object]) -> None:
    body = json.dumps(event).encode()
    before = len(queued_ids(r))
    response = client.post(
        URL, content=body, headers={"BridgeApi-Signature": signature_header(body, [SECRET])}
    )
    assert response.status_code in (200, 400), response.text
    after = len(queued_ids(r))
    if response.status_code == 400:
        assert after == before
    else:
        assert response.json()["status"] in ("queued", "duplicate", "ignored")
        assert after - before == (1 if response.json()["status"] == "queued" else 0)
