"""The worker's side of the stream handoff (``proxy.wire``, "the stream handoff"; ARCHITECTURE.md).

The proxy sends a streamed chat or completion request here with its client's socket. The stream begins as
over HTTP (``server.begin``: the same checks, slot and errors); once the proxy has written the answer's head
(``go``), the generating thread itself writes each chunk to the client's socket, framed as HTTP/1.1 chunks: no
event loop, no HTTP server and no proxy between a token and its client. The client's socket is the proxy's
too (one open file, two descriptors): it is non-blocking, so a write that would block (a client not reading)
waits in ``poll`` here, and the proxy is told (``writing``) so its stall watchdog knows the worker waits on a
client. A write that fails (the client went away) or the proxy's ``stop`` ends the generation after the token
being made, as the HTTP path does. The proxy writes the body's last chunk when the end line says so.

Standard library, and the worker's own server module: no framework here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio

from proxy.wire import (
    HANDOFF_GO,
    HANDOFF_STOP,
    SSE_DONE,
    HandoffEnd,
    HandoffRequest,
    chunk_frame,
    completion_tokens,
    sse_event,
)
from proxy.worker.backends.base import BackendError, BackendFailure, InvalidRequest
from proxy.worker.server import WorkerState, begin, encode, refusal, report_failure, stream_error

log = logging.getLogger("proxy.worker.handoff")

MAX_HEAD = 4096  # bytes of the request's line (its body follows it, ``length`` bytes)
POLL_MS = 500  # a blocked write looks at ``stop`` this often
# never blocks (whatever the descriptor's own flag) and never raises SIGPIPE: a full socket waits in ``poll``
_SEND_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT
CLOSE_WAIT = 5.0  # seconds a stopping worker waits for its handoffs before it cancels those still waiting


def listen(path: str) -> socket.socket:
    """The handoff socket, bound and listening (a stale file at ``path`` is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Handoffs:
    """The worker's handoff socket and the streams being written from it."""

    def __init__(self, listener: socket.socket, state: WorkerState) -> None:
        self.listener = listener
        self.state = state
        self.tasks: set[asyncio.Task[None]] = set()
        self.stops: set[threading.Event] = set()  # one per stream being written

    async def serve(self) -> None:
        """Take the proxy's handoffs until cancelled, each in its own task."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            task = asyncio.create_task(_handle(conn, self))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        """Before the worker stops: the streams being written end after the token being made (the proxy ends
        each with an error event: it was not complete), and their threads have let go of the model."""
        self.listener.close()
        for stop in self.stops:
            stop.set()
        if self.tasks:  # a handoff still waiting for the proxy's "go" is not waited for long
            _, waiting = await asyncio.wait(self.tasks, timeout=CLOSE_WAIT)
            for task in waiting:
                task.cancel()  # a writing one still waits for its thread (shielded)
            if waiting:
                await asyncio.wait(waiting)


async def _recv_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The first message and the descriptor that came with it (``conn`` is non-blocking)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_HEAD, 1)
            return data, fds
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(conn.fileno(), readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(conn.fileno())


async def _handle(conn: socket.socket, handoffs: Handoffs) -> None:
    conn.setblocking(False)
    client: socket.socket | None = None
    try:
        data, fds = await _recv_fds(conn)
        if not fds:
            return
        client = socket.socket(fileno=fds[0])  # the client's connection (the proxy keeps its own descriptor)
        line, _, rest = data.partition(b"\n")
        request: HandoffRequest = json.loads(line)
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        try:
            length = int(request["length"])
            body = rest + await reader.readexactly(length - len(rest)) if length > len(rest) else rest
            await _stream(reader, writer, client, request, body, handoffs)
        finally:
            writer.close()
    except Exception as exc:  # the proxy went away, or sent what it never sends: this handoff ends here
        log.warning("a handoff failed: %s: %s", type(exc).__name__, exc)
    finally:
        if client is not None:
            client.close()  # the worker's descriptor only: the proxy still holds the connection
        conn.close()


def _line(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


async def _stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    client: socket.socket,
    request: HandoffRequest,
    body: bytes,
    handoffs: Handoffs,
) -> None:
    state = handoffs.state
    async with state.slot():
        try:
            chunks = await begin(state, request["path"], body)
        except BackendError as exc:
            writer.write(_line({"status": exc.status, "body": refusal(exc)}))
            return
        except Exception as exc:  # a backend bug: reported, answered 500 (as ``server._reported``)
            report_failure(exc, "request failed")
            failure = BackendFailure(f"{type(exc).__name__}: {exc}")
            writer.write(_line({"status": failure.status, "body": refusal(failure)}))
            return
        if isinstance(chunks, dict):  # not a stream (the proxy hands off streamed requests only)
            refused = InvalidRequest("a handed-off request must be streamed", param="stream")
            writer.write(_line({"status": refused.status, "body": refusal(refused)}))
            return
        try:
            writer.write(_line({"ok": True}))
            go = await reader.readline()
        except BaseException:
            _close(chunks)
            raise
        if go != HANDOFF_GO:  # the proxy gave up before the head: nothing was written
            _close(chunks)
            return
        stop = threading.Event()
        handoffs.stops.add(stop)
        loop = asyncio.get_running_loop()

        def tell(data: dict[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(writer.write, _line(data))

        progress = float(request.get("progress") or 0.0)
        writing = _in_thread(lambda: write_stream(chunks, client, stop, request["drop_usage"], tell, progress))
        listening = asyncio.ensure_future(_until_stop(reader))
        either: set[asyncio.Future[Any]] = {writing, listening}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not writing.done():
                stop.set()  # the proxy said stop, or its connection went: the client's answer is over
            listening.cancel()
            with anyio.CancelScope(shield=True):  # the slot is held until the model is free (as ``pump``)
                end = await writing
            handoffs.stops.discard(stop)
        writer.write(_line(end))
        with contextlib.suppress(OSError):
            await writer.drain()


def _in_thread(work: Callable[[], HandoffEnd]) -> asyncio.Future[HandoffEnd]:
    """``work`` in a thread of its own (as ``pump``'s: a pool's threads could all be held by streams)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[HandoffEnd] = loop.create_future()

    def settle(result: HandoffEnd | None, error: BaseException | None) -> None:
        if not done.done():
            if error is not None:
                done.set_exception(error)
            else:
                assert result is not None
                done.set_result(result)

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the loop, raised there
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="generate", daemon=True).start()
    return done


