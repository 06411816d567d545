"""Ollama's dialect: /api/chat, /api/generate, /api/embed(dings), /api/tags, /api/ps, /api/show,
/api/version and ``/``. Requests are translated to OpenAI's format for the worker and the answers
translated back chunk by chunk (``proxy.dialects.ollama``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from proxy import __version__, largejson
from proxy import runtime_options as ropts
from proxy.api import cluster
from proxy.api.common import caller, guarded, json_bytes, limits, model_for, read_json, services
from proxy.api.errors import is_admin
from proxy.api.media import fetcher, inline_images
from proxy.auth import Role
from proxy.catalog import entry, tag_name
from proxy.cluster.view import ModelPresence
from proxy.config import ModelConfig
from proxy.dialects import ollama as dialect
from proxy.dialects.gate import check_chat, check_embeddings
from proxy.dialects.shaping import apply_model_defaults, optional
from proxy.errors import BadRequest, ProxyError
from proxy.keepalive import format_keep_alive
from proxy.manager import ModelStatus
from proxy.relay import LeasedCall
from proxy.upstream import UpstreamStream

NDJSON = "application/x-ndjson"


async def _ndjson(upstream: UpstreamStream, tr: dialect.StreamTranslator) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.events():
            out = tr.feed(chunk, time.perf_counter_ns())
            if out is not None:
                yield json_bytes(out) + b"\n"
        yield json_bytes(tr.final(time.perf_counter_ns(), whole=False)) + b"\n"
    except ProxyError as exc:
        yield json_bytes({"error": exc.message}) + b"\n"


async def _generation(
    request: Request,
    cfg: ModelConfig,
    path: str,
    body: dict[str, Any],
    stream: bool,
    keep_alive: float | None,
    generate: bool,
    runner: dict[str, Any],
) -> Response:
    started = time.perf_counter_ns()
    manager = services(request).manager
    async with LeasedCall(manager, cfg.name, keep_alive, client=request, options=runner) as call:
        tr = dialect.StreamTranslator(cfg.name, generate, started, load_ns=int(call.load_duration * 1e9))
        if stream:
            return await call.stream(path, json_bytes(body), lambda upstream: _ndjson(upstream, tr), NDJSON)
        async for chunk in (await call.open(path, json_bytes(body))).events():
            tr.feed(chunk, time.perf_counter_ns())
    return JSONResponse(tr.final(time.perf_counter_ns(), whole=True))


async def _load_or_unload(
    request: Request, cfg: ModelConfig, keep_alive: float | None, generate: bool, runner: dict[str, Any]
) -> Response:
    manager = services(request).manager
    unload = keep_alive == 0
    if unload:
        await manager.unload(cfg.name)
    else:
        await manager.preload(cfg.name, keep_alive, runner, admin=is_admin(request))
    return JSONResponse(dialect.load_response(cfg.name, generate, unload))


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = optional(body, "stream", bool, "a boolean")
    return True if stream is None else stream


def _chat_model(request: Request, body: dict[str, Any]) -> tuple[ModelConfig, float | None]:
    return model_for(request, body, ("completion",), "does not support chat or generate")


@guarded(Role.USER)
async def chat(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = _chat_model(request, body)
    stream = _stream_flag(body)
    runner = ropts.requested(body.get("options"))  # num_ctx: a reload where the model's config allows it
    if not body.get("messages"):
        return await _load_or_unload(request, cfg, keep_alive, False, runner)
    openai = dialect.chat_request(body, cfg.name)
    await inline_images(openai, cfg, fetcher(request))  # each image labelled by its bytes
    check_chat(openai, cfg, limits(request), "ollama")
    apply_model_defaults(openai, cfg, services(request).clock.time())
    return await _generation(request, cfg, "/v1/chat/completions", openai, stream, keep_alive, False, runner)


@guarded(Role.USER)
async def generate(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = _chat_model(request, body)
    stream = _stream_flag(body)
    runner = ropts.requested(body.get("options"))
    if not optional(body, "prompt", str, "a string") and not body.get("images"):
        return await _load_or_unload(request, cfg, keep_alive, True, runner)
    path, openai = dialect.generate_request(body, cfg.name)
    await inline_images(openai, cfg, fetcher(request))
    check_chat(openai, cfg, limits(request), "ollama", completion="messages" not in openai)
    apply_model_defaults(openai, cfg, services(request).clock.time())
    return await _generation(request, cfg, path, openai, stream, keep_alive, True, runner)


async def _embed(
    request: Request, cfg: ModelConfig, inputs: list[str], keep_alive: float | None
) -> tuple[bytes, int, int]:
    """The worker's OpenAI-shaped answer as it came (``largejson.reshape`` it), its time and load time."""
    started = time.perf_counter_ns()
    async with LeasedCall(services(request).manager, cfg.name, keep_alive, client=request) as call:
        answer = await call.post("/v1/embeddings", json_bytes({"model": cfg.name, "input": inputs}))
        load_ns = int(call.load_duration * 1e9)
    return answer, time.perf_counter_ns() - started, load_ns


def _embed_model(request: Request, body: dict[str, Any]) -> tuple[ModelConfig, float | None]:
    return model_for(request, body, ("embedding", "completion"), "does not make embeddings")


