"""Loading feedback: a streamed answer whose model must load first starts at once.

A client with a response timeout of 30 s gives up on a model that takes longer to load when nothing comes
back. So a streamed ``/v1/*`` request (OpenAI's chat and completions, Anthropic's messages, the Responses
API: all SSE) that waits for its model's load gets its headers at once and an SSE comment line,
``: loading smollm2:135m 40% (loading weights)``, every ``server.loading_comment_interval``; SSE clients
ignore comments. When the lease comes, the answer follows in the same stream.

Where the early response begins: only when the manager says that the request is admitted and waits for a
load (``ModelManager.acquire``'s ``on_loading``: its model is starting and the request holds its place in
the queue). Whatever is refused before that stays a status in the client's dialect (400, 401, 403, 404,
507, 503 for a full queue or a load that failed a moment ago). After it, a load that fails (or a shutdown)
ends the stream with the dialect's SSE error event (``on_error``), never a 200 followed by nothing.

The client is watched while the request waits: one that goes away before the response has begun cancels
its lease's wait (its ticket leaves the queue and loads nothing); after, the response's close does.

Not used by Ollama's NDJSON (Ollama sends nothing until the model is loaded), nor for a model whose YAML
says ``loading_feedback: false``, nor for answers that are not streamed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response

from proxy.config import ModelConfig
from proxy.errors import ClientGone, ProxyError, Unavailable
from proxy.handoff import Handoff
from proxy.manager import ModelManager
from proxy.relay import LeasedCall
from proxy.streaming import ClosingStream
from proxy.upstream import UpstreamStream
from proxy.wire import STREAM_HEADERS, client_gone

Relay = Callable[[UpstreamStream], AsyncIterator[bytes]]
SSE = "text/event-stream"


def comment(name: str, progress: tuple[float, str] | None) -> bytes:
    """One SSE comment line (and the blank line that ends it) saying how far the load has come."""
    if progress is None:
        return f": loading {name}\n\n".encode()
    fraction, phase = progress
    text = f": loading {name} {round(fraction * 100)}%"
    return f"{text} ({phase})\n\n".encode() if phase else f"{text}\n\n".encode()


async def leased_stream(
    manager: ModelManager,
    cfg: ModelConfig,
    keep_alive: float | None,
    client: Request,
    path: str,
    body: bytes,
    relay: Relay,
    on_error: Callable[[ProxyError], bytes],
    interval: float,
    handoff: Handoff | None = None,
) -> Response:
    """Lease the model and stream its answer (``LeasedCall.stream``, handed off to the worker where it can:
    ``handoff``); if the request waits for a load first, answer at once with the load's comments, then the
    answer (relayed), or ``on_error``'s event if the load fails."""
    if not cfg.loading_feedback:
        async with LeasedCall(manager, cfg.name, keep_alive, client=client) as call:
            return await call.stream(path, body, relay, SSE, handoff)
    loading = asyncio.Event()
    call = LeasedCall(manager, cfg.name, keep_alive, client=client, on_loading=loading.set)
    entering = asyncio.ensure_future(call.acquire())
    signalled = asyncio.ensure_future(loading.wait())
    gone = asyncio.ensure_future(client_gone(client.receive))  # before the response: nobody else watches
    try:
        await asyncio.wait({entering, signalled, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await _abandon(entering, call)
        raise
    finally:
        signalled.cancel()
        gone.cancel()
    if gone.done() and not gone.cancelled():  # it gave up while waiting: its ticket leaves the queue
        await _abandon(entering, call)
        raise ClientGone("the client went away while its request waited")
    if entering.done():  # leased (or refused) without waiting for a load: the usual path, errors as statuses
        entering.result()
        async with call:
            return await call.stream(path, body, relay, SSE, handoff)
    fed = _fed(manager, cfg.name, entering, call, path, body, relay, on_error, interval)
    return ClosingStream(
        fed, on_close=lambda: _abandon(entering, call), media_type=SSE, headers=STREAM_HEADERS, on_writing=call.writing
    )


async def _fed(
    manager: ModelManager,
    name: str,
    entering: asyncio.Future[None],
    call: LeasedCall,
    path: str,
    body: bytes,
    relay: Relay,
    on_error: Callable[[ProxyError], bytes],
    interval: float,
) -> AsyncIterator[bytes]:
    try:
        while not entering.done():
            yield comment(name, manager.loading(name))
            await asyncio.wait({entering}, timeout=interval)
        if entering.cancelled():
            raise Unavailable("the model's load was cancelled: the proxy is shutting down", retry_after=5)
        entering.result()
        upstream = await call.open(path, body, timed=True)  # streamed to the client: its first byte is the TTFT
    except ProxyError as exc:
        yield on_error(exc)
        return
    async for chunk in relay(upstream):
        yield chunk


async def _abandon(entering: asyncio.Future[None], call: LeasedCall) -> None:
    """However the response ends: stop waiting for the lease, then release what the call holds, once."""
    if not entering.done():
        entering.cancel()
        await asyncio.wait({entering})
    if not entering.cancelled():
        entering.exception()  # seen: a failed lease was answered in the stream, or nobody was left to tell
    await call.close()
