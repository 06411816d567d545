"""What every route shares: the app's services, body reading, auth, and lease-bound streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from proxy.auth import KeyRing, Role, key_from_headers
from proxy.clock import Clock
from proxy.config import ModelConfig, Settings
from proxy.dialects.shaping import pop_keep_alive, require_model
from proxy.errors import BadRequest, ClientGone, PayloadTooLarge
from proxy.manager import Lease, ModelManager
from proxy.streaming import ClosingStream
from proxy.upstream import UpstreamStream

T = TypeVar("T")
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class ClientOptions:
    """Settings a client API keeps across requests: AUTOMATIC1111's selected checkpoint (POST
    /sdapi/v1/options), used by its requests that name no model. Preferences, not model state: the
    manager still decides what loads."""

    sd_model_checkpoint: str | None = None


@dataclass(frozen=True)
class Services:
    settings: Settings
    manager: ModelManager
    keys: KeyRing
    clock: Clock
    options: ClientOptions = field(default_factory=ClientOptions)


def services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def guarded(role: Role) -> Callable[[Handler], Handler]:
    """Check the caller's key before the handler runs (401/403 in the caller's dialect)."""

    def wrap(handler: Handler) -> Handler:
        async def checked(request: Request) -> Response:
            services(request).keys.require(key_from_headers(request.headers), role)
            return await handler(request)

        checked.__name__ = handler.__name__
        return checked

    return wrap


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 413 past the size limit, 400 when it is not a JSON object."""
    limit = services(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        parts.append(chunk)
    raw = b"".join(parts)
    if not raw.strip():
        raise BadRequest("the request body is empty; a JSON object is expected")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def model_for(request: Request, body: dict[str, Any], needs: tuple[str, ...],
              refusal: str) -> tuple[ModelConfig, float | None]:
    """The model a body names and its keep_alive (taken out of the body), if it can do one of ``needs``."""
    model = require_model(body)
    keep_alive = pop_keep_alive(body)
    cfg = services(request).manager.resolve(model)
    if not set(needs) & set(cfg.capabilities):
        raise BadRequest(f"model '{cfg.name}' {refusal}", param="model")
    return cfg, keep_alive


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first (the worker then sees its own client
    go and stops). A non-streaming handler's request is otherwise never told of the disconnect."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
            raise ClientGone("the client went away")
        return job.result()
    finally:
        watch.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def lease_stream(
    lease: Lease,
    upstream: UpstreamStream,
    content: AsyncIterator[bytes],
    media_type: str,
) -> ClosingStream:
    """A response that closes the upstream stream and releases the lease however it ends."""

    async def close() -> None:
        try:
            await upstream.aclose()
        finally:
            lease.release()

    return ClosingStream(content, on_close=close, media_type=media_type, headers=STREAM_HEADERS)


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
