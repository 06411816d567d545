"""The worker's writing side of the stream handoff (``proxy.worker.handoff.write_stream``) at its edges, on a
socket pair: a client that does not read (the write blocks, the proxy is told, it goes on when the client
reads), a stop while blocked, a client gone, a generation that fails mid-way; then the protocol with the test as
the proxy (``Handoffs``): a stream, a refusal, a worker that stops mid-stream. The whole path (a live proxy, a
real worker) is tests/test_handoff_real.py."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import WorkerHung
from proxy.handoff import HandedStream, Offered
from proxy.wire import HANDOFF_GO, HandoffEnd, chunk_frame, sse_event
from proxy.worker.backends.base import InvalidRequest
from proxy.worker.handoff import Handoffs, listen, write_stream
from proxy.worker.server import WorkerState, encode


def chunks(n: int, size: int = 2000, fail_at: int | None = None) -> Iterator[dict[str, Any]]:
    for i in range(n):
        if i == fail_at:
            raise InvalidRequest("it failed mid-way")
        yield {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "x" * size}}]}
    yield {"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": n}}


class Told:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.blocked = threading.Event()

    def __call__(self, line: dict[str, Any]) -> None:
        self.lines.append(line)
        if line.get("writing"):
            self.blocked.set()


def unframe(data: bytes) -> list[bytes]:
    """The chunks of a chunked body (without its last, empty chunk: the proxy writes that)."""
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        out.append(data[:size])
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]
    return out


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    worker, client = socket.socketpair()
    for s in (worker, client):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    worker.setblocking(False)  # as the proxy's descriptor leaves it (one open file, shared flags)
    yield worker, client
    worker.close()
    client.close()


def read_to_done(client: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"data: [DONE]\n\n\r\n"):
        more = client.recv(65536)
        assert more, "the stream ended before [DONE]"
        data += more
    return data


def run(
    worker: socket.socket, items: Iterator[dict[str, Any]], told: Told, stop: threading.Event
) -> Future[HandoffEnd]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(write_stream, items, worker, stop, True, told)
    pool.shutdown(wait=False)
    return future


def test_a_client_that_does_not_read_blocks_the_writer_and_the_proxy_is_told(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    worker, client = pair
    told = Told()
    future = run(worker, chunks(40), told, threading.Event())
    assert told.blocked.wait(30), "a write that cannot go on must say so (the stall watchdog reads it)"
    assert not future.done()
    data = read_to_done(client)  # the client reads: the writer goes on to the end
    end = future.result(30)
    events = [json.loads(c[6:-2]) if c != b"data: [DONE]\n\n" else "[DONE]" for c in unframe(data)]
    assert len(events) == 41 and events[-1] == "[DONE]"  # 40 chunks, the usage chunk dropped, [DONE]
    assert end == {"end": True, "tokens": 40, "bytes": len(data), "client_gone": False, "complete": True, "cut": False}
    assert told.lines[0] == {"first": True} or {"first": True} in told.lines
    writing = [line["writing"] for line in told.lines if "writing" in line]
    assert writing and writing[0] is True and writing[-1] is False  # ended: not blocked any more


def test_a_stop_while_blocked_ends_the_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    worker, _client = pair
    first_frame = chunk_frame(sse_event(encode(next(chunks(1)))))  # every chunk of chunks() is this long
    told = Told()
    stop = threading.Event()
    future = run(worker, chunks(1000), told, stop)
    assert told.blocked.wait(30)
    stop.set()  # the proxy's "stop": its client went away
    end = future.result(30)
    assert end["client_gone"] and not end["complete"]
    assert end["cut"] == (end["bytes"] % len(first_frame) != 0)  # stopped inside a chunk: the proxy must abort


def test_a_client_gone_ends_the_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    worker, client = pair
    client.close()
    end = run(worker, chunks(1000), Told(), threading.Event()).result(30)
    assert end["client_gone"] and not end["complete"] and end["bytes"] == 0


def test_a_generation_that_fails_mid_way_ends_with_its_error_event(pair: tuple[socket.socket, socket.socket]) -> None:
    worker, client = pair
    future = run(worker, chunks(5, size=10, fail_at=3), Told(), threading.Event())
    end = future.result(30)
    client.setblocking(False)
    data = client.recv(65536)
    last = unframe(data)[-1]
    assert json.loads(last[6:])["error"]["message"] == "it failed mid-way"
    assert end["complete"] and end["tokens"] == 0 and end["bytes"] == len(data)


# -- the whole protocol, the test as the proxy: Handoffs on a Unix socket, a socket pair as the client ------------


class Backend:
    """A generator backend: ``chat`` yields ``n`` chunks and the usage (or endlessly), or refuses."""

    def __init__(self, n: int | None = 3, refuse: bool = False) -> None:
        self.n = n
        self.refuse = refuse
        self.closed = threading.Event()

    def chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if self.refuse:
            raise InvalidRequest("no such thing", param="messages")
        return self._chunks()

    def _chunks(self) -> Iterator[dict[str, Any]]:
        try:
            i = 0
            while self.n is None or i < self.n:
                yield {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
                i += 1
            yield {"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": i}}
        finally:
            self.closed.set()


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[tuple[Handoffs, str]]:
    backend = Backend()
    state = WorkerState(backend)  # type: ignore[arg-type]  # a Generator by shape
    state.ready = True
    path = str(tmp_path / "w.sock.handoff")
    handoffs = Handoffs(listen(path), state)
    taking = asyncio.create_task(handoffs.serve())
    yield handoffs, path
    taking.cancel()
    await handoffs.close()


async def offer(path: str, client: socket.socket, drop_usage: bool = False) -> tuple[asyncio.StreamReader, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    head = {"path": "/v1/chat/completions", "length": len(body), "drop_usage": drop_usage, "progress": 0.0}
    socket.send_fds(sock, [json.dumps(head).encode() + b"\n"], [client.fileno()])
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    writer.write(body)
    return reader, writer


async def test_a_stream_goes_over_the_protocol_to_the_client(worker: tuple[Handoffs, str]) -> None:
    _, path = worker
    ours, theirs = socket.socketpair()  # the proxy's client connection: the worker gets ``ours``
    with ours, theirs:
        reader, writer = await offer(path, ours)
        assert json.loads(await reader.readline()) == {"ok": True}
        writer.write(HANDOFF_GO)
        lines = [json.loads(await reader.readline()) for _ in range(2)]
        assert lines[0] == {"first": True}
        end = lines[1]
        assert end["end"] and end["complete"] and end["tokens"] == 3 and not end["client_gone"] and not end["cut"]
        theirs.setblocking(False)
        data = theirs.recv(65536)
        assert end["bytes"] == len(data)
        events = unframe(data)
        assert events[-1] == b"data: [DONE]\n\n" and len(events) == 5  # 3 tokens, the usage asked for, [DONE]
        writer.close()
        await writer.wait_closed()


async def test_a_refusal_is_answered_as_a_status_and_the_client_is_untouched(worker: tuple[Handoffs, str]) -> None:
    handoffs, path = worker
    handoffs.state.backend.refuse = True  # type: ignore[attr-defined]
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader, writer = await offer(path, ours)
        answer = json.loads(await reader.readline())
        assert answer["status"] == 400 and answer["body"]["error"]["message"] == "no such thing"
        assert await reader.readline() == b""  # that was all
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)  # nothing was written to the client
        writer.close()
        await writer.wait_closed()


async def test_a_stopping_worker_ends_its_streams_before_it_lets_go_of_the_model(worker: tuple[Handoffs, str]) -> None:
    handoffs, path = worker
    backend: Backend = handoffs.state.backend  # type: ignore[assignment]
    backend.n = None  # it never ends by itself
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader, writer = await offer(path, ours)
        assert json.loads(await reader.readline()) == {"ok": True}
        writer.write(HANDOFF_GO)
        assert json.loads(await reader.readline()) == {"first": True}
        await handoffs.close()  # the worker stops (SIGTERM): close() returns once its thread is done
        assert backend.closed.is_set()
        lines = [json.loads(line) async for line in reader]  # "writing" ones too, if the client's socket filled
        end = lines[-1]
        assert end["end"] and not end["complete"]  # the proxy ends it with an error event, never silently
        assert handoffs.state.in_flight == 0
        writer.close()
        await writer.wait_closed()


# -- the proxy's side at the stream's end (proxy.handoff.HandedStream), the worker's lines given by the test ------


class Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class Conn:
    def __init__(self) -> None:
        self.transport = Transport()

    async def flushed(self) -> None:
        pass


async def end_with(*lines: dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool, list[bool]]:
    """What HandedStream sends through ASGI, whether it aborted the connection, and the lease's writing flags,
    for a worker that says ``lines`` (None: it goes away) after ``go``."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        assert await loop.sock_recv(theirs, 16) == HANDOFF_GO
        for line in lines:
            if line is not None:
                await loop.sock_sendall(theirs, json.dumps(line).encode() + b"\n")
        if lines and lines[-1] is None:
            theirs.close()

    speaking = asyncio.create_task(worker())
    sent: list[dict[str, Any]] = []
    writing: list[bool] = []
    conn = Conn()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    async def closed() -> None:
        pass

    stream = HandedStream(
        Offered(reader, writer, 0.0, lambda: WorkerHung("hung")),
        conn,  # type: ignore[arg-type]
        on_close=closed,
        on_writing=writing.append,
        on_error=lambda exc: b"data: " + exc.message.encode() + b"\n\n",
        note=None,
        media_type="text/event-stream",
        headers={},
    )
    await stream({"type": "http"}, receive, send)  # type: ignore[arg-type]
    await speaking
    theirs.close()
    return sent, conn.transport.aborted, writing


END = {"end": True, "tokens": 3, "bytes": 10, "client_gone": False, "complete": True, "cut": False}


async def test_a_complete_stream_ends_with_the_last_chunk() -> None:
    sent, aborted, _ = await end_with({"first": True}, END)
    assert not aborted and sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_a_stream_the_worker_stopped_early_ends_with_an_error_event() -> None:
    sent, aborted, _ = await end_with({**END, "complete": False})
    assert not aborted and sent[-1]["body"] == b"data: the worker ended the answer early\n\n"


async def test_a_worker_gone_between_chunks_ends_with_an_error_event() -> None:
    sent, aborted, _ = await end_with({"first": True}, None)
    assert not aborted and sent[-1]["body"] == b"data: the worker ended the answer early\n\n"


async def test_a_chunk_cut_in_two_aborts_the_connection() -> None:
    for lines in ([{**END, "complete": False, "cut": True}], [{"writing": True}, None]):
        sent, aborted, writing = await end_with(*lines)
        assert aborted and [m["type"] for m in sent] == ["http.response.start"]  # no last chunk after a cut one
        assert not writing or writing[-1] is False  # the lease is not left "writing"
