"""What every route shares: the app's services, body reading, auth, and lease-bound streams."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from proxy.auth import KeyRing, Role, key_from_headers
from proxy.clock import Clock
from proxy.config import ModelConfig, Settings
from proxy.dialects.shaping import require_model
from proxy.errors import BadRequest, PayloadTooLarge
from proxy.keepalive import keep_alive_of
from proxy.manager import ModelManager

T = TypeVar("T")
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


def size_limited(request: Request) -> Request:
    """The same request, whose body raises PayloadTooLarge (413) past ``limits.max_body_bytes``: by its
    declared length at once, else as it is read. Every route reads its body through this."""
    limit = services(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    seen = 0
    receive = request.receive

    async def counting() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        return message

    return Request(request.scope, counting)


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 413 past the size limit, 400 when it is not a JSON object."""
    parts = [chunk async for chunk in size_limited(request).stream()]
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


def model_for(
    request: Request, body: dict[str, Any], needs: tuple[str, ...], refusal: str
) -> tuple[ModelConfig, float | None]:
    """The model a body names and its keep_alive (taken out of the body), if it can do one of ``needs``."""
    model = require_model(body)
    keep_alive = keep_alive_of(body)
    cfg = services(request).manager.resolve(model)
    if not set(needs) & set(cfg.capabilities):
        raise BadRequest(f"model '{cfg.name}' {refusal}", param="model")
    return cfg, keep_alive


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
