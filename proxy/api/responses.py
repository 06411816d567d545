"""OpenAI's Responses API: POST /v1/responses (stateless: nothing is stored).

The request is translated to OpenAI's chat format for the worker and the answer translated back chunk
by chunk (``proxy.dialects.responses``); errors take OpenAI's shape (``api/errors.py``), and a stream that
breaks ends with ``response.failed``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.api.common import guarded, json_bytes, leased_stream, limits, model_for, named_events, read_json, services
from proxy.api.media import fetcher, inline_images
from proxy.auth import Role
from proxy.dialects import responses as dialect
from proxy.dialects.blocks import frames
from proxy.dialects.gate import check_chat
from proxy.dialects.shaping import apply_model_defaults
from proxy.errors import ContextLengthExceeded, ProxyError
from proxy.relay import LeasedCall


def _failure_code(exc: ProxyError) -> str:
    """A failed response's code: OpenAI's for a prompt too long for the context, else a server error."""
    return exc.code if isinstance(exc, ContextLengthExceeded) else "server_error"


@guarded(Role.USER)
async def create(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = model_for(request, body, ("completion",), "does not support responses")
    openai = dialect.responses_request(body, cfg.name)
    await inline_images(openai, cfg, fetcher(request))  # input_image URLs fetched: the worker sees data URLs
    check_chat(openai, cfg, limits(request), "responses")
    now = services(request).clock.time()
    apply_model_defaults(openai, cfg, now)
    tr = dialect.ResponseStream(cfg.name, body, now)
    if body.get("stream"):
        return await leased_stream(
            request,
            cfg,
            keep_alive,
            "/v1/chat/completions",
            json_bytes(openai),
            # a broken stream fails the response, with the code OpenAI gives a failed response
            lambda up: named_events(up, tr, lambda exc: tr.failed(_failure_code(exc), exc.message)),
            lambda exc: frames(tr.failed(_failure_code(exc), exc.message)),
        )
    async with LeasedCall(services(request).manager, cfg.name, keep_alive, client=request) as call:
        async for chunk in (await call.open("/v1/chat/completions", json_bytes(openai))).events():
            tr.feed(chunk)
        tr.finish()
    return JSONResponse(tr.response())


routes = [Route("/v1/responses", create, methods=["POST"])]
