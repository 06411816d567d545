"""The leased call: one request to a model's worker, from lease to release, in one place.

    async with LeasedCall(manager, cfg.name, keep_alive) as call:
        data = await call.post_json("/v1/embeddings", body)            # answered in full
    async with LeasedCall(manager, cfg.name, keep_alive) as call:
        return await call.stream("/v1/chat/completions", payload, relay, "text/event-stream")

Entering acquires the lease (starting the model, queueing for room); leaving releases it, unless a
stream was handed to the response: then the response's close releases it, after closing the upstream
stream. Given the client's request (``client=``), the call watches it: if the client goes away while the
block runs (an answer that is not streamed: a JSON answer, a wav, a transcript, a stream read whole),
the block is cancelled, which closes the upstream (the worker sees its client go and stops within a token
or a step) and releases the lease; the handler then raises ``ClientGone``. The client is watched from
before the lease: one that goes away while its request waits in the queue (or for a load) cancels the
wait, so its ticket leaves the queue at once and starts no load. A stream handed to the response
is watched by the response itself. Either way the release happens once, in ``_close``. Like httpx's
``stream()``, the call is a context manager over its transport; handlers only parse, translate, call and shape.
No HTTP framework here but Starlette's response class (``proxy.streaming``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from proxy import largejson
from proxy.auth import Role
from proxy.errors import ClientGone
from proxy.events import RequestNote
from proxy.handoff import HandedStream, Handoff, connection, offer
from proxy.manager import Lease, ModelManager
from proxy.streaming import ClosingStream
from proxy.upstream import Upstream, UpstreamStream
from proxy.wire import STREAM_HEADERS, client_gone, completion_tokens

T = TypeVar("T")

USAGE_MARKER = b'"completion_tokens"'  # in a usage object that counts generated tokens (not an embedding's)
_USAGE = USAGE_MARKER


def _tokens_in_sse(chunk: bytes) -> int:
    """The completion tokens of the usage event(s) in a chunk of OpenAI SSE (0 when none is whole in it)."""
    total = 0
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {") and _USAGE in line:
            try:
                total += completion_tokens(json.loads(line[6:]))
            except ValueError:
                pass
    return total


class ObservedStream(UpstreamStream):
    """A worker's streamed answer that tells the request's note of its usage and, when the answer is
    streamed to the client (``timed``), of the worker's first byte (the time to first token)."""

    def __init__(self, stream: UpstreamStream, note: RequestNote, timed: bool) -> None:
        super().__init__(stream.response, stream._hung)
        self._note = note
        self._timed = timed

    async def raw(self) -> AsyncIterator[bytes]:
        # read from aiohttp here rather than through ``super().raw()``: one generator layer less per token
        note, timed = self._note, self._timed
        with self.reading():
            async for chunk in self.response.content.iter_any():
                if timed:  # the first byte only
                    note.first_chunk()
                    timed = False
                if _USAGE in chunk:
                    note.add_tokens(_tokens_in_sse(chunk))
                yield chunk

    async def lines(self) -> AsyncIterator[str]:
        note = self._note
        async for line in super().lines():
            if self._timed:
                note.first_chunk()
            yield line

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        note = self._note
        async for chunk in super().events():
            if "usage" in chunk:
                note.add_tokens(completion_tokens(chunk))
            yield chunk


def _is_admin(client: Request | None) -> bool:
    """Does the client's request come with an admin's rights? (``api.common.guarded`` put its role there; no
    client, or no keys configured: the proxy's own call, an admin's.)"""
    if client is None:
        return True
    return bool(getattr(client.state, "role", Role.ADMIN) >= Role.ADMIN)


