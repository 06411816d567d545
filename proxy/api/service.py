"""The seed's service API: ``POST /api/v1/run`` and ``/api/v1/runsync`` with ``{"model", "input"}`` in one of
three shapes (``proxy.dialects.service``), and ``GET /api/v1/status/{id}``: RunPod's job objects (``id``,
``status``, ``output`` or ``error``) on the jobs engine that serves ``/v2/{model}/*`` (``proxy.api.jobs``:
one engine, one database; a job made here is seen by both).

At submit, the model is resolved in the caller's view, its kind checked against the shape (a vision model
to describe an image, a chat model for a product description, a speech model to speak; a voice sample only
for a model that clones voices), and only then are the URLs fetched (``proxy.fetch``): the image stored as
a data URL, the voice sample as base64. The job's route then runs its dry run (``jobs.submit``), so what
the route would refuse is a 400 now, in Ollama's error shape (these paths are under ``/api/``).
"""

from __future__ import annotations

import base64
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.api.common import guarded, read_json, routed
from proxy.api.jobs import follow_job, jobs_of, submit, viewer_of, wait_seconds
from proxy.api.media import fetcher
from proxy.auth import Principal, Role
from proxy.config import ModelConfig
from proxy.dialects import service
from proxy.dialects.media import data_url, scheme_of, typed_data_url
from proxy.errors import BadRequest, NotFound, UnsupportedInput
from proxy.jobs import FINAL, Job


def _needs(cfg: ModelConfig, kind: service.Kind) -> None:
    """The model can serve this shape (BadRequest naming what it needs)."""
    if kind == "speech":
        if cfg.kind != "speech":
            raise UnsupportedInput(f"model '{cfg.name}' is not a speech model; 'input.text' needs one", param="model")
        return
    if cfg.kind != "llm" or "completion" not in cfg.capabilities:
        what = "'input.image_url' needs a vision model" if kind == "describe" else "'input.image_description' needs one"
        raise UnsupportedInput(f"model '{cfg.name}' is not a chat model; {what}", param="model")
    if kind == "describe" and not cfg.vision:
        raise UnsupportedInput(
            f"model '{cfg.name}' cannot read images; describing an image needs a vision model", param="model"
        )


async def _image(request: Request, url: str) -> str:
    """The image as a data URL: fetched when it is an http(s) URL, checked when it is a data URL."""
    scheme = scheme_of(url)
    if scheme == "data":
        return typed_data_url(url, "input.image_url")
    if scheme not in ("http", "https"):
        raise BadRequest("'input.image_url' must be an http(s) URL or a data URL", param="input.image_url")
    got = await fetcher(request).fetch(url, "image", param="input.image_url")
    return data_url(got.media_type, got.data)


async def _route_input(request: Request, cfg: ModelConfig, kind: service.Kind, given: dict[str, Any]) -> dict[str, Any]:
    if kind == "describe":
        return service.describe_request(given, await _image(request, service.image_url(given)))
    if kind == "product":
        return service.product_request(given)
    sample = service.audio_prompt_url(given)
    if sample is None:
        return service.speech_request(given, None)
    if not cfg.backend_can("clone"):
        raise UnsupportedInput(
            f"model '{cfg.name}' cannot clone voices ('input.audio_prompt_url' is for XTTS models)",
            param="input.audio_prompt_url",
        )
    got = await fetcher(request).fetch(sample, "audio", param="input.audio_prompt_url")
    return service.speech_request(given, base64.b64encode(got.data).decode())


async def _submit(request: Request) -> Job:
    body = await read_json(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must name the model that serves the request", param="model")
    # a scoped key's other models are 404, whatever the input; with a cluster, the job goes whole to where
    # routing sends the model's requests (stored and run there: its id names that node)
    cfg = routed(request, model)
    given = body.get("input")
    if not isinstance(given, dict):
        shapes = service.SHAPES
        raise BadRequest(f"the body must be {{'model': ..., 'input': ...}}, 'input' one of {shapes}", param="input")
    kind = service.kind_of(given)
    _needs(cfg, kind)  # before any URL is fetched
    return await submit(request, cfg, await _route_input(request, cfg, kind, given), kind)


@guarded(Role.USER)
async def run(request: Request) -> Response:
    job = await _submit(request)
    return JSONResponse({"id": job.id, "status": job.status.value})


@guarded(Role.USER)
async def runsync(request: Request) -> Response:
    """Submit and wait up to ``?wait`` ms (RunPod's); an unfinished job answers with its id and status."""
    wait = wait_seconds(request)
    job = await _submit(request)
    jobs = jobs_of(request)
    await jobs.wait(job.id, wait)
    job = await jobs.get(job.id, job.owner)
    return JSONResponse(job.view() if job.status in FINAL else {"id": job.id, "status": job.status.value})


@guarded(Role.USER)
async def status(request: Request) -> Response:
    """A job's status and, once it ended, its output or error: the caller's own jobs (an admin's: any)."""
    request = await follow_job(request)  # a job another node stores: forwarded there
    job_id = request.path_params["job_id"]
    job = await jobs_of(request).get(job_id, viewer_of(request))
    principal: Principal = request.state.principal
    if not principal.allows((job.model,)):  # a scoped key sees nothing of the models outside its scope
        raise NotFound(f"job '{job_id}' not found", param="id")
    return JSONResponse({**job.view(), "model": job.model})


routes = [
    Route("/api/v1/run", run, methods=["POST"]),
    Route("/api/v1/runsync", runsync, methods=["POST"]),
    Route("/api/v1/status/{job_id}", status, methods=["GET"]),
]
