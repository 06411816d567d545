"""OpenAI's dialect: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Bodies are validated and shaped here, then passed to the worker as they are; streamed answers
are relayed byte for byte (the worker already speaks SSE), with an explicit error event if the
worker goes away mid-stream.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import largejson
from proxy.api import anthropic, cluster
from proxy.api.common import caller, guarded, json_bytes, leased_stream, limits, model_for, read_json, services
from proxy.api.media import fetcher, inline_images
from proxy.auth import Role
from proxy.config import ModelConfig
from proxy.dialects.gate import check_chat, check_embeddings
from proxy.dialects.shaping import apply_model_defaults, pop_encoding_format
from proxy.errors import ProxyError, WorkerUnavailable
from proxy.handoff import Handoff
from proxy.relay import USAGE_MARKER, LeasedCall
from proxy.upstream import UpstreamStream
from proxy.wire import SSE_DONE, error_body, sse_event


def sse_error(exc: ProxyError) -> bytes:
    payload = error_body(exc.message, kind=exc.openai_type, code=exc.code)
    return b"\n\n" + sse_event(json_bytes(payload))


_DONE = SSE_DONE.rstrip()


def _relay(stream: UpstreamStream) -> AsyncIterator[bytes]:
    """The worker's SSE bytes as they come; a stream that ends without ``[DONE]`` (its worker died
    or cut it) ends with an explicit error event, never silently."""
    return _relayed(stream.raw())


def _relay_without_usage(stream: UpstreamStream) -> AsyncIterator[bytes]:
    """``_relay`` for a stream whose usage the proxy asked the worker for (its token count, for /metrics)
    when the client did not: whole events go on as they come, less the usage-only chunk at the end."""
    return _relayed(_without_usage(stream.raw()))


async def _relayed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    tail = b""
    try:
        async for chunk in chunks:
            tail = (tail + chunk)[-32:] if len(chunk) < 32 else chunk[-32:]
            yield chunk
        if not tail.rstrip().endswith(_DONE):
            raise WorkerUnavailable("the worker ended the answer early")
    except ProxyError as exc:
        yield sse_error(exc)


async def _without_usage(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """SSE bytes cut at event ends (a part of an event waits for the rest), the usage-only chunk dropped."""
    carry = b""
    async for chunk in chunks:
        data = carry + chunk if carry else chunk
        if data.endswith(b"\n\n"):  # a token's event, whole (the usual case): no copy
            whole, carry = data, b""
        else:
            end = data.rfind(b"\n\n")
            if end < 0:
                carry = data
                continue
            whole, carry = data[: end + 2], data[end + 2 :]
        if USAGE_MARKER in whole:
            whole = b"\n\n".join(e for e in whole.split(b"\n\n") if not _is_usage_chunk(e))
        if whole:
            yield whole
    if carry:
        yield carry


def _is_usage_chunk(event: bytes) -> bool:
    if not (event.startswith(b"data: {") and USAGE_MARKER in event):
        return False
    try:
        data = json.loads(event[6:])
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("choices") == [] and isinstance(data.get("usage"), dict)


def _count_usage(body: dict[str, Any], cfg: ModelConfig) -> bool:
    """Ask our llama.cpp worker for a stream's usage when the client did not (its tokens are counted for
    /metrics and the events); True when the relay must then drop it. Other backends' streams are left as
    they are (a server at a url may answer with ``"usage": null`` in every chunk)."""
    options = body.get("stream_options")
    if cfg.backend != "llama_cpp" or (isinstance(options, dict) and options.get("include_usage")):
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


async def forward(
    request: Request, cfg: ModelConfig, path: str, body: dict[str, Any], stream: bool, keep_alive: float | None
) -> Response:
    """Lease the model, send ``body`` to its worker, relay the answer; the lease ends with it."""
    if stream:
        drop_usage = _count_usage(body, cfg)
        relay = _relay_without_usage if drop_usage else _relay
        handoff = Handoff(drop_usage, sse_error)  # the worker may write it to the client itself (proxy.handoff)
        return await leased_stream(request, cfg, keep_alive, path, json_bytes(body), relay, sse_error, handoff)
    async with LeasedCall(services(request).manager, cfg.name, keep_alive, client=request) as call:
        content = await call.post(path, json_bytes(body))
    return Response(content, media_type="application/json")


async def _prepare(
    request: Request, needs: tuple[str, ...], refusal: str
) -> tuple[dict[str, Any], ModelConfig, float | None]:
    body = await read_json(request)
    cfg, keep_alive = model_for(request, body, needs, refusal)
    body["model"] = cfg.name
    return body, cfg, keep_alive


@guarded(Role.USER)
async def chat_completions(request: Request) -> Response:
    body, cfg, keep_alive = await _prepare(request, ("completion",), "does not support chat completions")
    await inline_images(body, cfg, fetcher(request))  # http(s) image URLs fetched: the worker sees data URLs
    check_chat(body, cfg, limits(request))
    apply_model_defaults(body, cfg, services(request).clock.time())
    return await forward(request, cfg, "/v1/chat/completions", body, bool(body.get("stream")), keep_alive)


@guarded(Role.USER)
async def completions(request: Request) -> Response:
    body, cfg, keep_alive = await _prepare(request, ("completion",), "does not support completions")
    check_chat(body, cfg, limits(request), completion=True)
    apply_model_defaults(body, cfg)
    return await forward(request, cfg, "/v1/completions", body, bool(body.get("stream")), keep_alive)


@guarded(Role.USER)
async def embeddings(request: Request) -> Response:
    body, cfg, keep_alive = await _prepare(request, ("embedding", "completion"), "does not make embeddings")
    check_embeddings(body.get("input"), limits(request))
    fmt = pop_encoding_format(body)
    if fmt != "base64":
        return await forward(request, cfg, "/v1/embeddings", body, False, keep_alive)
    async with LeasedCall(services(request).manager, cfg.name, keep_alive, client=request) as call:
        answer = await call.post("/v1/embeddings", json_bytes(body))
    return Response(await largejson.reshape(answer, _in_base64), media_type="application/json")


def _in_base64(result: dict[str, Any]) -> dict[str, Any]:
    """What the openai SDK asks for by default: each vector as little-endian float32, in base64."""
    for item in result.get("data") or []:
        vector = item["embedding"]
        item["embedding"] = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return result


# llama.cpp's router reports each model's status as loaded, loading or unloaded (Open WebUI's Loaded badge)
_ROUTER_STATUS = {"ready": "loaded", "starting": "loading"}


def model_object(request: Request, cfg: ModelConfig) -> dict[str, Any]:
    manager = services(request).manager
    return {
        "id": cfg.name,
        "object": "model",
        "created": int(services(request).clock.time()),
        "owned_by": "local",
        "kind": cfg.kind,
        "backend": cfg.backend,
        "aliases": list(cfg.aliases),
        "loaded": manager.is_loaded(cfg.name),
        "status": {"value": _ROUTER_STATUS.get(manager.state_of(cfg.name), "unloaded")},
    }


@guarded(Role.USER)
async def list_models(request: Request) -> Response:
    if anthropic.wants_anthropic(request):
        return anthropic.list_models(request)
    data = [model_object(request, cfg) for cfg in caller(request).configs]
    created = int(services(request).clock.time())
    for name, node in cluster.other_models(request):  # a cluster's other nodes' models (none on a single host)
        state = node.state_of(name) or "stopped"
        loaded = {"id": name, "object": "model", "created": created, "owned_by": node.node, "loaded": state == "ready"}
        presence = node.model(name)
        kind = {"kind": presence.kind} if presence is not None and presence.kind is not None else {}
        data.append({**loaded, **kind, "status": {"value": _ROUTER_STATUS.get(state, "unloaded")}})
    return JSONResponse({"object": "list", "data": data})


@guarded(Role.USER)
async def get_model(request: Request) -> Response:
    name = request.path_params["model"]
    cfg = caller(request).resolve(name)
    if anthropic.wants_anthropic(request):
        return JSONResponse(anthropic.model_info(request, cfg))
    return JSONResponse(model_object(request, cfg))


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
