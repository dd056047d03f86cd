"""The one row builder (``Writer.page``) gives, from a page decoded strictly (msgspec structs) and from
the same page decoded generically (``json.loads`` with ``Decimal``: a page that does not fit the structs),
exactly the rows of the reference: the original builder, row by row, kept here verbatim. Same values
and types, same cursor, same COPY decision, same future ids, or the same error. Pages that do not fit
the schema fall back to the generic decode. Checked on both engines' row shapes, with the codec off
and on."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakebridge.world import render_json
from workers.bridge import Transaction, _typed_transaction_page
from workers.codec import AESGCMCodec, Codec, PlainCodec
from workers.db import Database, Tx
from workers.storage import clear, money, parse_date, parse_ts
from workers.writer import COPY_MIN_ROWS, Page, Writer

MISSING = object()

amounts = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-(10**9), max_value=10**9),
    st.sampled_from([Decimal("-12.30"), Decimal("0.00"), Decimal("5"), Decimal("1E+5"), Decimal("-0.0")]),
    st.sampled_from([Decimal("12345678901234567.89"), Decimal("0.1000000000000000055511151231257827")]),
    st.integers(-1000, 1000),
    st.sampled_from(["7.10", None, MISSING]),
)
days = st.sampled_from(["2026-11-20", "2026-01-01", "2025-12-31", "2026-11-20T10:00:00Z", None, "", MISSING])
texts = st.one_of(
    st.sampled_from(["Carrefour", "CB CARREFOUR 19/11", "XXXX", "Chèque 0012345", 'a\\b"c\n']),
    st.sampled_from([None, MISSING]),
    st.text(max_size=12),
)
stamps = st.sampled_from(
    [
        "2026-11-24T14:26:41.575Z", "2026-11-24T14:26:41.576Z", "2026-11-24T16:26:41.575+02:00",
        "2026-11-24T14:26:41.575", "2026-11-24T14:26:41.1234567Z", "2026-11-24T14:26:41Z", None, "", MISSING,
    ]
)  # fmt: skip
# As Bridge writes them (SQLite stores these by editing their text), and one that only looks alike.
bridge_stamps = st.sampled_from(
    ["2026-11-24T14:26:41.575Z", "2026-11-24T14:26:41.576Z", "2024-02-29T23:59:59.999Z",
     "2026-W48-4T05:00:42.661Z"]
)  # fmt: skip
flags = st.sampled_from([True, False, MISSING])


@st.composite
def transaction(draw: Any, stamps: Any = stamps) -> dict[str, Any]:
    fields = {
        "id": draw(st.integers(1, 40)),
        "account_id": draw(st.sampled_from([20_000_001, 20_000_002, MISSING])),
        "amount": draw(amounts), "currency_code": draw(st.sampled_from(["EUR", "USD", None, MISSING])),
        "date": draw(days), "booking_date": draw(days), "transaction_date": draw(days),
        "value_date": draw(days),
        "clean_description": draw(texts), "provider_description": draw(texts),
        "category_id": draw(st.sampled_from([273, 1, None, MISSING])),
        "operation_type": draw(st.sampled_from(["card", "transfer", None, MISSING])),
        "future": draw(flags), "deleted": draw(flags), "updated_at": draw(stamps),
    }  # fmt: skip
    if draw(st.booleans()):
        fields["unknown_field"] = {"nested": [1, 2.5]}
    return {k: v for k, v in fields.items() if v is not MISSING}


odd = st.sampled_from(
    [
        {"category_id": "273"}, {"future": None}, {"deleted": 1}, {"amount": True}, {"id": 1.0},
        {"currency_code": 12}, {"updated_at": 5}, {"date": "2026-13-45"}, {"updated_at": "yesterday"},
    ]
)  # fmt: skip


@st.composite
def page(draw: Any, stamps: Any = stamps) -> str:
    resources = draw(st.lists(transaction(stamps), max_size=30))
    if resources and draw(st.integers(0, 5)) == 0:  # now and then a value of another type
        resources[draw(st.integers(0, len(resources) - 1))].update(draw(odd))
    return render_json({"resources": resources, "pagination": {"next_uri": None}})


def outcome(build: Any) -> tuple[str, Any]:
    try:
        return "rows", build()
    except Exception as exc:
        return "error", type(exc)


_INT, _TEXT = {int}, {str, type(None)}
_PASS_THROUGH = ((1, _INT), (3, _TEXT), (8, _TEXT), (9, _TEXT), (10, {int, type(None)}), (11, _TEXT))


def reference(transactions: list[dict[str, Any]], dialect: str, codec: Codec) -> Page:
    """The original builder, row by row, with its COPY decision: rows of Python values."""
    enc = None if type(codec) is PlainCodec else codec.encode
    rows = []
    for t in transactions:
        get = t.get
        updated_at = parse_ts(get("updated_at"))
        clean, provider = clear(get("clean_description")), clear(get("provider_description"))
        if enc is not None:
            clean = enc(clean, "transactions.clean_description")
            provider = enc(provider, "transactions.provider_description")
        rows.append(
            (
                t["id"], get("account_id"), money(get("amount")), get("currency_code"),
                parse_date(get("date")), parse_date(get("booking_date")),
                parse_date(get("transaction_date")), parse_date(get("value_date")), clean, provider,
                get("category_id"), get("operation_type"), bool(get("future", False)),
                updated_at, updated_at if get("deleted") else None,
            )
        )  # fmt: skip
    latest = max((row[13] for row in rows if row[13] is not None), default=None)
    ids = {row[0] for row in rows}
    copyable = len(ids) == len(rows) and {type(i) for i in ids} <= _INT
    copyable = copyable and all({type(r[col]) for r in rows} <= allowed for col, allowed in _PASS_THROUGH)
    copy = dialect == "postgresql" and len(rows) >= COPY_MIN_ROWS and copyable
    future = [t["id"] for t in transactions if t.get("future") and not t.get("deleted")]
    return Page(rows, latest, copy, future)


def as_sqlite_stores(rows: list[tuple[Any, ...]], dialect: str) -> list[tuple[Any, ...]]:
    """The reference's rows as the engine takes them (SQLite: after db.py's value-by-value adaptation)."""
    return rows if dialect == "postgresql" else [tuple(Tx(None, "sqlite")._params(row)) for row in rows]


@pytest.fixture(params=["postgresql", "sqlite"])
def writers(request: pytest.FixtureRequest, tmp_path: Path) -> list[Writer]:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")  # no I/O here: only the dialect matters
    db.dialect = request.param
    return [Writer(db), Writer(db, AESGCMCodec([os.urandom(32)]))]


def decrypted(rows: list[tuple[Any, ...]], writer: Writer) -> list[tuple[Any, ...]]:
    codec = writer.codec
    return [
        (*r[:8], codec.decode(r[8], "transactions.clean_description"),
         codec.decode(r[9], "transactions.provider_description"), *r[10:])
        for r in rows
    ]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=page())
def test_typed_pages_give_the_rows_of_the_generic_decode(writers: list[Writer], body: str) -> None:
    same_rows(writers, body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=page(bridge_stamps))
def test_pages_of_bridge_timestamps_give_the_same_rows(writers: list[Writer], body: str) -> None:
    same_rows(writers, body)


def same_rows(writers: list[Writer], body: str) -> None:
    raw = body.encode()
    generic = json.loads(raw, parse_float=Decimal)["resources"]
    resources, next_uri = _typed_transaction_page(raw)
    assert next_uri is None
    assert all(type(t) is Transaction for t in resources) or resources == generic
    for writer in writers:
        dialect = writer.db.dialect
        expected = outcome(lambda w=writer, e=dialect: reference(generic, e, w.codec))
        for decoded in (resources, generic):  # strictly, and generically
            got = outcome(lambda w=writer, d=decoded: w.page(d))
            assert got[0] == expected[0], (got, expected)
            if got[0] == "error":
                assert got[1] is expected[1]
                continue
            want, have = expected[1], got[1]
            have_rows, want_rows = have.rows, as_sqlite_stores(want.rows, dialect)
            assert decrypted(have_rows, writer) == decrypted(want_rows, writer)
            for a, b in zip(have_rows, want_rows, strict=True):
                assert [type(v) for v in a[:8] + a[10:]] == [type(v) for v in b[:8] + b[10:]]
                assert all(str(x) == str(y) for x, y in zip(a, b, strict=True) if isinstance(x, Decimal))
            assert have.latest == want.latest
            assert have.latest is None or want.latest is None or have.latest.tzinfo == want.latest.tzinfo
            assert have.copy == want.copy
            assert sorted(have.future_ids) == sorted(want.future_ids)


def test_pages_that_do_not_fit_fall_back_to_the_generic_decode() -> None:
    for body in (
        b'{"resources":[{"id":1,"amount":NaN}]}',  # only Python's json takes NaN
        b'{"resources":[{"id":1,"clean_description":"\\ud800"}]}',  # a lone surrogate
        b'{"resources":[{"id":1,"category_id":"273"}]}',
        b"",
    ):
        resources, _ = _typed_transaction_page(body)
        assert resources == list(json.loads(body or b"{}", parse_float=Decimal).get("resources") or [])
    resources, next_uri = _typed_transaction_page(
        b'{"resources":[{"id":1,"amount":-12.30}],"pagination":{"next_uri":"/v3/x?after=1"}}'
    )
    assert type(resources[0]) is Transaction and str(resources[0].amount) == "-12.30"
    assert next_uri == "/v3/x?after=1"
