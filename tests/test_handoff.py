"""The worker's writing side of the stream handoff (``proxy.worker.handoff.write_stream``) at its edges, on a
socket pair: a client that does not read (the write blocks, the proxy is told, it goes on when the client
reads), a stop while blocked, a client gone, a generation that fails mid-way. The whole path (a live proxy, a
real worker) is tests/test_handoff_real.py."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from proxy.wire import HandoffEnd
from proxy.worker.backends.base import InvalidRequest
from proxy.worker.handoff import write_stream


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
    assert end == {"end": True, "tokens": 40, "bytes": len(data), "client_gone": False, "complete": True}
    assert told.lines[0] == {"first": True} or {"first": True} in told.lines
    writing = [line["writing"] for line in told.lines if "writing" in line]
    assert writing and writing[0] is True and writing[-1] is False  # ended: not blocked any more


def test_a_stop_while_blocked_ends_the_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    worker, _client = pair
    told = Told()
    stop = threading.Event()
    future = run(worker, chunks(1000), told, stop)
    assert told.blocked.wait(30)
    stop.set()  # the proxy's "stop": its client went away
    end = future.result(30)
    assert end["client_gone"] and not end["complete"]


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
