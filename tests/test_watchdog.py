"""The stall watchdog (proxy/watchdog.py) and a slow reader (issue 25, defect 8): a worker whose requests
wait on a client that does not read is blocked on the proxy, not stalled, and is not killed.

In-process: the manager with the ManualClock and a fake worker that uses no CPU; the response that marks
its lease while a send to its client is pending (``ClosingStream``'s ``on_writing``, as the relay wires it).
The watchdog's kill of a truly stuck worker on a live proxy is test_lifecycle.py's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.types import Message

from proxy.relay import LeasedCall
from proxy.streaming import ClosingStream
from proxy.upstream import UpstreamStream
from tests.test_manager import FakeWorker, make, model, settle, state


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeWorker.instances.clear()


async def test_a_worker_whose_lease_waits_on_its_reader_is_not_stalled_and_is_once_it_does_not() -> None:
    manager, clock = make(model("a"), stall_timeout=5.0)  # checks every 1.25 s
    lease = await manager.acquire("a")
    worker = FakeWorker.instances[0]  # its CPU never moves: no progress
    lease.writing(True)  # its answer waits for the client to read
    clock.advance(20.0)  # four times the stall timeout
    assert worker.kill_reason is None and state(manager, "a") == "ready"
    lease.writing(False)  # the client read it; the worker still makes nothing
    clock.advance(5.0)
    assert worker.kill_reason is not None and "no progress for 5s" in worker.kill_reason
    assert state(manager, "a") == "stopped"
    lease.release()
    await manager.shutdown()


async def test_without_the_mark_a_worker_with_no_progress_is_killed_after_stall_timeout() -> None:
    manager, clock = make(model("a"), stall_timeout=5.0)
    lease = await manager.acquire("a")
    worker = FakeWorker.instances[0]
    clock.advance(3.75)
    assert worker.kill_reason is None
    clock.advance(1.25)
    assert worker.kill_reason is not None and state(manager, "a") == "stopped"
    lease.release()
    await manager.shutdown()


async def test_a_released_lease_leaves_no_mark_behind() -> None:
    manager, clock = make(model("a", parallel=2), stall_timeout=5.0)
    waiting = await manager.acquire("a")
    waiting.writing(True)
    waiting.release()  # released while its send was pending (the client went away)
    stuck = await manager.acquire("a")
    clock.advance(5.0)
    assert FakeWorker.instances[0].kill_reason is not None  # the mark went with its lease
    stuck.release()
    await manager.shutdown()


async def test_the_response_marks_a_pending_send_to_its_client() -> None:
    marks: list[bool] = []
    reading = asyncio.Event()
    sent: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        yield b"second"

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            await reading.wait()  # the client does not read: the server's flow control holds the send
            sent.append(message["body"])

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    async def closed() -> None:
        pass

    response = ClosingStream(body(), on_close=closed, on_writing=marks.append)
    task = asyncio.create_task(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    await settle()
    assert marks[-1] is True and not sent  # a send is pending: marked
    reading.set()
    await asyncio.wait_for(task, 5)
    assert sent == [b"first", b"second"] and marks[-1] is False and marks.count(True) == marks.count(False)


async def test_a_relayed_stream_whose_client_does_not_read_keeps_its_worker_alive() -> None:
    # the relay's response, its lease and the watchdog together: a send held by the client's flow control
    manager, clock = make(model("a"), stall_timeout=5.0)
    reading = asyncio.Event()

    async def opened(path: str, body: bytes, *, timed: bool = False) -> UpstreamStream:
        return None  # type: ignore[return-value]  # the relay below reads nothing from it

    async def relay(upstream: UpstreamStream) -> AsyncIterator[bytes]:
        yield b"data: pcm\n\n"

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            await reading.wait()

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError

    call = LeasedCall(manager, "a", None)
    async with call:
        call.open = opened  # type: ignore[method-assign]
        response = await call.stream("/v1/audio/speech", b"{}", relay, "audio/pcm")
    task = asyncio.create_task(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    await settle()
    clock.advance(20.0)  # the worker makes no progress: it waits for the client
    assert FakeWorker.instances[0].kill_reason is None and state(manager, "a") == "ready"
    reading.set()
    await asyncio.wait_for(task, 5)
    assert next(s.in_flight for s in manager.status()) == 0  # the response's close released the lease
    await manager.shutdown()