@guarded(Role.USER)
async def embed(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = _embed_model(request, body)
    raw = body.get("input")
    if raw is None or raw == [] or raw == "":
        await services(request).manager.preload(cfg.name, keep_alive, admin=is_admin(request))
        return JSONResponse({"model": cfg.name, "embeddings": []})
    inputs = check_embeddings(raw, limits(request))
    answer, total, load = await _embed(request, cfg, inputs, keep_alive)
    shaped = await largejson.reshape(answer, lambda result: dialect.embed_response(cfg.name, result, total, load))
    return Response(shaped, media_type="application/json")


@guarded(Role.USER)
async def embeddings(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = _embed_model(request, body)
    prompt = optional(body, "prompt", str, "a string")
    if not prompt:
        await services(request).manager.preload(cfg.name, keep_alive, admin=is_admin(request))
        return JSONResponse({"embedding": []})
    check_embeddings(prompt, limits(request), "prompt")
    answer, _, _ = await _embed(request, cfg, [prompt], keep_alive)
    shaped = await largejson.reshape(answer, lambda result: {"embedding": result["data"][0]["embedding"]})
    return Response(shaped, media_type="application/json")


async def _model_info(request: Request, cfg: ModelConfig, family: str, file_type: str) -> dict[str, Any]:
    """The GGUF's own metadata where there is one; else what the config says."""
    metadata = await services(request).manager.gguf_metadata(cfg)
    if metadata:
        return metadata
    return {
        "general.architecture": family,
        "general.basename": cfg.name,
        "general.file_type": file_type,
        f"{family}.context_length": int(cfg.options.get("n_ctx") or 0),
    }


def _tag(cfg: ModelConfig) -> dict[str, Any]:
    e = entry(cfg)
    return {
        "name": tag_name(cfg.name),
        "model": tag_name(cfg.name),
        "modified_at": dialect.rfc3339(e.modified_at or None),
        "size": e.size,
        "digest": e.digest,
        "details": e.details,
        "capabilities": cfg.listed_capabilities,
    }


def _llm_configs(request: Request) -> list[ModelConfig]:
    return [c for c in caller(request).configs if {"completion", "embedding"} & set(c.capabilities)]


@guarded(Role.USER)
async def tags(request: Request) -> Response:
    models = [_tag(cfg) for cfg in _llm_configs(request)]
    for name, node in cluster.other_models(request):  # another node's: listed when it is a language model
        presence = node.model(name)
        if presence is None or presence.language_model:
            models.append(_remote_tag(name, presence))
    return JSONResponse({"models": models})


def _remote_tag(name: str, presence: ModelPresence | None) -> dict[str, Any]:
    """A model another node of the cluster serves (what its registry entry says of it)."""
    size = presence.ram + presence.vram if presence is not None else 0
    modified = dialect.rfc3339()
    return {
        "name": tag_name(name),
        "model": tag_name(name),
        "modified_at": modified,
        "size": size,
        "digest": "",
        "details": {},
        **({"capabilities": list(presence.capabilities)} if presence and presence.capabilities is not None else {}),
    }


def _expires(status: ModelStatus) -> str:
    if status.expires_at is None:
        return dialect.rfc3339()
    if math.isinf(status.expires_at):
        return "2318-01-01T00:00:00Z"  # Ollama shows "forever" as a far-future date too
    return dialect.rfc3339(status.expires_at)


@guarded(Role.USER)
async def ps(request: Request) -> Response:
    wanted = {c.name for c in _llm_configs(request)}
    models = []
    for status in caller(request).status():
        if status.state != "ready" or status.name not in wanted:
            continue
        tag = _tag(status.config)
        vram = status.vram_bytes or 0
        size = (status.rss_bytes or 0) + vram or tag["size"]  # Ollama's size is the whole, size_vram its GPU part
        models.append(
            {
                **tag,
                "expires_at": _expires(status),
                "size": size,
                "size_vram": vram,
                "context_length": int(status.config.options.get("n_ctx") or 0),
                "keep_alive": format_keep_alive(status.keep_alive),
            }
        )
    for presence, _node in cluster.loaded_elsewhere(request):  # ready on another node of the cluster
        if not presence.language_model:
            continue
        tag = _remote_tag(presence.name, presence)
        models.append({**tag, "expires_at": dialect.rfc3339(), "size_vram": presence.vram, "context_length": 0})
    return JSONResponse({"models": models})


@guarded(Role.USER)
async def show(request: Request) -> Response:
    body = await read_json(request)
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' is required", param="model")
    cfg = caller(request).resolve(name)
    e = entry(cfg)
    params = "\n".join(f"{k:<20} {json.dumps(v)}" for k, v in cfg.sampling.items())
    if is_admin(request):
        modelfile = f"# configured in {cfg.source}\nFROM {cfg.model_path or cfg.url or cfg.name}\n"
    else:  # user keys see no paths
        modelfile = f"FROM {cfg.model_path.name if cfg.model_path else cfg.name}\n"
    if cfg.system:
        modelfile += f'SYSTEM """{cfg.system}"""\n'
    modelfile += "".join(f"PARAMETER {k} {json.dumps(v)}\n" for k, v in cfg.sampling.items())
    return JSONResponse(
        {
            "modelfile": modelfile,
            "parameters": params,
            "template": "",
            "system": cfg.system or "",
            "details": e.details,
            "model_info": await _model_info(request, cfg, e.details["family"], e.details["quantization_level"]),
            "capabilities": cfg.listed_capabilities,
            "modified_at": dialect.rfc3339(e.modified_at or None),
        }
    )


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


routes = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/embed", embed, methods=["POST"]),
    Route("/api/embeddings", embeddings, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET", "HEAD"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/version", version, methods=["GET", "HEAD"]),
    Route("/", root, methods=["GET", "HEAD"]),
]
