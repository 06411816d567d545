"""Ollama's model management: /api/pull, /api/delete, /api/copy, /api/create, /api/push, /api/blobs.

Models are installed here by adding their files and configs, not pulled from a registry. So a pull of a
model that is here succeeds at once, in Ollama's own sequence of progress lines (its digest is the
weight file's real sha256, ``proxy.digests``), and Open WebUI's and Ollama clients' pull buttons work; a
pull of anything else, and the calls that would change what is installed, answer in Ollama's error shape
with the reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.api.common import guarded, json_bytes, read_json, services
from proxy.auth import Role
from proxy.dialects.shaping import optional
from proxy.errors import BadRequest, Forbidden, ModelNotFound, NotFound, ProxyError

NDJSON = "application/x-ndjson"


def _installed_here(request: Request) -> str:
    return f"models are installed by adding their files and a config in {services(request).settings.configs_dir.name}/"


def _named(body: dict[str, Any], *fields: str) -> str:
    for key in fields:
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    raise BadRequest(f"'{fields[0]}' is required", param=fields[0])


def _progress(digest: str, size: int) -> list[dict[str, Any]]:
    return [
        {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": size},
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]


@guarded(Role.USER)
async def pull(request: Request) -> Response:
    body = await read_json(request)
    name = _named(body, "model", "name")
    stream = optional(body, "stream", bool, "a boolean")
    try:
        cfg = services(request).manager.resolve(name)
    except ModelNotFound:
        raise NotFound(
            f"model '{name}' is not installed here and cannot be pulled: {_installed_here(request)}"
        ) from None
    digests = services(request).digests
    if stream is False:
        await digests.of_model(cfg)  # the same work as a streamed pull: the digest is checked
        return JSONResponse({"status": "success"})

    async def lines() -> AsyncIterator[bytes]:
        yield json_bytes({"status": "pulling manifest"}) + b"\n"
        try:
            digest, size = await digests.of_model(cfg)
        except (OSError, ProxyError) as exc:
            yield json_bytes({"error": f"cannot read {cfg.name}'s weights: {exc}"}) + b"\n"
            return
        for line in _progress(digest, size):
            yield json_bytes(line) + b"\n"

    return StreamingResponse(lines(), media_type=NDJSON)


@guarded(Role.USER)
async def delete(request: Request) -> Response:
    body = await read_json(request)
    cfg = services(request).manager.resolve(_named(body, "model", "name"))
    raise Forbidden(
        f"model '{cfg.name}' is not deleted over the API: remove its config from "
        f"{services(request).settings.configs_dir.name}/ (and its files) to uninstall it"
    )


@guarded(Role.USER)
async def copy(request: Request) -> Response:
    body = await read_json(request)
    cfg = services(request).manager.resolve(_named(body, "source"))
    _named(body, "destination")
    raise Forbidden(f"models are not copied over the API: add the new name to aliases: in '{cfg.name}''s config")


@guarded(Role.USER)
async def create(request: Request) -> Response:
    raise Forbidden(f"models are not created over the API: {_installed_here(request)}")


@guarded(Role.USER)
async def push(request: Request) -> Response:
    raise Forbidden("this server does not push models to a registry")


@guarded(Role.USER)
async def blob(request: Request) -> Response:
    digest = request.path_params["digest"]
    if request.method == "HEAD":  # Ollama: 200 when the blob is there; this server keeps none
        raise NotFound(f"blob {digest} not found: this server keeps no blobs")
    raise Forbidden(f"blobs are not uploaded here: {_installed_here(request)}")


routes = [
    Route("/api/pull", pull, methods=["POST"]),
    Route("/api/delete", delete, methods=["DELETE"]),
    Route("/api/copy", copy, methods=["POST"]),
    Route("/api/create", create, methods=["POST"]),
    Route("/api/push", push, methods=["POST"]),
    Route("/api/blobs/{digest}", blob, methods=["HEAD", "POST"]),
]
