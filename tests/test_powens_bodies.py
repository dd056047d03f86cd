"""Large Powens bodies: read without being built, spliced into the job, sent to Redis alone.

``powens_events.read`` (msgspec Structs and service/raw_json.py) must decide every body as
``powens_events.parse`` (the rules' exact form) does, and the job built around the raw body must
decode to exactly the envelope the parsed body gave.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from rq.job import Job
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from service import powens_events, raw_json
from service.events import MAX_DEPTH, MalformedEvent
from service.events import _depth as events_depth
from service.job import stored_zlib
from service.queue import ARCHIVE_KEY, MAX_BATCH_BYTES, ArchivedDelivery, EventQueue
from service.settings import Settings
from tests.support import POWENS_SECRET, powens_fixture, powens_signed, powens_url, queued_ids

NAMES = ["CONNECTION_SYNCED", "USER_DELETED", "ACCOUNT_DISABLED", "CONNECTION_DELETED", "ACCOUNTS_FETCHED"]
FIXTURE = {"CONNECTION_SYNCED": "connection.synced", "USER_DELETED": "user.deleted",
           "ACCOUNT_DISABLED": "account.disabled", "CONNECTION_DELETED": "connection.deleted",
           "ACCOUNTS_FETCHED": "accounts.fetched"}  # fmt: skip


def decision(name: str, body: bytes, how: Callable[[str, bytes], Any]) -> object:
    try:
        return ("accepted", how(name, body))
    except MalformedEvent:
        return "refused"


def exact(name: str, body: bytes) -> int | None:
    found: int | None = powens_events.parse(name, body).get("id_webhook_data")
    return found


def big_synced(transactions: int) -> bytes:
    """The CONNECTION_SYNCED fixture with ``transactions`` transactions on its first account."""
    event = json.loads(powens_fixture("connection.synced"))
    account = event["connection"]["accounts"][0]
    model = account["transactions"][0]
    account["transactions"] = [
        {**model, "id": 10_000 + n, "wording": f'CB [{n}] "é"\\'} for n in range(transactions)
    ]
    return json.dumps(event, ensure_ascii=False).encode()


def with_field(name: str, fragment: bytes) -> bytes:
    """The type's fixture with one more field, ``"x": <fragment>``, written as given."""
    body = powens_fixture(FIXTURE[name]).rstrip()
    return body[:-1] + b', "x": ' + fragment + b"}"


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b'[{"a": ' * (depth // 2) + b"[" * (depth % 2) + inner + b"]" * (depth % 2) + b"}]" * (depth // 2)


FRAGMENTS = {
    "plain": b'"ok"',
    "brackets in strings": b'["[[[[", "]]", "{", "\\"[", "\\\\", "\\\\\\"]"]',
    "depth 32 with the fixture": nested(MAX_DEPTH - 1),
    "depth 33 with the fixture": nested(MAX_DEPTH),
    "depth 33 around a string of brackets": nested(MAX_DEPTH, b'"]]]]]]]]]]"'),
    "depth 32 with brackets in strings": nested(MAX_DEPTH - 1, b'"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["'),
    "NaN": b"NaN",
    "-Infinity": b"-Infinity",
    "1e308": b"1e308",
    "1e309": b"1e309",
    "-1.5E+400": b"-1.5E+400",
    "1e-400": b"1e-400",
    "1e999 in a string": b'"1e999"',
    "299 digits": b"9" * 299,
    "310-digit float": b"9" * 310 + b".5",
    "5000-digit integer": b"9" * 5000,
    "5000 digits in a string": b'"' + b"9" * 5000 + b'"',
    "lone surrogate": b'"\\ud800"',
    "surrogate pair": b'"\\ud83d\\ude00"',
    "utf-8": '"é€😀"'.encode(),
    "encoded surrogate": b'"\xed\xa0\x80"',
    "invalid utf-8": b'"\xff"',
    "overlong utf-8": b'"\xc0\xaf"',
    "truncated utf-8": b'"\xe2\x82"',
    "control character": b'"a\x01"',
    "bad escape": b'"\\q"',
    "trailing comma": b"[1,]",
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fragment", list(FRAGMENTS.values()), ids=list(FRAGMENTS))
def test_read_decides_as_parse(name: str, fragment: bytes) -> None:
    body = with_field(name, fragment)
    assert decision(name, body, powens_events.read) == decision(name, body, exact)


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 1, "id": "x"}', b'{"id": "x", "id": 1}',
        b'{"id": 1, "id_webhook_data": 5, "id_webhook_data": 6}',
        b'{"\\u0069d": 3}', b'{"id": 1, "id_webhook_data": null}', b'{"id": 1.0}', b'{"id": true}',
        b'{"id": 9223372036854775807}', b'{"id": 9223372036854775808}', b'\xef\xbb\xbf{"id": 1}',
        b' {"id": 1} ', b'{"id": 1} x', b"[]", b"{}", b'{"id": 1e3}', b'{"id": -1}', b'"{}"',
        b'{"user": {"id": 1}, "connection": {"id": 2, "accounts": null}}',
        b'{"user": {"id": 1}, "connection": {"id": 2, "state": null, "accounts": [{"id": 3}]}}',
        b'{"user": {"id": 1}, "connection": {"id": 2, "accounts": [{"id": 3, "transactions": null}]}}',
        b'{"user": {"id": 1}, "connection": {"id": 2, "state": "SCARequired",'
        b' "accounts": [{"id": 3, "transactions": [{"id": 4}]}]}}',
        b'{"user": [1], "connection": {"id": 2}}', b'{"user": {"id": 1}, "connection": [2]}',
    ],
)  # fmt: skip
@pytest.mark.parametrize("name", NAMES)
def test_read_decides_as_parse_on_ids(name: str, body: bytes) -> None:
    assert decision(name, body, powens_events.read) == decision(name, body, exact)


