"""Scenario 7: hostile input. Whatever arrives, the receiver never answers a 5xx other than 503, never
enqueues a job for input it refuses, does not crash, and keeps its memory bounded.

First, random bodies and headers through the app in-process (hypothesis, many examples, cheap). Then
the scenario proper, against a real `bridgehook serve`: every field of every fixture event given a
value of the wrong type, invalid UTF-8, deep nesting, huge numbers, junk HTTP, ``X-Forwarded-For``
forged by a peer that is not a proxy, and clients that send their body too slowly (or vanish), all while
the receiver's RSS is watched. Last, bodies that are signed and well-formed JSON for Python but that no
worker can process: the receiver refuses them (each with the reason a worker would fail on it).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import select
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from service.queue import ARCHIVE_KEY
from service.signing import signature_header
from tests.faults.support import POSTGRESQL, Processes, Recorder
from tests.support import (
    FIXTURES,
    POWENS_FIXTURES,
    POWENS_PREFIX,
    POWENS_SECRET,
    SECRET,
    powens_fixture,
    powens_signed,
    powens_url,
    queued_ids,
    signed,
)

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


# -- the real receiver ---------------------------------------------------------------------------------
BRIDGE_PEER = "127.0.0.7"  # Bridge, as far as the receiver knows (a loopback address of its own)
PROXY = "127.0.0.9"  # a trusted proxy that never calls: 127.0.0.1 is no proxy
READ_TIMEOUT = 2
RSS_GROWTH_LIMIT_KB = 24 * 1024
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

FIXTURE_EVENTS: dict[str, dict[str, Any]] = {
    path.stem: json.loads(path.read_bytes()) for path in sorted(FIXTURES.glob("*.json"))
}
# The README: item.* and user.deleted are processed and need their ids; any other type is archived.
IDS = ("item_id", "account_id", "user_uuid")


def json_kind(value: Any) -> str:
    """The JSON type of a decoded value, in the names of ``_BY_KIND`` (a bool is no int, here)."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, float) else type(value).__name__


_BY_KIND: dict[str, st.SearchStrategy[Any]] = {
    "None": st.none(),
    "bool": st.booleans(),
    "int": st.integers() | st.integers(min_value=10**18, max_value=10**300),
    "number": st.floats(allow_nan=False, allow_infinity=False),
    "str": st.text(max_size=30),
    "list": st.lists(json_values, max_size=3),
    "dict": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
}


def wrong_type(value: Any) -> st.SearchStrategy[Any]:
    """JSON values of any type but the value's (for an int, floats are wrong too; for a number, ints)."""
    kind = json_kind(value)
    excluded = {kind} | ({"int", "number"} if kind in ("int", "number") else set())
    return st.one_of(*(strategy for name, strategy in _BY_KIND.items() if name not in excluded))


# One value of each JSON type, for the sweep over every field (the int is a huge one).
_ONE_OF_EACH: dict[str, Any] = {
    "None": None, "bool": True, "int": 2**64, "number": 1.5, "str": "1", "list": [1], "dict": {"id": 1},
}  # fmt: skip
_FIELDS = [
    (name, where, key)
    for name, event in FIXTURE_EVENTS.items()
    for where, keys in (("top", list(event)), ("content", list(event["content"])))
    for key in keys
]


def mistype(name: str, where: str, key: str, value: Any, timestamp: int) -> tuple[bytes, bool]:
    """The fixture event ``name`` with ``value`` in one field, top-level or in its content; and whether
    the receiver must refuse it (the event's shape, or a processed type's ids, are wrong)."""
    event = json.loads(json.dumps(FIXTURE_EVENTS[name]))
    event["timestamp"] = timestamp  # a new body each time: never a duplicate of an earlier one
    (event if where == "top" else event["content"])[key] = value
    return json.dumps(event).encode(), where == "top" or (name.startswith("item.") and key in IDS)


