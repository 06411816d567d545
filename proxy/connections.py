"""Connections: how long a request may take to arrive, and how many connections may be open at once.

uvicorn closes a connection that stays idle between requests (``timeout_keep_alive``), but it waits for ever
for a request whose headers never end, and it accepts connections until the process runs out of file
descriptors (issue 26: 20,100 half-sent requests, and /health got no answer). ``bounded(...)`` is the HTTP
protocol class uvicorn picks by itself (httptools', from uvicorn[standard]) with both bounds, handed to
uvicorn as ``http=`` (``proxy.cli``):

- ``server.header_timeout``: a request's headers must be complete within it from the connection's start (or
  from the first byte of the next request on a kept-alive connection), else the client gets a 408 and the
  connection is closed; while the app reads a body, the body may not pause longer than that (a pause the
  app makes, uvicorn's flow control holding the socket, does not count).
- ``server.max_connections``: past it, a new connection closes the connection that has waited longest
  without serving a request (one still sending its headers, or idle between requests); when every
  connection is serving a request, the new one is answered 503 with Retry-After and closed at once. A flood
  of half-sent requests thus only ever evicts itself: an admin's /health gets a connection and its answer.

The proxy process's file descriptor limit is raised (its soft limit, up to the hard one) to leave room for
``max_connections`` (``raise_fd_limit``). No app here: this is the server side of the HTTP edge.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.handoff import CONNECTION

log = logging.getLogger("proxy.connections")

FD_HEADROOM = 512  # file descriptors kept for the rest of the proxy: workers' sockets and pipes, logs, sqlite
LOG_EVERY = 60.0  # seconds between two warnings about connections closed for the cap or the timeout


def _raw(status: str, message: str, extra: str = "") -> bytes:
    body = message.encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode() + body


TIMED_OUT = _raw("408 Request Timeout", "the request did not arrive within server.header_timeout")
FULL = _raw("503 Service Unavailable", "too many open connections (server.max_connections)", "retry-after: 1\r\n")


class _Tally:
    """Connections closed by the bounds since the last warning (one warning a minute at most)."""

    def __init__(self) -> None:
        self.counts = {"timed out": 0, "evicted": 0, "refused": 0}
        self.last = float("-inf")

    def add(self, what: str, now: float, limits: str) -> None:
        self.counts[what] += 1
        if now - self.last >= LOG_EVERY:
            said = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
            log.warning("closed connections (%s): %s", limits, said)
            self.counts = dict.fromkeys(self.counts, 0)
            self.last = now


class BoundedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's arrival and a cap on connections.
    ``bounded`` makes one subclass per server, whose class attributes hold its settings and its connections
    that serve no request now, oldest first."""

    header_timeout: ClassVar[float] = 0.0  # 0: no deadline
    max_connections: ClassVar[int] = 0  # 0: no cap
    waiting: ClassVar[dict[BoundedHttp, None]]  # connections serving no request, in the order they began to wait
    tally: ClassVar[_Tally]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None

    # the connection's life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections and len(self.connections) > self.max_connections and not self._make_room():
            return
        self._wait()
        self._arm()  # the first request's headers are due from now

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[CONNECTION] = self  # type: ignore[literal-required]  # the stream handoff's (proxy.handoff)

    async def flushed(self) -> None:
        """Until what the transport holds of this connection's answer has gone to the kernel (at once when it
        holds nothing, the usual case): the stream handoff's worker writes after the head."""
        if self.transport.get_write_buffer_size() == 0:
            return
        self.transport.set_write_buffer_limits(high=0)  # paused now; resumed (flow.drain returns) once empty
        try:
            await self.flow.drain()
        finally:
            self.transport.set_write_buffer_limits()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.waiting.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm()
            return
        cycle = self.cycle
        if cycle is not before:  # a request's headers are complete: it is being served
            self.waiting.pop(self, None)
            self._disarm()
        if cycle is not None and not cycle.response_complete:
            if cycle.more_body:
                self._arm(again=True)  # the body's longest pause, from its last chunk
            else:
                self._disarm()  # the app has the whole request: no limit on its answer here
        elif self._timer is None:
            self._arm()  # the next request's first bytes: its headers are due within the timeout, once

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._wait()  # idle between requests (uvicorn's keep-alive timeout closes it in time)

    # the deadline

    def _arm(self, *, again: bool = False) -> None:
        if not self.header_timeout:
            return
        if self._timer is not None:
            if not again:
                return
            self._timer.cancel()
        self._timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not cycle.more_body:
                return
            if self.flow.read_paused or cycle.waiting_for_100_continue:  # the app has not read what came, or not
                self._arm()  # asked for the body yet (the client waits for its 100 Continue): not the client's pause
                return
            self.tally.add("timed out", self.loop.time(), "server.header_timeout")
            self.transport.close()  # the app, waiting for the body, sees its client go
            return
        self.tally.add("timed out", self.loop.time(), "server.header_timeout")
        self.transport.write(TIMED_OUT)
        self.transport.close()

    # the cap

    def _wait(self) -> None:
        self.waiting.pop(self, None)
        self.waiting[self] = None  # at the end: the newest to wait

    def _make_room(self) -> bool:
        """Over the cap: close the connection waiting longest, else refuse this one (False)."""
        now = self.loop.time()
        for other in self.waiting:
            if other is not self and not other.transport.is_closing():
                self.waiting.pop(other)
                other._disarm()
                other.transport.close()
                self.tally.add("evicted", now, "server.max_connections")
                return True
        self.tally.add("refused", now, "server.max_connections")
        self.transport.write(FULL)
        self.transport.close()
        return False


def bounded(header_timeout: float, max_connections: int) -> type[BoundedHttp]:
    """The protocol class for one server with these bounds (0: none)."""
    return type(
        "BoundedHttp",
        (BoundedHttp,),
        {
            "header_timeout": header_timeout,
            "max_connections": max_connections,
            "waiting": {},
            "tally": _Tally(),
        },
    )


def raise_fd_limit(max_connections: int) -> None:
    """Raise the soft limit on open files to hold ``max_connections`` and the proxy's own (up to the hard
    limit); a warning when even the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit to %d: %s", new, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "server.max_connections is %d but the proxy may open only %d files (ulimit -n): lower one, or raise it",
            max_connections,
            soft,
        )