keys = st.sampled_from(["id", "a", "[", "id_webhook_data"])
floats = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | floats
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from('[]{}"\\'), max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=12,
)  # fmt: skip
raw_fragments = st.sampled_from(list(FRAGMENTS.values())) | json_values.map(
    lambda v: json.dumps(v, ensure_ascii=False).encode()
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    fragments=st.lists(raw_fragments, min_size=1, max_size=4),
    depth=st.integers(0, 34),
)
def test_read_decides_as_parse_on_random_bodies(name: str, fragments: list[bytes], depth: int) -> None:
    body = with_field(name, nested(depth, b"[" + b", ".join(fragments) + b"]"))
    assert decision(name, body, powens_events.read) == decision(name, body, exact)


def test_the_fixtures_and_a_large_body_are_read_without_being_built() -> None:
    """What ``read`` allocates for a 2 MB body is a small part of it; ``parse`` many times it."""
    body = big_synced(8_000)
    assert len(body) > 2_000_000 and raw_json.plain(body, MAX_DEPTH)
    tracemalloc.start()
    try:
        assert powens_events.read("CONNECTION_SYNCED", body) == 5537101
        _, light = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        powens_events.parse("CONNECTION_SYNCED", body)
        _, heavy = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert light < len(body) // 3 and heavy > 2 * len(body), (light, heavy)
    for name, fixture in FIXTURE.items():
        assert raw_json.plain(powens_fixture(fixture), MAX_DEPTH), name


@settings(max_examples=60, deadline=None)
@given(
    pad=st.integers(0, 70_000),
    text=st.text(alphabet=st.sampled_from('[]{}"\\aé'), min_size=1, max_size=40),
    depth=st.integers(MAX_DEPTH - 2, MAX_DEPTH + 1),
)
def test_depth_across_the_chunks(pad: int, text: str, depth: int) -> None:
    """Strings of brackets, quotes and backslashes over the 64 KiB chunks' edges, wherever they fall."""
    strings = [text * n for n in (1, 50, 2000)]
    value = {"pad": "x" * pad, "s": strings, "d": json.loads(nested(depth - 1, json.dumps(strings).encode()))}
    body = json.dumps(value, ensure_ascii=False).encode()
    assert raw_json.depth_within(body, MAX_DEPTH) == (events_depth(value) <= MAX_DEPTH)


