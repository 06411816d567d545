"""The hop: a request this node will not serve, forwarded to another node and its answer relayed back.

``Hop.forward`` sends the client's request (method, path with query, body, its headers but the client's
credentials) to a node's advertise URL with aiohttp, signed (``proxy.cluster.signing``), and answers
the client with the other node's status, headers and body. An answer of a known length up to
``WHOLE_BYTES`` (a JSON answer, an error) is read whole and answered as a plain response (cheaper than a
relay's two tasks per request); any other (SSE, NDJSON, audio bytes: chunked) is passed on chunk by chunk
as it arrives, nothing buffered or parsed. The first target that answers serves it; one
that cannot be reached (refused, or no connection within ``connect_timeout``) is skipped for the next,
which is safe because nothing has reached the client yet (so is one that hangs up before the end of a
known-length answer); when none answers, ``Unavailable`` (503 with
Retry-After). Once the answer has started there is no retry: its end, or the client's going away
(``ClosingStream``), closes the upstream connection, so the other node sees its client go as a local
client's going would be seen. A node the registry sees dead (``cut``: its heartbeats stopped, as when it is
SIGSTOPped or its link is cut, where the kernel may still take the connection and nothing ever answers) ends
every forward to it in flight: one still waiting for its answer's head with ``Unavailable`` (503 with
Retry-After), one whose body is coming cut (the client's stream breaks, as when a local worker dies). There is
no head timeout: a cold load or a long answer may rightly take minutes before its headers. Forwards are
counted by node and outcome, with the time they added: ``X-Cluster-Took`` (the serving node's own time to its
answer's headers) is taken from the time to the answer's headers here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from starlette.responses import Response

from proxy.clock import Clock
from proxy.cluster.signing import HEADERS as SIGNED_HEADERS
from proxy.cluster.signing import Caller, Signer
from proxy.errors import Unavailable
from proxy.streaming import ClosingStream

log = logging.getLogger("proxy.cluster")

SERVED_BY = "x-served-by"
TOOK = "x-cluster-took"
CONNECT_TIMEOUT = 1.0  # a node that does not take the connection within this is taken as dead
RETRY_AFTER = 1.0
WHOLE_BYTES = 1 << 20  # an answer of a known length up to this is read whole before it is answered

# never forwarded: the client's credentials stay on the entry node; hop-by-hop and per-connection headers
_NOT_SENT = frozenset(
    {
        "authorization",
        "x-api-key",
        "cookie",
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "proxy-authorization",
        "expect",
        "origin",  # checked by the entry node (RequestGuard); the serving node's own pages are another host
        "referer",
        *SIGNED_HEADERS,
    }
)
_NOT_RETURNED = frozenset({"connection", "keep-alive", "transfer-encoding", "date", "server", TOOK})


class _Dead(Exception):
    """The node was cut (seen dead) before its answer's head came."""


@dataclass(frozen=True)
class Target:
    node: str
    url: str  # its advertise URL


@dataclass(frozen=True)
class Outcome:
    """One forward, for the metrics: the node, ``ok``, ``unreachable`` or ``dead`` (cut), and the seconds it added."""

    node: str
    outcome: str
    added: float | None


