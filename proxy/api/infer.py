"""Seed 001's API: ``POST /infer`` and ``/v1/infer`` (an image from a prompt, ``model_id`` a model's
name, alias or content id), ``GET /v1`` (what this API is) and ``GET /v1/health``; and ``POST
/models/rescan`` (admin), which looks for new or removed weights in models/ (``proxy.discovery``)."""

from __future__ import annotations

from typing import cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import proxy
from proxy.api.common import caller, every_model, guarded, model_for, read_json, services
from proxy.auth import Role
from proxy.dialects import infer as dialect
from proxy.discovery import Discovery
from proxy.relay import LeasedCall
from proxy.wire import ImageResult

REFUSAL = "does not make images"


def discovery_of(request: Request) -> Discovery:
    found: Discovery = request.app.state.discovery
    return found


@guarded(Role.USER)
async def infer(request: Request) -> Response:
    body = await read_json(request)
    rid = dialect.request_id(body)
    named = await discovery_of(request).resolve(services(request).manager, dialect.model_id(body))
    named = caller(request).resolve(named.name)  # a scoped caller's other models are 404
    cfg, keep_alive = model_for(
        request, {"model": named.name, "keep_alive": body.get("keep_alive")}, ("image",), REFUSAL
    )
    canonical = dialect.from_infer(body, cfg)
    async with LeasedCall(services(request).manager, cfg.name, keep_alive, client=request) as call:
        result = cast(ImageResult, await call.post_json("/v1/images", canonical))
    return JSONResponse(dialect.response(rid, cfg, canonical, result))


async def info(request: Request) -> Response:
    return JSONResponse(
        {
            "name": "llm-proxy",
            "version": proxy.__version__,
            "links": {
                "infer": "/v1/infer",
                "health": "/v1/health",
                "models": "/v1/models",
                "jobs": "/v2/{model}/run",
                "status": "/status",
            },
        }
    )


async def health(request: Request) -> Response:
    """No key needed, no model names: ok, and how many models are configured and loaded."""
    statuses = list(services(request).manager.status())
    loaded = sum(1 for s in statuses if s.state == "ready")
    return JSONResponse({"status": "ok", "version": proxy.__version__, "models": len(statuses), "loaded": loaded})


@guarded(Role.ADMIN)
async def rescan(request: Request) -> Response:
    every_model(request)
    names = await discovery_of(request).rescan(services(request).manager)
    return JSONResponse({"discovered": names, "models": [c.name for c in services(request).manager.configs]})


routes = [
    Route("/infer", infer, methods=["POST"]),
    Route("/v1/infer", infer, methods=["POST"]),
    Route("/v1", info, methods=["GET"]),
    Route("/v1/health", health, methods=["GET"]),
    Route("/models/rescan", rescan, methods=["POST"]),
]
