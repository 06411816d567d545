"""Operations: /health (no auth), /status, /load/{model}, /unload and /unload/{model} (``?force=true``:
kill at once, in-flight requests end with an error)."""

from __future__ import annotations

import logging
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.api.common import caller, guarded, read_json, services
from proxy.api.errors import for_users, is_admin
from proxy.auth import Role
from proxy.dialects.shaping import require_model
from proxy.keepalive import format_keep_alive, parse_keep_alive
from proxy.manager import ModelStatus

log = logging.getLogger("proxy.api.admin")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def _status(s: ModelStatus, worker: dict[str, Any] | None, admin: bool) -> dict[str, Any]:
    expires: float | str | None = s.expires_at
    if s.expires_at is not None and math.isinf(s.expires_at):
        expires = "never"
    return {
        "name": s.name,
        "aliases": list(s.config.aliases),
        "backend": s.backend,
        "state": s.state,
        "pid": s.pid,
        "memory_bytes": s.rss_bytes,
        "in_flight": s.in_flight,
        "keep_alive": format_keep_alive(s.keep_alive),
        "expires_at": expires,
        "loaded_at": s.loaded_at,
        "last_error": s.last_error if admin or s.last_error is None else for_users(s.last_error),
        "kind": s.config.kind,
        "need": {"ram": s.need.ram, "vram": s.need.vram, "source": s.need.source} if s.need else None,
        "device": s.device,
        "vram_bytes": s.vram_bytes,
        "waiting": s.waiting,  # why its requests wait, while some do
        "queued": s.queued,  # how many of its requests wait for it (the queue)
        "progress": s.progress,  # while it loads: 0..1, with the phase
        "phase": s.phase,
        "worker": worker,
    }


@guarded(Role.USER)
async def status(request: Request) -> Response:
    manager = services(request).manager
    manager.estimate_soon()
    reports = await manager.worker_reports()
    return JSONResponse(
        {
            "models": [_status(s, reports.get(s.name), is_admin(request)) for s in caller(request).status()],
            "queued": manager.queued,
            "max_loaded_models": services(request).settings.max_loaded_models,
            "memory": manager.memory_status(),
        }
    )


@guarded(Role.ADMIN)
async def load(request: Request) -> Response:
    manager = services(request).manager
    cfg = caller(request).resolve(request.path_params["model"])
    keep_alive = parse_keep_alive(request.query_params.get("keep_alive"))
    await manager.preload(cfg.name, keep_alive)
    return JSONResponse({"loaded": cfg.name})


@guarded(Role.ADMIN)
async def unload(request: Request) -> Response:
    manager = services(request).manager
    name = request.path_params.get("model")
    force = request.query_params.get("force", "false").lower() in ("true", "1", "yes")
    if name is None:
        return JSONResponse({"unloaded": await caller(request).unload_all(force=force)})
    cfg = caller(request).resolve(name)
    in_flight = next(s.in_flight for s in manager.status() if s.name == cfg.name)
    if force:
        log.info("model %s: forced unload requested; killing it with %d requests in flight", cfg.name, in_flight)
    else:
        log.info(
            "model %s: unload requested; waiting for %d requests in flight (at most unload_grace)", cfg.name, in_flight
        )
    done = await manager.unload(cfg.name, force=force)
    return JSONResponse({"unloaded": [cfg.name] if done else []})


@guarded(Role.ADMIN)
async def router_unload(request: Request) -> Response:
    """llama.cpp's router API (Open WebUI's eject button): ``{"model": id}`` -> ``{"success": true}``."""
    body = await read_json(request)
    manager = services(request).manager
    cfg = manager.resolve(require_model(body))
    log.info("model %s: unload requested (router API)", cfg.name)
    await manager.unload(cfg.name)
    return JSONResponse({"success": True})


routes = [
    Route("/health", health, methods=["GET", "HEAD"]),
    Route("/status", status, methods=["GET"]),
    Route("/load/{model:path}", load, methods=["POST"]),
    Route("/unload", unload, methods=["POST"]),
    Route("/unload/{model:path}", unload, methods=["POST"]),
    Route("/models/unload", router_unload, methods=["POST"]),
    Route("/v1/models/unload", router_unload, methods=["POST"]),
]
