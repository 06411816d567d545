"""The proxy's side of the stream handoff: a streamed chat answer whose tokens do not pass through the proxy.

Relaying a real model's stream costs the proxy a wake-up, a read, the parsers and a write per token (~380 us of
CPU each on this machine, issue 23). For a streamed OpenAI ``/v1/chat/completions`` or ``/v1/completions`` of a
local worker (``proxy.worker``: no dialect to translate, its SSE is the client's) over plain HTTP/1.1, the proxy
instead:

1. offers the request to the worker's handoff socket with the client's socket attached (``SCM_RIGHTS``;
   ``offer``); the worker begins the stream as over HTTP and says ok, or answers an error, which the proxy
   raises as any worker's error (the client's socket untouched: a 400 stays a 400);
2. sends the answer's head through the ASGI ``send`` as usual (so the middleware adds its headers, and the
   server, uvicorn, frames the body as chunked and keeps the connection's state), waits until the head is in
   the kernel (``Connection.flushed``) and tells the worker ``go``;
3. the worker's generating thread writes each chunk straight to the client (``proxy.worker.handoff``);
4. the proxy waits for the worker's end line, and meanwhile tells it ``stop`` when the client goes away,
   calls ``note.first_chunk`` (time to first token) at its ``first`` line, and passes its ``writing`` lines
   to the lease (the stall watchdog: a worker blocked on a client that does not read is not hung);
5. at the end line it counts the tokens, sends the empty last chunk through ``send`` (the connection stays
   open for the next request) and releases the lease (``on_close``). A worker that dies mid-stream: the
   dialect's error event, as the relay sends, or, when it died in the middle of a write (a frame may be cut),
   the connection is aborted: the client sees a broken stream, never a silent end.

Anything else (TLS, HTTP/1.0, a job's or a cluster forward's own scope, an external server, the setting
``server.stream_handoff: false``, a worker without a handoff socket) goes through the relay as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from proxy.errors import ProxyError, WorkerHung, WorkerUnavailable
from proxy.events import RequestNote
from proxy.upstream import Upstream, error_of
from proxy.wire import HANDOFF_GO, HANDOFF_STOP, HandoffRequest, client_gone, handoff_path

PROGRESS_MAX = 5.0  # seconds between a writing worker's progress lines at most
DEATH_GRACE = 10.0  # seconds a worker killed as hung has to be seen gone before the connection is aborted
CONNECTION = "proxy.connection"  # in the ASGI scope: the HTTP connection serving it (``connections.BoundedHttp``)


class Connection(Protocol):
    """What the handoff uses of the client's connection (``proxy.connections.BoundedHttp``)."""

    @property
    def transport(self) -> asyncio.Transport: ...

    async def flushed(self) -> None: ...


@dataclass(frozen=True)
class Handoff:
    """A stream that may be handed off: whether to drop the usage chunk the client did not ask for, and the
    dialect's error event for a worker that dies mid-stream."""

    drop_usage: bool
    on_error: Callable[[ProxyError], bytes]


def connection(scope: Scope) -> Connection | None:
    """The client's connection when its stream can be handed off (plain HTTP/1.1, open); else None."""
    conn: Connection | None = scope.get(CONNECTION)
    if conn is None or scope.get("scheme") != "http" or scope.get("http_version") != "1.1":
        return None
    if conn.transport.is_closing() or conn.transport.get_extra_info("socket") is None:
        return None
    return conn


