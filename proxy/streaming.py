"""A streaming response whose cleanup always runs, however the stream ends.

Starlette's StreamingResponse cancels the body when the client disconnects; if that happens before
the body iterator has started, the iterator's own ``finally`` never runs. ``ClosingStream`` runs
``on_close`` in a ``finally`` around the whole response, so a lease, a slot or an upstream stream
opened for it is released exactly once. ``on_writing`` is told when a send of the body to the client
is pending and when it is done (a client that does not read keeps one pending: the proxy's stall watchdog
reads that, ``Lease.writing``). Shared by the proxy and the worker (no HTTP framework beyond Starlette's
response class).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send


class ClosingStream(StreamingResponse):
    def __init__(
        self,
        content: AsyncIterable[bytes],
        *,
        on_close: Callable[[], Awaitable[None]],
        media_type: str | None = "text/event-stream",
        headers: Mapping[str, str] | None = None,
        status_code: int = 200,
        on_writing: Callable[[bool], None] | None = None,
    ) -> None:
        super().__init__(content, status_code=status_code, headers=headers, media_type=media_type)
        self._on_close = on_close
        self._on_writing = on_writing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        on_writing = self._on_writing
        if on_writing is not None:
            inner = send

            async def send(message: Message) -> None:
                on_writing(True)  # until the server has it off its hands (its flow control waits on the client)
                try:
                    await inner(message)
                finally:
                    on_writing(False)

        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            finally:
                await self._on_close()
