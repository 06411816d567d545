"""Run a blocking iterator (a token or audio generator) in its own thread, ahead of its consumer.

The producing thread never waits for the event loop between items, so generation runs at the
backend's own pace; items cross to the loop with ``call_soon_threadsafe``. When the consumer goes
away (client disconnect), the thread stops after the item it is making and closes the iterator;
the consumer's ``finally`` waits for that, so the model is free before the next request starts.
That wait is shielded from cancellation: Starlette cancels a streaming response's task when its client
disconnects, and an unshielded wait would be cut short there, handing the slot to the next request
while this thread is still inside the model (issue 16).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Iterator
from typing import Any, TypeVar

import anyio

T = TypeVar("T")
_DONE: Any = object()


async def pump(items: Iterator[T]) -> AsyncGenerator[T, None]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()
    finished = asyncio.Event()

    def put(item: Any, error: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))

    def produce() -> None:
        try:
            for item in items:
                put(item)
                if stop.is_set():
                    break
        except BaseException as exc:  # handed to the consumer, raised there
            put(_DONE, exc)
            return
        finally:
            try:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
            finally:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(finished.set)
        put(_DONE)

    thread = threading.Thread(target=produce, name="generate", daemon=True)
    thread.start()
    try:
        while True:
            item, error = await queue.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        with anyio.CancelScope(shield=True):
            await finished.wait()