@dataclass
class Offered:
    """A stream the worker has begun, waiting for ``go``."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_timeout: float  # 0: none
    hung: Callable[[], WorkerHung]  # tells the supervisor, which kills the worker; the error to end with


async def offer(upstream: Upstream, conn: Connection, path: str, body: bytes, drop_usage: bool) -> Offered | None:
    """Offer the stream to the worker (``upstream``: a local worker's, over its Unix socket); None when it takes
    no handoffs (relay it then). A refusal is raised as the worker's error (``upstream.error_of``)."""
    assert upstream.uds is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    idle = upstream.idle_timeout  # no line from a writing worker for this long: it is hung (as the relay's reads)
    progress = min(idle / 4, PROGRESS_MAX) if idle > 0 else 0.0
    head: HandoffRequest = {"path": path, "length": len(body), "drop_usage": drop_usage, "progress": progress}
    try:
        await loop.sock_connect(sock, handoff_path(upstream.uds))
        socket.send_fds(sock, [json.dumps(head).encode() + b"\n"], [conn.transport.get_extra_info("socket").fileno()])
        reader, writer = await asyncio.open_unix_connection(sock=sock)
    except OSError:  # no handoff socket (an older worker), or it is not listening
        sock.close()
        return None
    try:
        writer.write(body)
        line = await reader.readline()
        answer = json.loads(line) if line else None
    except BaseException:  # the client went away meanwhile (a cancel), or the worker did
        writer.close()
        raise
    if not isinstance(answer, dict) or not answer.get("ok"):
        writer.close()
        if isinstance(answer, dict) and isinstance(answer.get("status"), int):
            raise error_of(answer["status"], json.dumps(answer.get("body")).encode())
        raise WorkerUnavailable("the worker went away as its stream began")
    return Offered(reader, writer, idle, upstream.hung)


class HandedStream(Response):
    """The answer of a handed-off stream: its head and last chunk go through ``send``, the chunks between
    them come from the worker."""

    def __init__(
        self,
        offered: Offered,
        conn: Connection,
        *,
        on_close: Callable[[], Awaitable[None]],
        on_writing: Callable[[bool], None],
        on_error: Callable[[ProxyError], bytes],
        note: RequestNote | None,
        media_type: str,
        headers: Mapping[str, str],
    ) -> None:
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)
        self._offered = offered
        self._conn = conn
        self._on_close = on_close
        self._on_writing = on_writing
        self._on_error = on_error
        self._note = note
        self._blocked = False  # the worker is in the middle of a write the client does not take
        self._failed: ProxyError = WorkerUnavailable("the worker ended the answer early")  # what ends it early

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = self._offered.writer
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await self._conn.flushed()  # the worker's first chunk must follow the head on the wire
            writer.write(HANDOFF_GO)
            if self._note is not None:
                self._note.handed_off = True
            end = await self._follow(receive)
            if (end is None and self._blocked) or (end is not None and end.get("cut")):
                self._conn.transport.abort()  # it stopped inside a chunk: the stream is broken, and says so
                return
            last = b""
            if end is None:
                last = self._on_error(self._failed)
            else:
                if self._note is not None:
                    self._note.add_tokens(int(end.get("tokens") or 0))
                if not end.get("complete"):  # stopped early (the worker is stopping): never a silent end
                    last = self._on_error(WorkerUnavailable("the worker ended the answer early"))
            await send({"type": "http.response.body", "body": last, "more_body": False})
        finally:
            writer.close()
            await self._on_close()

    async def _follow(self, receive: Receive) -> dict[str, Any] | None:
        """The worker's lines until its end line (None: it went away first); ``stop`` when the client goes."""
        reader, writer = self._offered.reader, self._offered.writer

        async def stop_when_gone() -> None:
            await client_gone(receive)
            writer.write(HANDOFF_STOP)

        watch = asyncio.ensure_future(stop_when_gone())
        idle = self._offered.idle_timeout or None
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), None if self._blocked else idle)
                except TimeoutError:  # nothing from a worker that was not waiting on its client: hung
                    self._failed = self._offered.hung()  # its supervisor kills it
                    await self._seen_dead(reader)
                    return None
                if not line:
                    return None
                message = json.loads(line)
                if message.get("end"):
                    return dict(message)
                if message.get("first") and self._note is not None:
                    self._note.first_chunk()
                if "writing" in message:
                    self._blocked = bool(message["writing"])
                    self._on_writing(self._blocked)
        except (OSError, ValueError):
            return None
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            self._on_writing(False)

    async def _seen_dead(self, reader: asyncio.StreamReader) -> None:
        """Until the killed worker's end of the connection closes (it can write no more then); past
        ``DEATH_GRACE``, the client's connection is aborted instead of ended with an event."""
        try:
            await asyncio.wait_for(reader.read(), DEATH_GRACE)
        except (TimeoutError, OSError):
            self._blocked = True  # cannot know where its writes stopped
