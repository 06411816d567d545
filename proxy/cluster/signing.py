"""Signed forwards between the nodes of a cluster (pure: no HTTP framework, no I/O).

A node that forwards a request to another (``proxy.cluster.hop``) has already checked the client's key;
the client's ``Authorization`` never leaves it. Instead the forward says who the caller is (``Caller``:
role, model scope, the caller id per-key limits and client options are keyed by) and signs it, with the
cluster's shared secret, HMAC-SHA256 over::

    method \\n path?query \\n sha256(body) \\n timestamp \\n from-node \\n caller

in four headers: ``X-Cluster-Forward: <from-node>``, ``X-Cluster-Timestamp``, ``X-Cluster-Caller``
(base64url JSON) and ``X-Cluster-Signature`` (hex). The receiving node (``verify``) refuses a forward
that is unsigned, whose signature does not match (compared in constant time), or whose timestamp is
more than ``WINDOW`` seconds away from its own clock: ``Unauthorized`` (401, in the route's dialect).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.auth import Principal, Role
from proxy.errors import Unauthorized

FORWARD = "x-cluster-forward"
TIMESTAMP = "x-cluster-timestamp"
CALLER = "x-cluster-caller"
SIGNATURE = "x-cluster-signature"
HEADERS = (FORWARD, TIMESTAMP, CALLER, SIGNATURE)
WINDOW = 30.0  # seconds a forward stays valid, either side of the receiver's clock


@dataclass(frozen=True)
class Caller:
    """Who a forwarded request is for, as the entry node found it."""

    principal: Principal
    id: str  # perkey.caller_id: a hash of the key or token, or the client's address
    owner: str | None = None  # whose jobs it makes and sees (proxy.jobs.owner_of_key); None: not said

    def encode(self) -> str:
        return _encoded(self)

    @classmethod
    def decode(cls, text: str) -> Caller:
        try:
            data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            role = Role(data["role"])
            models = data["models"]
            who = data["id"]
            owner = data.get("owner")  # a node that does not say: None
            if not isinstance(who, str) or not (models is None or all(isinstance(m, str) for m in models)):
                raise ValueError("bad caller fields")
            if owner is not None and not isinstance(owner, str):
                raise ValueError("bad caller owner")
        except (binascii.Error, ValueError, KeyError, TypeError) as exc:
            raise Unauthorized(f"malformed cluster forward: caller ({type(exc).__name__})") from None
        return cls(Principal(role, frozenset(models) if models is not None else None), who, owner)


@functools.lru_cache(maxsize=4096)  # the same few callers forward again and again: encoded once each
def _encoded(caller: Caller) -> str:
    principal = caller.principal
    models = sorted(principal.models) if principal.models is not None else None
    data = {"role": int(principal.role), "models": models, "id": caller.id}
    if caller.owner is not None:
        data["owner"] = caller.owner
    raw = json.dumps(data, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@dataclass(frozen=True)
class Forward:
    """A verified forward: the node it came from and who the caller is."""

    node: str
    caller: Caller


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _message(method: str, target: str, digest: str, timestamp: str, node: str, caller: str) -> bytes:
    return "\n".join((method.upper(), target, digest, timestamp, node, caller)).encode()


class Signer:
    """Signs and checks forwards with the cluster's secret, as ``node``."""

    def __init__(self, secret: str | bytes, node: str) -> None:
        self._key = secret.encode() if isinstance(secret, str) else secret
        self.node = node

    def _mac(self, message: bytes) -> str:
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, method: str, target: str, body: bytes, caller: Caller, now: float) -> dict[str, str]:
        """The headers of a forward of ``method target`` (path with its query) with ``body``."""
        timestamp = f"{now:.3f}"
        who = caller.encode()
        mac = self._mac(_message(method, target, body_digest(body), timestamp, self.node, who))
        return {FORWARD: self.node, TIMESTAMP: timestamp, CALLER: who, SIGNATURE: mac}

    def verify(self, method: str, target: str, body: bytes, headers: Mapping[str, str], now: float) -> Forward:
        """The forward these headers carry; Unauthorized when unsigned, forged or stale."""
        node = headers.get(FORWARD)
        if not node:
            raise Unauthorized("not a cluster forward")
        timestamp, who, mac = headers.get(TIMESTAMP), headers.get(CALLER), headers.get(SIGNATURE)
        if not timestamp or not who or not mac:
            raise Unauthorized("unsigned cluster forward")
        expected = self._mac(_message(method, target, body_digest(body), timestamp, node, who))
        if not hmac.compare_digest(expected.encode(), mac.strip().lower().encode()):
            raise Unauthorized("cluster forward with a wrong signature")
        try:
            sent = float(timestamp)
        except ValueError:
            raise Unauthorized("cluster forward with a malformed timestamp") from None
        if not math.isfinite(sent) or abs(now - sent) > WINDOW:
            raise Unauthorized(f"stale cluster forward (signed {now - sent:.0f} s from this node's clock)")
        return Forward(node, Caller.decode(who))
