"""Anthropic's dialect: POST /v1/messages, /v1/messages/count_tokens, and the models list in Anthropic's
shape (``GET /v1/models`` with an ``anthropic-version`` header, which ``api/openai.py`` hands over here).

Requests are translated to OpenAI's chat format for the worker and the answer translated back chunk
by chunk (``proxy.dialects.anthropic``); errors take Anthropic's shape in ``api/errors.py``. Keys come
from ``x-api-key`` or a Bearer token (``auth.key_from_headers``); ``anthropic-version`` and
``anthropic-beta`` are accepted and not needed.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.api.common import (
    caller,
    guarded,
    json_bytes,
    leased_stream,
    limits,
    model_for,
    named_events,
    read_json,
    services,
)
from proxy.api.media import fetcher, inline_images
from proxy.auth import Role
from proxy.config import ModelConfig
from proxy.dialects import anthropic as dialect
from proxy.dialects.blocks import frames
from proxy.dialects.gate import check_chat
from proxy.dialects.shaping import apply_model_defaults
from proxy.errors import ProxyError, UpstreamError
from proxy.relay import LeasedCall
from proxy.wire import TOKENIZE_PATH


def _error_event(exc: ProxyError) -> list[tuple[str, dict[str, Any]]]:
    return [("error", dialect.error_body(exc.status, dialect.error_message(exc)))]


async def _prepare(request: Request, body: dict[str, Any], count_only: bool) -> tuple[ModelConfig, float | None, Any]:
    cfg, keep_alive = model_for(request, body, ("completion",), "does not support messages")
    openai, stops = dialect.messages_request(body, cfg.name, count_only=count_only)
    await inline_images(openai, cfg, fetcher(request))  # url sources fetched: the worker sees data URLs
    check_chat(openai, cfg, limits(request), "anthropic")
    apply_model_defaults(openai, cfg, services(request).clock.time())
    return cfg, keep_alive, (openai, stops)


@guarded(Role.USER)
async def messages(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive, (openai, stops) = await _prepare(request, body, count_only=False)
    stream = bool(body.get("stream"))
    tr = dialect.MessageStream(cfg.name, stops)
    if stream:
        return await leased_stream(
            request,
            cfg,
            keep_alive,
            "/v1/chat/completions",
            json_bytes(openai),
            lambda up: named_events(up, tr, _error_event),
            lambda exc: frames(_error_event(exc)),
        )
    async with LeasedCall(services(request).manager, cfg.name, keep_alive, client=request) as call:
        async for chunk in (await call.open("/v1/chat/completions", json_bytes(openai))).events():
            tr.feed(chunk)
            if tr.done:
                break
        tr.finish()
    return JSONResponse(tr.message())


@guarded(Role.USER)
async def count_tokens(request: Request) -> Response:
    """The prompt's length in the model's own tokens, as the worker's chat template renders it; a worker
    without the tokenize route (an external server) is asked for one token and its prompt count."""
    body = await read_json(request)
    cfg, keep_alive, (openai, _) = await _prepare(request, body, count_only=True)
    async with LeasedCall(services(request).manager, cfg.name, keep_alive, client=request) as call:
        try:
            counted = await call.post_json(TOKENIZE_PATH, openai)
            tokens = int(counted["count"])
        except UpstreamError as exc:
            if exc.status != 404:
                raise
            openai.update(max_tokens=1, stream=False)
            answer = await call.post_json("/v1/chat/completions", openai)
            tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
    return JSONResponse({"input_tokens": tokens})


def _context(cfg: ModelConfig) -> int | None:
    n_ctx = cfg.options.get("n_ctx")
    return int(n_ctx) if isinstance(n_ctx, int) else None


def model_info(request: Request, cfg: ModelConfig) -> dict[str, Any]:
    return dialect.model_info(cfg.name, services(request).clock.time(), _context(cfg))


def list_models(request: Request) -> Response:
    """Anthropic's list: the chat models (what Claude Code's model picker can use)."""
    chat = [cfg for cfg in caller(request).configs if "completion" in cfg.capabilities]
    return JSONResponse(dialect.model_list([model_info(request, cfg) for cfg in chat]))


def wants_anthropic(request: Request) -> bool:
    """An Anthropic client (its SDK, Claude Code) always sends ``anthropic-version``."""
    return "anthropic-version" in request.headers


routes = [
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
