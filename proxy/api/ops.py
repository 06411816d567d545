"""Watching the proxy: /metrics (Prometheus), /status/events (SSE), /status/requests, /logs/{model}.

- ``GET /metrics``: the text exposition format; no key when ``server.metrics_public`` (the default), then
  naming only the models every scoped key may see (``public_principal``), else any valid unscoped key.
- ``GET /status/events`` (admin): Server-Sent Events. The first event is ``snapshot`` (every model as
  ``/status`` shows it, the last requests, and how many watch: ``watchers``), then one event per thing
  that happens, named by its type (``state``, ``load_start``, ``load_progress``, ``load_end``, ``unload``,
  ``request_start``, ``request_end``; ``proxy.events``), its JSON in ``data``. A client that reads too slowly loses the
  oldest events and gets a ``dropped`` event with the count; a ``: ping`` comment comes every 15 s.
- ``GET /status/requests`` (admin): the last request ends as JSON, oldest first.
- ``GET /logs/{model}`` (admin): the tail of a model's worker output as text/plain (``?lines=N``,
  default 100); ``?follow=true`` keeps the answer open and sends each new line as it comes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from proxy.api.admin import _status as model_status
from proxy.api.common import caller, every_model, guarded, public_principal, services
from proxy.auth import Role, key_from_headers
from proxy.errors import BadRequest
from proxy.events import Event, Feed
from proxy.metrics import CONTENT_TYPE
from proxy.modellogs import RING_LINES
from proxy.streaming import ClosingStream
from proxy.wire import STREAM_HEADERS

PING_SECONDS = 15.0
DEFAULT_LINES = 100


async def metrics(request: Request) -> Response:
    svc = services(request)
    svc.metrics.observe_workers(await svc.manager.worker_reports())  # the prompt cache's counts
    if not svc.settings.metrics_public:
        # every model's figures: a key scoped to some models may not see them (403)
        request.state.principal = svc.keys.authenticate(key_from_headers(request.headers), Role.USER)
        every_model(request)
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE)
    public = public_principal(svc)  # with scoped keys configured: only the models every one of them sees
    visible = None if public.models is None else (lambda model: not model or public.allows((model,)))
    return Response(svc.metrics.render(visible), media_type=CONTENT_TYPE)


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def snapshot(request: Request) -> dict[str, Any]:
    svc = services(request)
    return {
        "type": "snapshot",
        "models": [model_status(s, None, True) for s in svc.manager.status()],
        "queued": svc.manager.queued,
        "requests": [e.as_dict() for e in svc.events.recent()],
        # who watches now: event streams (this one included) and log followers per model
        "watchers": {"events": svc.events.subscribers, "logs": svc.logs.followers()},
    }


async def _event_stream(first: bytes, feed: Feed[Event]) -> AsyncIterator[bytes]:
    yield first
    dropped = 0
    while True:
        try:
            batch = await asyncio.wait_for(feed.get(), PING_SECONDS)
        except TimeoutError:
            yield b": ping\n\n"
            continue
        if feed.dropped != dropped:
            yield _sse("dropped", {"type": "dropped", "count": feed.dropped - dropped})
            dropped = feed.dropped
        yield b"".join(_sse(e.kind, e.as_dict()) for e in batch)


@guarded(Role.ADMIN)
async def events(request: Request) -> Response:
    every_model(request)
    feed = services(request).events.subscribe()  # before the snapshot: nothing falls between the two
    first = _sse("snapshot", snapshot(request))

    async def close() -> None:
        feed.close()

    return ClosingStream(
        _event_stream(first, feed), on_close=close, media_type="text/event-stream", headers=STREAM_HEADERS
    )


@guarded(Role.ADMIN)
async def recent_requests(request: Request) -> Response:
    every_model(request)
    return JSONResponse({"requests": [e.as_dict() for e in services(request).events.recent()]})


def _lines_param(request: Request) -> int:
    raw = request.query_params.get("lines", str(DEFAULT_LINES))
    if not raw.isdigit():
        raise BadRequest(f"lines must be a whole number from 0 to {RING_LINES}, got '{raw}'", param="lines")
    return min(int(raw), RING_LINES)


def _follow_param(request: Request) -> bool:
    raw = request.query_params.get("follow", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise BadRequest(f"follow must be true or false, got '{raw}'", param="follow")
    return raw in ("true", "1")


async def _follow(tail: list[str], feed: Feed[str]) -> AsyncIterator[bytes]:
    if tail:
        yield ("\n".join(tail) + "\n").encode()
    async for line in feed:
        yield (line + "\n").encode()


@guarded(Role.ADMIN)
async def logs(request: Request) -> Response:
    svc = services(request)
    cfg = caller(request).resolve(request.path_params["model"])
    lines, follow = _lines_param(request), _follow_param(request)
    model_log = svc.logs.model(cfg.name)
    if not follow:
        tail = model_log.tail(lines)
        return PlainTextResponse("\n".join(tail) + ("\n" if tail else ""))
    feed = model_log.follow()  # before the tail: no line falls between the two
    tail = model_log.tail(lines)

    async def close() -> None:
        feed.close()

    return ClosingStream(
        _follow(tail, feed), on_close=close, media_type="text/plain; charset=utf-8", headers=STREAM_HEADERS
    )


routes = [
    Route("/metrics", metrics, methods=["GET"]),
    Route("/status/events", events, methods=["GET"]),
    Route("/status/requests", recent_requests, methods=["GET"]),
    Route("/logs/{model:path}", logs, methods=["GET"]),
]
