"""A streaming response whose cleanup always runs, however the stream ends; cheap per chunk.

``ClosingStream`` runs ``on_close`` in a ``finally`` around the whole response, so a lease, a slot or an
upstream stream opened for it is released exactly once, even when the client goes away before the body
iterator has started (whose own ``finally`` then never runs). ``on_writing`` is told when a send of the body to
the client is pending and when it is done (a client that does not read keeps one pending: the proxy's stall
watchdog reads that, ``Lease.writing``).

It is the hot path of every streamed answer (a token per chunk), so it is a plain ASGI response rather than
Starlette's ``StreamingResponse``: the body is sent from one task that does nothing else, while the request's
own task waits for the client's disconnect (which cancels the body); the start of the response and its end go
through the middleware stack as usual, and the chunks in between go straight to the send that the outermost
middleware recorded in the scope (``DIRECT_SEND``: ``proxy.api.observe``), past the per-message wrappers of
the layers in between, which only look at the start. Shared by the proxy and the worker (no HTTP framework
beyond Starlette's response class).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DIRECT_SEND = "proxy.direct_send"  # in the ASGI scope: the send of the outermost middleware, for body chunks


class ClosingStream(Response):
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
        self.body_iterator = content
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)
        self._on_close = on_close
        self._on_writing = on_writing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = asyncio.ensure_future(self._stream(scope, send))
            gone = asyncio.ensure_future(_disconnect(receive))
            try:
                await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # the client went away (or this task was cancelled): the body stops
                gone.cancel()
                if not body.done():
                    body.cancel()
                    await asyncio.wait({body})
            if not body.cancelled():
                body.result()  # its error, if it failed
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            finally:
                await self._on_close()

    async def _stream(self, scope: Scope, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        direct: Send = scope.get(DIRECT_SEND, send)
        on_writing = self._on_writing
        async for chunk in self.body_iterator:
            message = {"type": "http.response.body", "body": chunk, "more_body": True}
            if on_writing is None:
                await direct(message)
                continue
            on_writing(True)  # until the server has it off its hands (its flow control waits on the client)
            try:
                await direct(message)
            finally:
                on_writing(False)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