class LeasedCall:
    def __init__(
        self,
        manager: ModelManager,
        name: str,
        keep_alive: float | None,
        *,
        client: Request | None = None,
        on_loading: Callable[[], None] | None = None,
        options: Mapping[str, Any] | None = None,
        admin: bool | None = None,
    ) -> None:
        self._manager = manager
        # the caller's role, for its keep_alive (ModelManager.acquire): given, else the client's (``guarded``)
        self._admin = admin if admin is not None else _is_admin(client)
        self._options = options  # runner options (Ollama's num_ctx): ModelManager.acquire
        self._name = name
        self._keep_alive = keep_alive
        self._client = client
        self._lease: Lease | None = None
        self._stream: UpstreamStream | None = None
        self._handed_over = False
        self._watch: asyncio.Task[None] | None = None
        self._gone = False
        # what the events say of this request (model, first byte, tokens); None outside a request
        self._note = RequestNote.of(client.scope) if client is not None else None
        self._on_loading = on_loading

    async def acquire(self) -> None:
        """Take the lease (``ModelManager.acquire``; ``on_loading`` is its signal that the request waits for a
        load). Entering does it unless it was done before (``proxy.loading`` does it first, in a task)."""
        if self._lease is None:
            if self._note is not None:
                self._note.for_model(self._name)
            self._lease = await self._manager.acquire(
                self._name, self._keep_alive, self._on_loading, options=self._options, admin=self._admin
            )

    async def __aenter__(self) -> LeasedCall:
        # watched from before the lease: a client that gives up while its request waits in the queue cancels
        # the wait, so its ticket leaves the queue and loads nothing for nobody (issue 25, defect 4)
        if self._client is not None:
            self._watch = asyncio.create_task(self._watch_client(self._client, asyncio.current_task()))
        try:
            await self.acquire()
        except BaseException as exc:
            self._stop_watching()
            if self._gone and isinstance(exc, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # our cancel, not the server's: the request ends as a 499
                raise ClientGone("the client went away while its request waited") from None
            raise
        return self

    async def _watch_client(self, client: Request, block: asyncio.Task[Any] | None) -> None:
        await client_gone(client.receive)
        if block is not None and not self._handed_over:
            self._gone = True
            block.cancel()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop_watching()
        if not self._handed_over:
            await self._close()
        if self._gone and kind is not None and issubclass(kind, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # our cancel, not the server's: the request ends as a 499
            raise ClientGone("the client went away")

    def _stop_watching(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()

    async def close(self) -> None:
        """Close what the call holds (for a response that took it over before entering: ``proxy.loading``)."""
        await self._close()

    async def _close(self) -> None:
        """Close the upstream stream (if one was opened) and release the lease: exactly once."""
        stream, self._stream = self._stream, None
        lease, self._lease = self._lease, None
        try:
            if stream is not None:
                await stream.aclose()
        finally:
            if lease is not None:
                lease.release()

    @property
    def lease(self) -> Lease:
        assert self._lease is not None, "a LeasedCall is used inside its async with"
        return self._lease

    @property
    def upstream(self) -> Upstream:
        return self.lease.upstream

    @property
    def load_duration(self) -> float:
        """Seconds this call waited for the model to load (0 when it was loaded already)."""
        return self.lease.load_duration

    # -- answered in full ---------------------------------------------------------------------
    async def post(self, path: str, body: bytes) -> bytes:
        content = await self.upstream.post(path, body)
        if self._note is not None and _USAGE in content:
            try:
                self._note.add_tokens(completion_tokens(await largejson.loads(content, only=("usage",))))
            except ValueError:
                pass
        return content

    async def post_json(self, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        data = await self.upstream.post_json(path, payload)
        if self._note is not None:
            self._note.add_tokens(completion_tokens(data))
        return data

    async def post_file(
        self,
        path: str,
        fields: dict[str, str],
        repeated: list[tuple[str, str]],
        file: tuple[str, str, BinaryIO, str | None],
    ) -> dict[str, Any]:
        return await self.upstream.post_file(path, fields, repeated, file)

    # -- streamed -----------------------------------------------------------------------------
    async def open(self, path: str, body: bytes, *, timed: bool = False) -> UpstreamStream:
        """Open a streamed answer that this call closes when it ends (read it inside the block)."""
        stream = await self.upstream.open_stream(path, body)
        self._stream = ObservedStream(stream, self._note, timed) if self._note is not None else stream
        return self._stream

    async def stream(
        self,
        path: str,
        body: bytes,
        relay: Callable[[UpstreamStream], AsyncIterator[bytes]],
        media_type: str,
        handoff: Handoff | None = None,
    ) -> Response:
        """Open a streamed answer and hand it, with the lease, to the response: ``relay`` turns the
        worker's stream into the client's bytes; the response's close releases both however it ends.
        ``handoff``: the stream may go to the worker with the client's socket instead (``proxy.handoff``)."""
        if handoff is not None:
            handed = await self._hand_off(path, body, media_type, handoff)
            if handed is not None:
                return handed
        upstream = await self.open(path, body, timed=True)
        self._handed_over = True
        self._stop_watching()  # the response watches its own client
        return ClosingStream(
            relay(upstream),
            on_close=self._close,
            media_type=media_type,
            headers=STREAM_HEADERS,
            on_writing=self.lease.writing,  # the stall watchdog's sign of a client that is not reading
        )

    async def _hand_off(self, path: str, body: bytes, media_type: str, handoff: Handoff) -> HandedStream | None:
        """The stream handed off to the worker, when this request and its worker can (else None: relay it)."""
        client, upstream = self._client, self.upstream
        if client is None or not upstream.uds or not self._manager.settings.stream_handoff:
            return None
        conn = connection(client.scope)
        if conn is None:
            return None
        offered = await offer(upstream, conn, path, body, handoff.drop_usage)
        if offered is None:
            return None
        self._handed_over = True
        self._stop_watching()  # the response watches its own client
        return HandedStream(
            offered,
            conn,
            on_close=self._close,
            on_writing=self.lease.writing,
            on_error=handoff.on_error,
            note=self._note,
            media_type=media_type,
            headers=STREAM_HEADERS,
        )

    def writing(self, pending: bool) -> None:
        """A send of the streamed answer to the client is pending, or done (``Lease.writing``)."""
        if self._lease is not None:
            self._lease.writing(pending)
