"""The streaming hot path's pieces (issue 23): the process tree read from the kernel's children lists, and the
streamed response that sends its chunks past the middleware's per-message wrappers. The whole path (a live
proxy, its middleware, a worker) is covered by the streaming tests of each dialect; bench/proxy_overhead.py
measures its cost."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import psutil
import pytest
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from proxy import proctree, ticks
from proxy.streaming import DIRECT_SEND, ClosingStream
from proxy.ticks import QuietServer

# a parent whose child starts a grandchild that burns CPU, then all three sleep; the parent prints its
# descendants' pids once the grandchild has burned what it should
_TREE = """
import os, subprocess, sys, time
if sys.argv[1] == "grandchild":
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    print(os.getpid(), flush=True)
    time.sleep(60)
elif sys.argv[1] == "child":
    g = subprocess.Popen([sys.executable, "-c", sys.argv[2], "grandchild"], stdout=subprocess.PIPE, text=True)
    print(os.getpid(), g.stdout.readline().strip(), flush=True)
    time.sleep(60)
else:
    c = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", sys.argv[2]], stdout=subprocess.PIPE, text=True)
    print(c.stdout.readline().strip(), flush=True)
    time.sleep(60)
"""


@pytest.fixture
def family() -> Iterator[tuple[int, int, int]]:
    """(parent, child, grandchild) pids of a live process tree; the grandchild has used 0.3 s of CPU."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _TREE, "parent", _TREE], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert parent.stdout is not None
        child, grandchild = (int(p) for p in parent.stdout.readline().split())
        yield parent.pid, child, grandchild
    finally:
        os.killpg(parent.pid, 9)
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()


def test_the_tree_of_a_process_holds_its_grandchildren(family: tuple[int, int, int]) -> None:
    parent, child, grandchild = family
    assert sorted(proctree.tree(parent)) == sorted(family)
    assert sorted(proctree.tree(parent)) == sorted([parent, *(p.pid for p in psutil.Process(parent).children(True))])
    assert proctree.tree(grandchild) == [grandchild]
    assert sorted(p.pid for p in proctree.processes(child)) == [child, grandchild]


def test_the_cpu_of_a_tree_counts_its_grandchildren(family: tuple[int, int, int]) -> None:
    parent, _, grandchild = family
    ours = sum(sum(p.cpu_times()[:2]) for p in (psutil.Process(parent), *psutil.Process(parent).children(True)))
    assert proctree.cpu_seconds(grandchild) >= 0.25
    assert proctree.cpu_seconds(parent) >= 0.25
    assert abs(proctree.cpu_seconds(parent) - ours) < 0.1


def test_a_kernel_without_children_lists_falls_back_to_psutil(
    family: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proctree, "_children", lambda pid: None)
    assert sorted(proctree.tree(family[0])) == sorted(family)


def test_a_process_that_is_gone_raises_psutils_error() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    with pytest.raises(psutil.NoSuchProcess):
        proctree.tree(done.pid)
    with pytest.raises(psutil.NoSuchProcess):
        proctree.cpu_seconds(done.pid)


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError


async def test_a_streamed_answer_sends_its_chunks_past_the_middleware() -> None:
    # the start and the end go through the stack (whose layers look at the start); the chunks go straight to
    # the outermost send (observe.RequestEvents records it)
    through: list[Message] = []
    direct: list[Message] = []
    closed: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    async def stack(message: Message) -> None:
        through.append(message)

    async def outermost(message: Message) -> None:
        direct.append(message)

    async def close() -> None:
        closed.append(True)

    response = ClosingStream(body(), on_close=close)
    await response({"type": "http", DIRECT_SEND: outermost}, _never, stack)
    assert [m["type"] for m in through] == ["http.response.start", "http.response.body"]
    assert through[-1]["more_body"] is False and through[0]["status"] == 200
    assert [m["body"] for m in direct] == [b"a", b"b"] and all(m["more_body"] for m in direct)
    assert closed == [True]


async def test_a_client_that_goes_away_stops_the_body_and_closes_once() -> None:
    closed: list[bool] = []
    ended = asyncio.Event()
    sent: list[bytes] = []
    gone = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await asyncio.Event().wait()  # a worker that has nothing more yet
            yield b"never"
        finally:
            ended.set()

    async def send(message: Message) -> None:
        if message.get("body"):
            sent.append(message["body"])
            gone.set()

    async def receive() -> Message:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def close() -> None:
        closed.append(True)

    started = time.monotonic()
    await asyncio.wait_for(ClosingStream(body(), on_close=close)({"type": "http"}, receive, send), 5)
    assert time.monotonic() - started < 5
    assert sent == [b"first"] and ended.is_set() and closed == [True]


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    pass


def _quiet_server() -> QuietServer:
    config = uvicorn.Config(_app, lifespan="off", log_level="warning")
    config.load()
    return QuietServer(config)


async def test_an_idle_server_wakes_at_once_when_told_to_exit() -> None:
    server = _quiet_server()
    loop = asyncio.create_task(server.main_loop())
    await asyncio.sleep(0)  # it has ticked once and waits for the next tick, a second away
    assert not loop.done() and ticks.TICK >= 1.0
    start = time.monotonic()
    server.should_exit = True  # what uvicorn's signal handler does
    await asyncio.wait_for(loop, 0.5)
    assert time.monotonic() - start < 0.5


async def test_an_idle_server_renews_its_date_header_on_each_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ticks, "TICK", 0.001)
    server = _quiet_server()
    seen: list[int] = []
    on_tick = server.on_tick

    async def counted(counter: int) -> bool:
        seen.append(counter)
        if len(seen) == 3:
            server.should_exit = True
        return await on_tick(counter)

    monkeypatch.setattr(server, "on_tick", counted)
    await asyncio.wait_for(server.main_loop(), 5)
    assert seen == [0, 10, 20]  # uvicorn renews the date header when the counter is a multiple of 10
    assert server.server_state.default_headers[0][0] == b"date"
