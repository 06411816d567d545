"""Images: /txt2img and /img2img (the older inference API), AUTOMATIC1111's /sdapi/v1/*, and OpenAI's
/v1/images/generations, all translated (``proxy.dialects.images``) to the worker's one canonical
request; validation happens here, before any worker sees the request."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.api.common import caller, checked_keep_alive, guarded, json_bytes, model_for, read_json, services
from proxy.api.errors import is_admin
from proxy.auth import Role
from proxy.config import ModelConfig
from proxy.dialects import images as dialect
from proxy.dialects.shaping import optional
from proxy.errors import BadRequest
from proxy.keepalive import keep_alive_of
from proxy.relay import LeasedCall
from proxy.wire import ImageRequest

REFUSAL = "does not make images"


async def _generate(
    request: Request, cfg: ModelConfig, keep_alive: float | None, canonical: ImageRequest
) -> dict[str, Any]:
    async with LeasedCall(services(request).manager, cfg.name, keep_alive, client=request) as call:
        return await call.post_json("/v1/images", canonical)


def _image_models(request: Request) -> list[ModelConfig]:
    return [c for c in caller(request).configs if "image" in c.capabilities]


def _image_model(request: Request, name: str) -> ModelConfig:
    cfg, _ = model_for(request, {"model": name}, ("image",), REFUSAL)
    return cfg


def _chooser(request: Request) -> str | None:
    """Whose A1111 selection a request reads and sets: a user key's own (its caller id), or the shared
    default (None) for an admin key, which sets it for every key that has chosen none."""
    return None if is_admin(request) else getattr(request.state, "caller", None)


def _selected(request: Request) -> ModelConfig | None:
    """The checkpoint this key selected (POST /sdapi/v1/options), else the one an admin selected for every
    key, else the first image model (of those the caller may see: a scoped caller never learns of a
    selection outside its scope)."""
    chosen = services(request).options.checkpoint_of(_chooser(request))
    models = _image_models(request)
    for cfg in models:
        if cfg.name == chosen:
            return cfg
    return models[0] if models else None


def _a1111_model(request: Request, body: dict[str, Any]) -> tuple[ModelConfig, float | None]:
    """A1111 requests rarely name a model: override_settings, then `model`, then the selected checkpoint."""
    overrides = optional(body, "override_settings", dict, "an object") or {}
    named = optional(overrides, "sd_model_checkpoint", str, "a string") or optional(body, "model", str, "a string")
    keep_alive = checked_keep_alive(request, keep_alive_of(body))
    cfg = _image_model(request, named) if named else _selected(request)
    if cfg is None:
        raise BadRequest("no image model is configured", param="model")
    return cfg, keep_alive


def inference_route(img2img: bool) -> Callable[[Request], Any]:
    @guarded(Role.USER)
    async def handler(request: Request) -> Response:
        body = await read_json(request)
        cfg, keep_alive = model_for(request, body, ("image",), REFUSAL)
        canonical = dialect.from_inference(body, cfg, img2img)
        result = await _generate(request, cfg, keep_alive, canonical)
        if "image/png" in request.headers.get("accept", ""):
            return Response(base64.b64decode(result["images"][0]["base64"]), media_type="image/png")
        return JSONResponse(
            {
                "images": result["images"],
                "processing_time": result["processing_time"],
                "parameters": dialect.parameters(canonical, result),
            }
        )

    return handler


def a1111_route(img2img: bool) -> Callable[[Request], Any]:
    @guarded(Role.USER)
    async def handler(request: Request) -> Response:
        body = await read_json(request)
        cfg, keep_alive = _a1111_model(request, body)
        canonical = dialect.from_a1111(body, cfg, img2img)
        result = await _generate(request, cfg, keep_alive, canonical)
        return Response(json_bytes(dialect.a1111_response(body, canonical, result)), media_type="application/json")

    return handler


def _filename(request: Request, cfg: ModelConfig) -> str:
    if cfg.model_path is None:
        return ""
    return str(cfg.model_path) if is_admin(request) else cfg.model_path.name  # user keys see no paths


@guarded(Role.USER)
async def sd_models(request: Request) -> Response:
    return JSONResponse(
        [
            {
                "title": c.name,
                "model_name": c.name,
                "hash": None,
                "sha256": None,
                "filename": _filename(request, c),
                "config": None,
            }
            for c in _image_models(request)
        ]
    )


@guarded(Role.USER)
async def sd_options(request: Request) -> Response:
    cfg = _selected(request)
    return JSONResponse({"sd_model_checkpoint": cfg.name if cfg else None})


@guarded(Role.USER)
async def set_sd_options(request: Request) -> Response:
    """A1111's way to switch checkpoints (what Open WebUI does when its image model is changed): only
    `sd_model_checkpoint` means something here; other options are accepted and ignored, as A1111 answers
    `null`. A user key's choice is its own; an admin key's is the default for every key that made none.
    The model loads on its next request, like any other."""
    body = await read_json(request)
    name = body.get("sd_model_checkpoint")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise BadRequest("'sd_model_checkpoint' must be a model name", param="sd_model_checkpoint")
        services(request).options.choose(_chooser(request), _image_model(request, name).name)
    return JSONResponse(None)


@guarded(Role.USER)
async def openai_generations(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = model_for(request, body, ("image",), REFUSAL)
    canonical = dialect.from_openai(body, cfg)
    result = await _generate(request, cfg, keep_alive, canonical)
    data = [{"b64_json": img["base64"], "revised_prompt": canonical["prompt"]} for img in result["images"]]
    return JSONResponse({"created": int(services(request).clock.time()), "data": data})


routes = [
    Route("/txt2img", inference_route(False), methods=["POST"]),
    Route("/img2img", inference_route(True), methods=["POST"]),
    Route("/sdapi/v1/txt2img", a1111_route(False), methods=["POST"]),
    Route("/sdapi/v1/img2img", a1111_route(True), methods=["POST"]),
    Route("/sdapi/v1/sd-models", sd_models, methods=["GET"]),
    Route("/sdapi/v1/options", sd_options, methods=["GET"]),
    Route("/sdapi/v1/options", set_sd_options, methods=["POST"]),
    Route("/v1/images/generations", openai_generations, methods=["POST"]),
]