def _close(chunks: Iterator[Any]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


async def _until_stop(reader: asyncio.StreamReader) -> None:
    while True:
        line = await reader.readline()
        if not line or line == HANDOFF_STOP:
            return


def write_stream(
    chunks: Iterator[dict[str, Any]],
    client: socket.socket,
    stop: threading.Event,
    drop_usage: bool,
    tell: Callable[[dict[str, Any]], None],
    progress: float = 0.0,
) -> HandoffEnd:
    """Generate and write each chunk to the client as it is made (in this thread), then ``[DONE]``; an error
    mid-way ends the stream with its error event, as ``server._sse`` does. Closes the generation. Every
    ``progress`` seconds while it writes, ``tell`` hears how far it is (the proxy's watch for a hung worker)."""
    out = _Out(client, stop, tell)
    tokens = 0
    complete = False
    last = time.monotonic()
    try:
        try:
            for chunk in chunks:
                if "usage" in chunk and chunk.get("usage"):
                    tokens += completion_tokens(chunk)
                    if drop_usage and chunk.get("choices") == []:
                        continue
                if not out.send(chunk_frame(sse_event(encode(chunk)))):
                    break
                if out.sent_first:
                    out.sent_first = False
                    tell({"first": True})
                if progress and (now := time.monotonic()) - last >= progress:
                    last = now
                    tell({"sent": out.bytes})
                if stop.is_set():
                    out.gone = True
                    break
            else:
                complete = out.send(chunk_frame(SSE_DONE))
        except Exception as exc:  # the stream has started: the error can only travel as an event
            complete = out.send(chunk_frame(sse_event(encode(stream_error(exc)))))
    finally:
        _close(chunks)
    return {
        "end": True,
        "tokens": tokens,
        "bytes": out.bytes,
        "client_gone": out.gone,
        "complete": complete,
        "cut": out.cut,
    }


class _Out:
    """Writes to the client's non-blocking socket from the generating thread."""

    def __init__(self, client: socket.socket, stop: threading.Event, tell: Callable[[dict[str, Any]], None]) -> None:
        self.client = client
        self.stop = stop
        self.tell = tell
        self.bytes = 0
        self.gone = False  # a write failed, or it was told to stop
        self.cut = False  # it stopped inside a chunk: the client's body is no longer well framed
        self.first = True
        self.sent_first = False
        self._poll: select.poll | None = None

    def send(self, data: bytes) -> bool:
        """Write all of ``data``; False when the client has gone (or the proxy said stop while it waited)."""
        view = memoryview(data)
        waiting = False
        try:
            while view:
                try:
                    n = self.client.send(view, _SEND_FLAGS)
                except BlockingIOError:
                    if not waiting:
                        waiting = True
                        self.tell({"writing": True})
                    if not self._wait():
                        self.gone = True
                        self.cut = len(view) < len(data)
                        return False
                    continue
                self.bytes += n
                view = view[n:]
        except OSError:  # EPIPE, ECONNRESET: the client went away
            self.gone = True
            return False
        finally:
            if waiting:
                self.tell({"writing": False})
        if self.first:
            self.first = False
            self.sent_first = True
        return True

    def _wait(self) -> bool:
        """Until the socket can take more (True), or the proxy says stop (False)."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.client.fileno(), select.POLLOUT)
        while not self.stop.is_set():
            if self._poll.poll(POLL_MS):
                return True
        return False