@pytest.mark.parametrize("compressed", [False, True])
def test_a_large_delivery_job_is_the_envelope_of_its_body(
    client_factory: Callable[..., TestClient], r: redis.Redis, compressed: bool
) -> None:
    """Over MAX_BATCH_BYTES (the queue's call of its own) and over many zlib blocks: the worker's job
    decodes to exactly the envelope of the parsed body."""
    client = client_factory(peer="198.51.100.40", POWENS_WEBHOOK_SECRETS=POWENS_SECRET)
    body = big_synced(4_000)
    assert len(body) > MAX_BATCH_BYTES
    sent = gzip.compress(body) if compressed else body
    kwargs = powens_signed("connection.synced", sent)
    if compressed:
        kwargs["headers"]["Content-Encoding"] = "gzip"
    response = client.post(powens_url("connection.synced"), **kwargs)
    assert response.json() == {"status": "queued", "event_id": "powens-connection_synced-5537101"}
    job = Job.fetch(queued_ids(r)[0], connection=r, serializer=JSONSerializer)
    (_, fields), = r.xrange(ARCHIVE_KEY)  # fmt: skip
    assert fields[b"body"] == body
    expected = powens_events.envelope("CONNECTION_SYNCED", json.loads(body), int(fields[b"received_at"]))
    assert job.args == [expected] and list(job.args[0]) == [
        "type",
        "provider",
        "id_webhook_data",
        "content",
        "timestamp",
    ]
    assert job.func_name == "workers.powens_jobs.connection_synced"


def test_an_envelope_without_id_webhook_data(
    client_factory: Callable[..., TestClient], r: redis.Redis
) -> None:
    client = client_factory(peer="198.51.100.40", POWENS_WEBHOOK_SECRETS=POWENS_SECRET)
    body = b'{"id": 42, "name": "\\u00e9t\\u00e9", "n": 1.50}'
    assert (
        client.post(powens_url("user.deleted"), **powens_signed("user.deleted", body)).json()["status"]
        == "queued"
    )
    (job_id,) = queued_ids(r)
    (event,) = Job.fetch(job_id, connection=r, serializer=JSONSerializer).args
    content = {"id": 42, "name": "été", "n": 1.5}
    assert event == {"type": "USER_DELETED", "provider": "powens", "id_webhook_data": None,
                     "content": content, "timestamp": event["timestamp"]}  # fmt: skip


def test_large_deliveries_go_alone_and_small_ones_share_calls(
    settings_factory: Callable[..., Settings], r: redis.Redis
) -> None:
    """Submitted in one turn: small, small, large, small, medium (over a zlib block), large: four
    calls, each large one alone, all in Redis when their futures resolve."""
    queue = EventQueue(settings_factory(POWENS_WEBHOOK_SECRETS=POWENS_SECRET))
    large = big_synced(4_000)
    medium = big_synced(300)
    assert 65535 < len(medium) < MAX_BATCH_BYTES < len(large)
    bodies = [b'{"id": 1}', b'{"id": 2}', large, b'{"id": 3}', medium, large.replace(b"5537101", b"5537102")]
    calls = "bridgehook_enqueue_batch_size_count"

    async def run() -> list[str]:
        await queue.open()
        try:
            futures = []
            for n, body in enumerate(bodies):
                argument = powens_events.envelope_json("USER_DELETED", None, body, 1)
                archive = ArchivedDelivery(b"USER_DELETED", b"1", b"", b"", b"r%d" % n, body)
                job = "workers.powens_jobs.user_deleted"
                futures.append(
                    queue.submit(f"e{n}", job, {"type": "USER_DELETED"}, archive, argument=argument)
                )
            return list(await asyncio.gather(*futures))
        finally:
            await queue.close()

    before = REGISTRY.get_sample_value(calls) or 0.0
    assert asyncio.run(run()) == ["queued"] * 6
    assert (REGISTRY.get_sample_value(calls) or 0.0) - before == 4  # [1, 2], [large], [3, medium], [large]
    assert queued_ids(r) == [f"e{n}" for n in range(6)]
    for n, body in enumerate(bodies):
        (event,) = Job.fetch(f"e{n}", connection=r, serializer=JSONSerializer).args
        assert event["content"] == json.loads(body)
    assert [f[b"body"] for _, f in r.xrange(ARCHIVE_KEY)] == bodies


@pytest.mark.parametrize("sizes", [(0,), (65535,), (65536,), (3, 65533, 1), (70_000, 0, 200_000)])
def test_stored_zlib_of_pieces_is_their_concatenation(sizes: tuple[int, ...]) -> None:
    import zlib

    pieces = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
    stream = stored_zlib(*pieces)
    assert zlib.decompress(stream if isinstance(stream, bytes) else b"".join(stream)) == b"".join(pieces)
    if sum(sizes) > 65535:  # framed around views of the large pieces: none of them copied
        assert any(isinstance(p, memoryview) and p.obj is pieces[-1] for p in stream)