def every_mistyped_field() -> list[tuple[bytes, bool]]:
    """Each field of each fixture event, with a value of each other JSON type."""
    cases: list[tuple[bytes, bool]] = []
    for name, where, key in _FIELDS:
        original = FIXTURE_EVENTS[name] if where == "top" else FIXTURE_EVENTS[name]["content"]
        kind = json_kind(original[key])
        for other, value in _ONE_OF_EACH.items():
            if other != kind and not {kind, other} <= {"int", "number"}:
                cases.append(mistype(name, where, key, value, len(cases) + 1))
    return cases


@st.composite
def mistyped_fixture(draw: st.DrawFn) -> tuple[bytes, bool]:
    name, where, key = draw(st.sampled_from(_FIELDS))
    original = FIXTURE_EVENTS[name] if where == "top" else FIXTURE_EVENTS[name]["content"]
    return mistype(name, where, key, draw(wrong_type(original[key])), draw(st.integers(10**6, 2**40)))


def _splice(body: bytes, at: int, junk: bytes) -> bytes:
    at = at % (len(body) + 1)
    return body[:at] + junk + body[at:]


def _event(content: str, timestamp: int = 1) -> bytes:
    return b'{"type":"item.created","content":{%s},"timestamp":%d}' % (content.encode(), timestamp)


# Signed bodies that are not Bridge events the receiver can take: it must answer 400.
refused_bodies = st.one_of(
    # invalid UTF-8, anywhere in a fixture
    st.builds(
        _splice,
        st.sampled_from([json.dumps(e).encode() for e in FIXTURE_EVENTS.values()]),
        st.integers(0, 10_000),
        st.sampled_from([b"\xff", b"\xc3\x28", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc0\xaf"]),
    ),
    # nesting deeper than any parser should follow, as the body or inside an event
    st.integers(2_000, 30_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(2_000, 30_000).map(
        lambda depth: _event(
            '"item_id":1,"user_uuid":"16369a41-6d2b-4750-85cd-60e366fbdcb8","x":' + "[" * depth + "]" * depth
        )
    ),
    # integers past Python's digit limit, floats for ids
    st.integers(4_400, 20_000).map(
        lambda digits: _event(f'"item_id":{"9" * digits},"user_uuid":"16369a41-6d2b-4750-85cd-60e366fbdcb8"')
    ),
    st.sampled_from(["1e400", "-1e400", "1.0", "4568477.000001"]).map(
        lambda number: _event(f'"item_id":{number},"user_uuid":"16369a41-6d2b-4750-85cd-60e366fbdcb8"')
    ),
)
# Signed, odd but valid events: huge numbers where the receiver does not look. It must take them.
accepted_bodies = st.builds(
    lambda big, ts: _event(
        f'"item_id":4568477,"user_uuid":"16369a41-6d2b-4750-85cd-60e366fbdcb8","nb_new_transactions":{big},"balance":{big}',
        ts,
    ),
    st.integers(10**18, 10**1000),
    st.integers(1, 2**40),
)
forwarded_for = st.lists(
    st.sampled_from([BRIDGE_PEER, "63.32.31.5", "52.215.247.62", PROXY, "127.0.0.1", "::1", "unknown"])
    | st.ip_addresses().map(str)
    | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
    min_size=1,
    max_size=5,
).map(", ".join)
raw_headers = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"Content-Length",
                b"Content-Type",
                b"BridgeApi-Signature",
                b"Transfer-Encoding",
                b"X-Forwarded-For",
                b"X-Request-Id",
                b"Host",
                b"X-\xff\xfe",
            ]
        ),
        st.binary(max_size=60).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    max_size=6,
)

