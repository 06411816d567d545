"""Requests in flight per caller (``limits.max_concurrent_per_key``), so one key cannot hold every slot.

A caller is its key or token (``caller_id``: a hash of it, never the key itself), or, when the proxy runs
with no keys, its client address. ``guarded`` takes a slot for each request to a user route (every model
call and list; admin routes are not counted, so an admin can always watch and unload) before its handler
runs: past the limit, ``TooManyRequests`` (429 with Retry-After, in the caller's dialect). The slot is held
until the response has been sent in full, a stream included, and so while the request waits in the queue:
``PerKeyLimit``, an ASGI middleware, gives it back when the app is done with the request, however it ended.
Requests a job makes to the proxy (``proxy.api.jobs``) are not counted: jobs have their own limits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import TooManyRequests

SLOTS = "proxy.key_slots"  # in the ASGI scope: what to give back when the request is done


def caller_id(key: str | None, address: str | None) -> str:
    """Who to count: the key or token sent (hashed), else the client's address (a proxy with no keys)."""
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"address:{address or 'unknown'}"


class InFlight:
    """How many requests each caller has in flight."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def of(self, who: str) -> int:
        return self._counts.get(who, 0)

    def hold(self, scope: Scope, who: str, limit: int) -> None:
        """Count one more request for ``who`` until the request is done; TooManyRequests past ``limit``
        (0: no limit). Outside ``PerKeyLimit`` (no slot list in the scope) nothing is counted."""
        held: list[Callable[[], None]] | None = scope.get(SLOTS)
        if held is None or not limit:
            return
        count = self._counts.get(who, 0)
        if count >= limit:
            who_is = "key" if who.startswith("key:") else "client address"
            raise TooManyRequests(
                f"this {who_is} has {count} requests in flight, the most it may have at once "
                f"(limits.max_concurrent_per_key); retry when one has finished"
            )
        self._counts[who] = count + 1
        held.append(lambda: self._give(who))

    def _give(self, who: str) -> None:
        left = self._counts.get(who, 0) - 1
        if left > 0:
            self._counts[who] = left
        else:
            self._counts.pop(who, None)


class PerKeyLimit:
    """ASGI middleware: gives back the slots a request held once the app has answered it in full."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: list[Callable[[], None]] = []
        scope[SLOTS] = held
        try:
            await self.app(scope, receive, send)
        finally:
            for give in held:
                give()