class Hop:
    def __init__(
        self,
        signer: Signer,
        clock: Clock,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        on_forward: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.signer = signer
        self.clock = clock
        self.connect_timeout = connect_timeout
        self._on_forward = on_forward
        self._session: aiohttp.ClientSession | None = None
        self._open: dict[str, set[Callable[[], None]]] = {}  # node -> how to end each forward to it in flight

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use, inside the event loop that uses it."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, use_dns_cache=False),
                cookie_jar=aiohttp.DummyCookieJar(),  # nodes set no cookies: none to store or send back
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.connect_timeout, sock_connect=self.connect_timeout, sock_read=None
                ),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def open_to(self) -> list[str]:
        """The nodes with forwards in flight."""
        return list(self._open)

    def cut(self, node: str) -> int:
        """``node`` was seen dead: every forward to it in flight ends now (see the module's doc); how many."""
        ends = self._open.pop(node, set())
        for end in ends:
            end()
        return len(ends)

    def _watch(self, node: str, end: Callable[[], None]) -> Callable[[], None]:
        """``end`` is called if ``node`` is cut; the answer forgets it."""
        self._open.setdefault(node, set()).add(end)

        def forget() -> None:
            ends = self._open.get(node)
            if ends is not None:
                ends.discard(end)
                if not ends:
                    del self._open[node]

        return forget

    def _note(self, outcome: Outcome) -> None:
        if self._on_forward is not None:
            self._on_forward(outcome)

    async def forward(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        caller: Caller,
        targets: Sequence[Target],
    ) -> Response:
        """The answer of the first of ``targets`` that takes the request ``method target`` (path with
        query); Unavailable (503) when none does."""
        sent = {k: v for k, v in headers.items() if k.lower() not in _NOT_SENT}
        failed: list[str] = []
        for node in targets:
            started = self.clock.monotonic()
            signed = {**sent, **self.signer.sign(method, target, body, caller, self.clock.time())}
            try:
                response = await self._head(node.node, method, node.url.rstrip("/") + target, signed, body)
            except _Dead as exc:
                log.warning("cluster: node %s stopped answering a forward: it is dead", node.node)
                self._note(Outcome(node.node, "dead", None))
                raise Unavailable(f"node {node.node} stopped answering", retry_after=RETRY_AFTER) from exc
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                log.warning("cluster: node %s (%s) unreachable: %s", node.node, node.url, type(exc).__name__)
                failed.append(node.node)
                self._note(Outcome(node.node, "unreachable", None))
                continue
            added = self.clock.monotonic() - started
            try:
                added = max(0.0, added - float(response.headers.get(TOOK, "0")))
            except ValueError:
                pass
            whole = _whole(response)
            if whole:
                forget = self._watch(node.node, _ender(node.node, response))  # a cut: the next node
                try:  # a small answer of a known length: here already, or about to be
                    content = await response.read()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    log.warning("cluster: node %s (%s) cut its answer: %s", node.node, node.url, type(exc).__name__)
                    response.close()
                    failed.append(node.node)
                    self._note(Outcome(node.node, "unreachable", None))
                    continue
                finally:
                    forget()
            self._note(Outcome(node.node, "ok", added))
            if whole:
                return Response(content, status_code=response.status, headers=_returned(response))
            return self._relay(node.node, response)
        raise Unavailable(
            f"no node could take the request: {', '.join(failed) or 'none'} unreachable", retry_after=RETRY_AFTER
        )

    async def _head(
        self, node: str, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> aiohttp.ClientResponse:
        """``_send``, ended with _Dead as soon as ``node`` is cut."""
        head = asyncio.timeout(None)
        try:
            async with head:
                forget = self._watch(node, lambda: head.reschedule(0))
                try:
                    return await self._send(method, url, headers, body)
                finally:
                    forget()
        except TimeoutError as exc:
            if head.expired():
                raise _Dead(node) from exc
            raise  # aiohttp's connect timeout: unreachable

    async def _send(self, method: str, url: str, headers: dict[str, str], body: bytes) -> aiohttp.ClientResponse:
        """The answer's head; one more try on the same node when a pooled connection was closed under it."""
        try:
            return await self.session.request(method, url, data=body or None, headers=headers)
        except aiohttp.ServerDisconnectedError:
            return await self.session.request(method, url, data=body or None, headers=headers)

    def _relay(self, node: str, response: aiohttp.ClientResponse) -> ClosingStream:
        finished = False

        forget = self._watch(node, _ender(node, response))  # the client's stream breaks

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal finished
            async for chunk in response.content.iter_any():
                yield chunk
            finished = True

        async def close() -> None:
            forget()
            if finished:
                response.release()  # the connection goes back to the pool
            else:
                response.close()  # cut: the other node sees its client go

        return ClosingStream(
            chunks(), on_close=close, status_code=response.status, headers=_returned(response), media_type=None
        )


def _ender(node: str, response: aiohttp.ClientResponse) -> Callable[[], None]:
    """What ends ``response``'s body when ``node`` is seen dead: its next read fails."""

    def end() -> None:
        response.content.set_exception(aiohttp.ClientPayloadError(f"node {node} stopped answering"))

    return end


def _returned(response: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower() not in _NOT_RETURNED}


def _whole(response: aiohttp.ClientResponse) -> bool:
    """An answer of a known length up to ``WHOLE_BYTES`` (a JSON answer, an error): read whole and answered
    as a plain response, cheaper than a relay's tasks; anything else (a stream) is relayed chunk by chunk."""
    length = response.content_length
    return length is not None and length <= WHOLE_BYTES
