"""The signature scheme on its own: what verifies and what does not."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from service.settings import Secret
from service.signing import SignatureError, SignatureVerifier, sign, signature_header

BODY = (
    b'{"type":"item.created","content":{"item_id":1,"user_uuid":"'
    b'16369a41-6d2b-4750-85cd-60e366fbdcb8"},"timestamp":1}'
)
A, B = "secret-a-0123456789", "secret-b-0123456789"


def test_sign_is_uppercase_hmac_sha256_of_the_raw_body() -> None:
    expected = hmac.new(A.encode(), BODY, hashlib.sha256).hexdigest().upper()
    assert sign(BODY, A) == expected
    assert signature_header(BODY, [A, B]) == f"v1={sign(BODY, A)},v1={sign(BODY, B)}"


def reason(verifier: SignatureVerifier, header: str | None, body: bytes = BODY) -> str | None:
    try:
        verifier.verify(header, body)
    except SignatureError as exc:
        return exc.reason
    return None


def test_verify() -> None:
    v = SignatureVerifier([Secret(A), Secret(B)])
    assert reason(v, f"v1={sign(BODY, A)}") is None
    assert reason(v, f"v1={sign(BODY, B).lower()}") is None
    assert reason(v, f" v1 = {sign(BODY, A)} ") is None
    assert reason(v, f"V1={sign(BODY, A)}") is None
    assert reason(v, f"v1=00,v1={sign(BODY, B)}") is None
    assert reason(v, None) == "missing_signature"
    assert reason(v, "   ") == "missing_signature"
    assert reason(v, "v2=" + sign(BODY, A)) == "invalid_signature"
    assert reason(v, "v1=" + sign(BODY, A)[:63]) == "invalid_signature"
    assert reason(v, "v1=" + sign(BODY, A) + "00") == "invalid_signature"
    assert reason(v, "v1=" + sign(BODY + b" ", A)) == "invalid_signature"
    assert reason(v, "v1=" + sign(BODY, "another-secret-xyz")) == "invalid_signature"
    assert reason(v, "v1=é" + sign(BODY, A)[2:]) == "invalid_signature"


def test_a_valid_element_past_the_element_limit_is_not_read() -> None:
    v = SignatureVerifier([Secret(A)])
    header = ",".join(["v1=00"] * 20 + [f"v1={sign(BODY, A)}"])
    assert reason(v, header) == "invalid_signature"


def test_verifier_repr_hides_secrets() -> None:
    assert A not in repr(SignatureVerifier([Secret(A)]))
    with pytest.raises(ValueError):
        SignatureVerifier([])