HOSTILE = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Target:
    """A real receiver, and every request made to it checked against what must always hold."""

    def __init__(self, url: str, admin: str, pid: int, r: redis.Redis) -> None:
        self.url, self.admin, self.pid, self.r = url, admin, pid, r
        self.port = int(url.split(":")[2].split("/")[0])
        self.bridge = httpx.Client(transport=httpx.HTTPTransport(local_address=BRIDGE_PEER), timeout=10)
        self.stranger = httpx.Client(timeout=10)
        self.answers: Counter[int] = Counter()
        self.queued: list[str] = []

    def alive(self) -> None:
        assert Path(f"/proc/{self.pid}").exists() and self.stranger.get(self.admin + "/livez").is_success

    def post(
        self,
        body: bytes,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        *,
        peer: str = BRIDGE_PEER,
    ) -> httpx.Response:
        """POST, then check: no 5xx but 503, a well-formed request id, a job exactly when queued."""
        before = self.r.llen("rq:queue:bridgehook")
        client = self.bridge if peer == BRIDGE_PEER else self.stranger
        response = client.post(self.url, content=body, headers=headers or {})
        self.answers[response.status_code] += 1
        assert response.status_code < 500 or response.status_code == 503, response.text
        assert REQUEST_ID.fullmatch(response.headers["x-request-id"]), response.headers["x-request-id"]
        added = self.r.llen("rq:queue:bridgehook") - before
        if response.status_code == 200:
            outcome = response.json()["status"]
            assert added == (outcome == "queued"), (outcome, added)
            if outcome == "queued":
                self.queued.append(response.json()["event_id"])
        else:
            assert added == 0, f"a job for a {response.status_code}: {response.text}"
            assert set(response.json()) == {"error", "detail"}
        return response

    def signed(self, body: bytes, *, peer: str = BRIDGE_PEER, **headers: str) -> httpx.Response:
        kwargs = signed(body)
        return self.post(kwargs["content"], {**kwargs["headers"], **headers}, peer=peer)

    def raw(self, request: bytes) -> int | None:
        """Send bytes as they are; the status of the answer, or None if the server just closed."""
        before = self.r.llen("rq:queue:bridgehook")
        with socket.create_connection(
            ("127.0.0.1", self.port), timeout=5, source_address=(BRIDGE_PEER, 0)
        ) as s:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
        self.answers[status or 0] += 1
        assert status is None or status < 500 or status == 503, data[:200]
        assert self.r.llen("rq:queue:bridgehook") == before
        return status

    def close(self) -> None:
        self.bridge.close()
        self.stranger.close()


