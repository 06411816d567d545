"""uvicorn's server, woken once a second when idle rather than ten times (the proxy's and the workers').

uvicorn's ``Server.main_loop`` sleeps 0.1 s at a time to see whether it should exit and, every tenth time,
to renew the ``date`` header. Each wake-up is a trip through the event loop with cold caches (a loaded model's
worker has evicted them): with a model loaded and nothing to do, the proxy's ten a second were most of its
idle CPU, which a slow stream's per-token cost also carries. ``QuietServer`` ticks once a second (the
header is renewed on every tick, so still once a second) and is woken at once when told to exit: setting
``should_exit`` (uvicorn's signal handler, the worker's own code) wakes its loop, so a shutdown starts as
soon as before.
"""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

TICK = 1.0  # seconds between two looks at should_exit (uvicorn's own: 0.1)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class QuietServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        self._exit = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._exit = value
        loop, waiter = self._loop, self._waiter
        if value and loop is not None and waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits any more
                loop.call_soon_threadsafe(_wake, waiter)

    async def main_loop(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000  # a multiple of 10: on_tick renews the date header every time
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(TICK, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            should_exit = await self.on_tick(counter)
