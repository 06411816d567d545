"""Signed forwards between nodes (proxy.cluster.signing): a forged, unsigned or stale forward is refused."""

from __future__ import annotations

import pytest

from proxy.auth import Principal, Role
from proxy.cluster.signing import CALLER, FORWARD, SIGNATURE, TIMESTAMP, WINDOW, Caller, Signer
from proxy.errors import Unauthorized

SECRET = "s" * 32
CALLER_A = Caller(Principal(Role.USER, frozenset({"smol", "tiny"})), "key:abc")


def test_a_signed_forward_verifies_and_carries_the_caller() -> None:
    a, b = Signer(SECRET, "a"), Signer(SECRET, "b")
    headers = a.sign("POST", "/v1/chat/completions?x=1", b"{}", CALLER_A, now=1000.0)
    seen = b.verify("POST", "/v1/chat/completions?x=1", b"{}", headers, now=1010.0)
    assert seen.node == "a"
    assert seen.caller == CALLER_A
    admin = Caller(Principal(Role.ADMIN), "address:127.0.0.1")
    headers = a.sign("GET", "/api/tags", b"", admin, now=5.0)
    assert b.verify("GET", "/api/tags", b"", headers, now=5.0).caller == admin


@pytest.mark.parametrize(
    ("method", "target", "body", "secret"),
    [
        ("GET", "/v1/chat/completions?x=1", b"{}", SECRET),  # another method
        ("POST", "/v1/chat/completions?x=2", b"{}", SECRET),  # another query
        ("POST", "/v1/embeddings?x=1", b"{}", SECRET),  # another path
        ("POST", "/v1/chat/completions?x=1", b"{ }", SECRET),  # another body
        ("POST", "/v1/chat/completions?x=1", b"{}", "t" * 32),  # another secret
    ],
)
def test_anything_changed_breaks_the_signature(method: str, target: str, body: bytes, secret: str) -> None:
    headers = Signer(secret, "a").sign("POST", "/v1/chat/completions?x=1", b"{}", CALLER_A, now=0.0)
    with pytest.raises(Unauthorized, match="wrong signature"):
        Signer(SECRET, "b").verify(method, target, body, headers, now=0.0)


def test_a_changed_caller_or_node_breaks_the_signature() -> None:
    a = Signer(SECRET, "a")
    headers = a.sign("POST", "/p", b"", CALLER_A, now=0.0)
    admin = Caller(Principal(Role.ADMIN), "key:abc").encode()
    with pytest.raises(Unauthorized, match="wrong signature"):
        a.verify("POST", "/p", b"", {**headers, CALLER: admin}, now=0.0)
    with pytest.raises(Unauthorized, match="wrong signature"):
        a.verify("POST", "/p", b"", {**headers, FORWARD: "c"}, now=0.0)
    with pytest.raises(Unauthorized, match="wrong signature"):
        a.verify("POST", "/p", b"", {**headers, TIMESTAMP: "1.000"}, now=0.0)


def test_unsigned_and_stale_forwards_are_refused() -> None:
    a = Signer(SECRET, "a")
    headers = a.sign("POST", "/p", b"", CALLER_A, now=100.0)
    with pytest.raises(Unauthorized, match="not a cluster forward"):
        a.verify("POST", "/p", b"", {}, now=100.0)
    for missing in (TIMESTAMP, CALLER, SIGNATURE):
        partial = {k: v for k, v in headers.items() if k != missing}
        with pytest.raises(Unauthorized, match="unsigned"):
            a.verify("POST", "/p", b"", partial, now=100.0)
    assert a.verify("POST", "/p", b"", headers, now=100.0 + WINDOW).node == "a"
    assert a.verify("POST", "/p", b"", headers, now=100.0 - WINDOW).node == "a"
    for now in (100.0 + WINDOW + 0.01, 100.0 - WINDOW - 0.01):
        with pytest.raises(Unauthorized, match="stale"):
            a.verify("POST", "/p", b"", headers, now=now)


def test_a_malformed_caller_is_a_401_not_a_crash() -> None:
    a = Signer(SECRET, "a")
    for junk in ("!!!", "e30", "eyJyb2xlIjo5fQ"):  # not base64, {}, {"role":9}
        headers = a.sign("POST", "/p", b"", CALLER_A, now=0.0)
        forged = {**headers, CALLER: junk}
        forged[SIGNATURE] = a._mac("\n".join(("POST", "/p", a_digest(), headers[TIMESTAMP], "a", junk)).encode())
        with pytest.raises(Unauthorized, match="malformed"):
            a.verify("POST", "/p", b"", forged, now=0.0)


def a_digest() -> str:
    from proxy.cluster.signing import body_digest

    return body_digest(b"")