def run_hostile(target: Target) -> None:
    """Each kind of hostile input, a few dozen examples each."""

    def check_mistyped(body: bytes, must_refuse: bool) -> None:
        response = target.signed(body)
        assert response.status_code == 400 if must_refuse else response.status_code in (200, 400), (
            response.text
        )

    for case in every_mistyped_field():
        check_mistyped(*case)

    @HOSTILE
    @given(mistyped_fixture())
    def mistyped(case: tuple[bytes, bool]) -> None:
        check_mistyped(*case)

    @HOSTILE
    @given(refused_bodies)
    def refused(body: bytes) -> None:
        assert target.signed(body).status_code in (400, 413)

    @HOSTILE
    @given(accepted_bodies)
    def accepted(body: bytes) -> None:
        assert target.signed(body).status_code == 200

    @HOSTILE
    @given(forwarded_for, st.integers(1, 2**40))
    def forged(xff: str, timestamp: int) -> None:
        body = _event('"item_id":4568477,"user_uuid":"16369a41-6d2b-4750-85cd-60e366fbdcb8"', timestamp)
        # From a peer that is not a proxy, no X-Forwarded-For makes it Bridge…
        assert target.signed(body, peer="127.0.0.1", **{"X-Forwarded-For": xff}).status_code == 403
        # …and none makes Bridge anything else.
        assert target.signed(body, **{"X-Forwarded-For": xff}).status_code == 200

    @HOSTILE
    @given(raw_headers, st.binary(max_size=300))
    def junk(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        target.raw(b"POST /webhooks/bridge HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + body)

    for hostile in (mistyped, refused, accepted, forged, junk):
        hostile()
        target.alive()


def slow_clients(target: Target, count: int = 16) -> None:
    """Clients that trickle their body (a byte every 0.2 s, so that the connection is never idle) get
    408 once the read timeout is over, and meanwhile Bridge's deliveries go through at once; clients
    that vanish mid-body leave nothing behind."""
    head = (b"POST /webhooks/bridge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"BridgeApi-Signature: v1=00\r\nContent-Length: 400\r\n\r\n{\"type\":")  # fmt: skip
    socks = [socket.create_connection(("127.0.0.1", target.port), timeout=5, source_address=(BRIDGE_PEER, 0))
             for _ in range(count)]  # fmt: skip
    started = time.monotonic()
    for s in socks:
        s.sendall(head)
    statuses: dict[socket.socket, int] = {}
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.2):
            for s in socks:
                if s not in statuses:
                    with contextlib.suppress(OSError):
                        s.sendall(b" ")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        fast = time.monotonic()
        assert (
            target.signed(
                _event('"item_id":4568477,"user_uuid":"16369a41-6d2b-4750-85cd-60e366fbdcb8"', 7)
            ).status_code
            == 200
        )
        assert time.monotonic() - fast < READ_TIMEOUT / 2, "slow clients hold up Bridge's deliveries"
        while len(statuses) < count and time.monotonic() - started < READ_TIMEOUT + 4:
            readable, _, _ = select.select([s for s in socks if s not in statuses], [], [], 0.1)
            for s in readable:
                data = s.recv(4096)
                statuses[s] = int(data.split(b" ", 2)[1]) if data else 0
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        trickler.join(timeout=5)
        for s in socks:
            s.close()
    assert sorted(statuses.values()) == [408] * count, statuses.values()
    assert elapsed < READ_TIMEOUT + 2, f"the read timeout took {elapsed:.1f}s"
    target.answers[408] += count
    for _ in range(count):  # gone half-way through the body
        with socket.create_connection(
            ("127.0.0.1", target.port), timeout=5, source_address=(BRIDGE_PEER, 0)
        ) as s:
            s.sendall(head)
    target.alive()


USER = "16369a41-6d2b-4750-85cd-60e366fbdcb8"
# Signed, and refused at the door with a 400 malformed_event: each was once queued (a dead letter
# later) or answered 500.
REFUSED_AT_THE_DOOR = {
    "legacy type, nested 975 deep": b'{"type":"ITEM_CREATED","content":{"item_id":1,"user_uuid":"%s",'
    b'"x":%s%s},"timestamp":1}' % (USER.encode(), b"[" * 975, b"]" * 975),
    "nested 33 deep": _event(f'"item_id":1,"user_uuid":"{USER}","x":' + "[" * 33 + "]" * 33),
    "NaN": _event(f'"item_id":1,"user_uuid":"{USER}","x":NaN'),
    "Infinity": _event(f'"item_id":1,"user_uuid":"{USER}","x":-Infinity'),
    "1e999": _event(f'"item_id":1,"user_uuid":"{USER}","x":1e999'),
    "user_uuid with NUL": _event('"item_id":1,"user_uuid":"a\\u0000b"'),
    "empty user_uuid": _event('"item_id":1,"user_uuid":""'),
    "60 KB user_uuid": _event('"item_id":1,"user_uuid":"%s"' % ("a" * 60_000)),
    "path as user_uuid": _event('"item_id":1,"user_uuid":"../../x"'),
    "type with NUL": b'{"type":"item\\u0000x","content":{},"timestamp":1}',
    "type of 101 characters": b'{"type":"%s","content":{},"timestamp":1}' % (b"x" * 101),
}


def refused_at_the_door(target: Target) -> None:
    """Round two's hostile inputs, each refused with its own status and reason, nothing queued."""
    for name, body in REFUSED_AT_THE_DOOR.items():
        response = target.signed(body)
        assert (response.status_code, response.json()["error"]) == (400, "malformed_event"), (
            name,
            response.text,
        )
    body = _event(f'"item_id":2,"user_uuid":"{USER}"')
    valid = signed(body)["headers"]["BridgeApi-Signature"]
    twice = [
        ("Content-Type", "application/json"),
        ("BridgeApi-Signature", valid),
        ("BridgeApi-Signature", valid),
    ]
    response = target.post(body, twice)
    assert (response.status_code, response.json()["error"]) == (400, "duplicate_signature")
    response = target.signed(body, **{"BridgeApi-Signature": valid + "," + "x" * 4_000})
    assert (response.status_code, response.json()["error"]) == (431, "signature_too_large")
    assert target.signed(body).status_code == 200
    archived = target.r.xrevrange(ARCHIVE_KEY, count=1)[0][1]
    assert archived[b"signature"] == valid.encode()


@POSTGRESQL
def test_hostile_input_against_a_real_receiver(
    processes: Processes, r: redis.Redis, recorder: Recorder
) -> None:
    url = processes.receiver(
        BRIDGE_ALLOWED_IPS=BRIDGE_PEER, TRUSTED_PROXIES=PROXY, WEBHOOK_READ_TIMEOUT_SECONDS=str(READ_TIMEOUT)
    )
    target = Target(url, processes.admins[url], processes.receivers[url].pid, r)
    try:
        # Warm up (imports, pools, allocator arenas) before the baseline, with the same kinds of input.
        for n, fixture in enumerate(FIXTURE_EVENTS.values()):
            target.signed(json.dumps({**fixture, "timestamp": n + 1}).encode())
            target.signed(b"[" * 30_000 + b"]" * 30_000)
            target.post(b"\xff" * 60_000, {"BridgeApi-Signature": "v1=00"})
        baseline = rss_kb(target.pid)

        run_hostile(target)
        refused_at_the_door(target)
        slow_clients(target)

        growth = rss_kb(target.pid) - baseline
        sent = sum(target.answers.values())
        present = set(queued_ids(r))
        recorder.note(f"answers {dict(sorted(target.answers.items()))}; RSS +{growth} kB")
        recorder.record(
            sent=sent,
            acknowledged=target.answers[200],
            expected=len(target.queued),
            found=len(present & set(target.queued)),
            lost=len(set(target.queued) - present),
        )
        assert set(target.queued) <= present
        assert growth < RSS_GROWTH_LIMIT_KB, f"the receiver grew by {growth} kB"
        target.alive()
    finally:
        target.close()


# -- signed, JSON for Python, but no worker can process them -------------------------------------------
UNPROCESSABLE = {
    "utf-16": (
        json.dumps(
            {
                "type": "item.created",
                "content": {"item_id": 5, "user_uuid": "16369a41-6d2b-4750-85cd-60e366fbdcb8"},
                "timestamp": 1,
            }
        ).encode("utf-16-le"),
        "JSON between systems is UTF-8 (RFC 8259); json.loads also decodes UTF-16, the body is spliced into "
        "the job verbatim, and the worker cannot deserialise it (rq DeserializationError, dead letter)",
    ),
    "id past int64": (
        _event(f'"item_id":{2**63},"user_uuid":"16369a41-6d2b-4750-85cd-60e366fbdcb8"'),
        "Bridge ids are int64; the worker fails on BIGINT (NumericValueOutOfRange) and dead-letters",
    ),
    "timestamp past time_t": (
        b'{"type":"item.deleted","content":{"item_id":7,"user_uuid":"16369a41-6d2b-4750-85cd-60e366fbdcb8"},"timestamp":%d}'
        % 10**30,
        "the deletion job's datetime.fromtimestamp overflows (OverflowError) and dead-letters",
    ),
    "utf-8 encoded surrogate": (
        b'{"type":"item.created","content":{"item_id":11,"user_uuid":"u\xed\xa0\x80"},"timestamp":1}',
        "invalid UTF-8 (RFC 3629): json.loads decodes bytes with surrogatepass, the verbatim body in the job "
        "then fails RQ's deserialisation (DeserializationError, dead letter)",
    ),
    "lone surrogate": (
        _event('"item_id":10,"user_uuid":"\\ud800"'),
        "a user_uuid with a lone surrogate cannot be encoded for Redis (UnicodeEncodeError); dead letter",
    ),
}


@pytest.mark.parametrize("body", [pytest.param(body, id=name) for name, (body, _) in UNPROCESSABLE.items()])
def test_unprocessable_signed_bodies_are_refused(client: TestClient, r: redis.Redis, body: bytes) -> None:
    """Refused as malformed (400), not acknowledged into the dead-letter queue (the reasons above say
    how each would fail in a worker)."""
    response = client.post(URL, **signed(body))
    assert queued_ids(r) == [] and response.status_code == 400, response.text


# -- Powens's endpoint ---------------------------------------------------------------------------------
POWENS_EVENTS = [
    "connection_synced",
    "user_deleted",
    "account_disabled",
    "connection_deleted",
    "user_created",
]
powens_paths = st.sampled_from(POWENS_EVENTS) | st.text(max_size=12)
powens_header_names = st.sampled_from(
    ["Content-Type", "Content-Encoding", "BI-Signature", "BI-Signature-Date", "X-Request-Id", "X-Other"]
)


@pytest.fixture
def powens(client_factory: Any) -> TestClient:
    client: TestClient = client_factory(peer="198.51.100.40", POWENS_WEBHOOK_SECRETS=POWENS_SECRET)
    return client


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    event=powens_paths,
    body=st.binary(max_size=2048),
    headers=st.dictionaries(powens_header_names, header_values, max_size=5),
)
def test_random_unsigned_powens_requests(
    powens: TestClient, r: redis.Redis, event: str, body: bytes, headers: dict[str, str]
) -> None:
    response = powens.post(POWENS_PREFIX + quote(event, safe=""), content=body, headers=headers)
    # Nothing random carries a valid HMAC: refused at the path, the media type, or the signature.
    assert response.status_code in (400, 401, 404, 415), response.text
    assert queued_ids(r) == []


def _powens_ids(value: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every path to a key named ``id``, ``id_*`` in a fixture: what the jobs key their rows by."""
    found: list[tuple[str, ...]] = []
    if isinstance(value, dict):
        for key, child in value.items():
            if key == "id" or key.startswith("id_"):
                found.append((*path, key))
            found += _powens_ids(child, (*path, key))
    elif isinstance(value, list):
        for n, child in enumerate(value):
            found += _powens_ids(child, (*path, str(n)))
    return found


def _set(event: Any, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        event = event[int(key)] if isinstance(event, list) else event[key]
    event[path[-1]] = value


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from(sorted(p.stem for p in POWENS_FIXTURES.glob("*.json"))))
def test_powens_fixtures_with_a_mistyped_id(
    powens: TestClient, r: redis.Redis, data: st.DataObject, name: str
) -> None:
    """Each id of each fixture given a value of another type, or out of int64: a 400 and no job when the
    event's job needs it; never a 5xx, and a job only for a 200 "queued"."""
    event = json.loads(powens_fixture(name))
    path = data.draw(st.sampled_from(_powens_ids(event)))
    _set(event, path, data.draw(st.sampled_from([None, "7", 1.5, True, [1], {"id": 1}, 0, -3, 2**63])))
    event["id_webhook_data"] = (
        data.draw(st.integers(1, 2**62)) if path != ("id_webhook_data",) else event[path[0]]
    )
    body = json.dumps(event).encode()
    before = len(queued_ids(r))
    response = powens.post(powens_url(name), **powens_signed(name, body))
    assert response.status_code in (200, 400), response.text
    queued = len(queued_ids(r)) - before
    assert queued == (1 if response.status_code == 200 and response.json()["status"] == "queued" else 0)
    keyed_by = name != "accounts.fetched" and path in (("id",), ("user", "id"), ("connection", "id"))
    if path == ("id_webhook_data",) or keyed_by:
        assert response.status_code == 400  # the delivery's id, or an id its job is keyed by


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.binary(max_size=4096)
    | st.builds(lambda b, n: gzip.compress(b)[:n], st.binary(max_size=512), st.integers(0, 600))
)
def test_signed_junk_as_gzip(powens: TestClient, r: redis.Redis, payload: bytes) -> None:
    """Signed bytes that claim to be gzip: whole streams are read, the rest is a 400, never a 5xx."""
    kwargs = powens_signed("user.deleted", payload)
    kwargs["headers"]["Content-Encoding"] = "gzip"
    response = powens.post(powens_url("user.deleted"), **kwargs)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"] in ("malformed_encoding", "malformed_event")
        assert queued_ids(r) == []
