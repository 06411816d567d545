"""RunPod's serverless endpoint API over the proxy's models: ``/v2/{model}/run``, ``/runsync``,
``/status/{id}``, ``/cancel/{id}``, ``/health`` (the queue itself: ``proxy.jobs``).

A job's ``input`` is the body the model's usual route takes, and its ``output`` what that route answers:
chat (``messages``) or completion (``prompt``) for an LLM, ``/v1/embeddings`` for an embedding model,
``/txt2img`` (``/img2img`` with an ``init_image``) for an image model, ``/v1/audio/speech`` for a voice
(the audio in base64), and base64 ``audio`` plus the form fields of ``/v1/audio/transcriptions`` for
Whisper. The job runs that route in-process (``run_route``): the same validation, lease, queue and
lifecycle as a request from a client, with the owner's role. At submit the route runs once more up to the
lease it would take (``validate``: a dry run whose manager stops it there), so a request the route refuses
is refused at submit, in its own status, and never stored.

Admin keys see every key's jobs: ``GET /v2/jobs`` lists them (``?owner=`` the sha256 of a key), and
status, cancel, retry and purge-queue reach any key's; a user key sees only its own (404 for others').
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import uuid
from typing import Any, NoReturn, cast

import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from proxy.api.common import INTERNAL_PRINCIPAL, Services, caller, guarded, kept, read_json, role_of, routed, services
from proxy.api.forwarding import route_to_node
from proxy.api.media import fetcher, inline_images
from proxy.auth import Principal, Role, key_from_headers
from proxy.config import ModelConfig
from proxy.dialects import service
from proxy.errors import BadRequest, Forbidden, ModelNotFound
from proxy.jobs import FINAL, Job, Jobs, Outcome, Status, node_of, owner_of_key
from proxy.manager import ModelManager

RUNSYNC_WAIT_MS = 90_000  # RunPod's default ?wait, and its bounds
RUNSYNC_WAIT_RANGE = (1_000, 300_000)


def jobs_of(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


def owner_of(request: Request) -> str:
    """Who owns the jobs a request makes or sees: a hash of its key (a forward's: as its entry node found
    it); everyone alike in open mode."""
    if services(request).keys.open:
        return ""
    carried = getattr(request.state, "owner", None)
    if isinstance(carried, str):
        return carried
    return owner_of_key(key_from_headers(request.headers) or "")


async def follow_job(request: Request) -> Request:
    """With a cluster, a request about a job another node stores (its id names the node: proxy.jobs.node_of)
    is forwarded there, whole (``forwarding.Routing``); else the request, to serve here."""
    net = services(request).cluster
    node = node_of(request.path_params["job_id"])
    if net is None or node is None or node == net.node:
        return request
    request = await kept(request, services(request).settings.max_json_bytes)
    route_to_node(net, request.scope, node, f"job '{request.path_params['job_id']}'")
    return request


async def model_here(request: Request) -> ModelConfig:
    """The model the path names, served here; with a cluster, a model only other nodes serve routes the
    request there (``forwarding.Routing``), its body as the client sent it."""
    name = request.path_params["model"]
    view = caller(request)
    if services(request).cluster is None:
        return view.resolve(name)
    try:
        return view.resolve(name)
    except ModelNotFound:
        request = await kept(request, services(request).settings.max_json_bytes)
        return routed(request, name)


def viewer_of(request: Request) -> str | None:
    """Whose jobs a request may see and act on: its own (``owner_of``); None (every key's) for an admin."""
    return None if role_of(request) >= Role.ADMIN else owner_of(request)


# -- running a job: the model's usual route, in-process --------------------------------------------
def _multipart(fields: dict[str, Any], audio: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="audio"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + audio
        + b"\r\n"
    ]
    for key, value in fields.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            text = v if isinstance(v, str) else json.dumps(v)
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{text}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def route_for(cfg: ModelConfig, job_input: dict[str, Any]) -> tuple[str, bytes, str]:
    """The route a job for this model takes, and its body (BadRequest: the input cannot make one)."""
    named = {**job_input, "model": cfg.name}
    if cfg.kind == "llm":
        if "messages" in job_input:
            return "/v1/chat/completions", json.dumps({**named, "stream": False}).encode(), "application/json"
        if "prompt" in job_input:
            return "/v1/completions", json.dumps({**named, "stream": False}).encode(), "application/json"
        if "input" in job_input:  # an LLM that embeds (llama.cpp serves both), as OpenAI's embeddings body
            return "/v1/embeddings", json.dumps(named).encode(), "application/json"
        raise BadRequest(
            "an LLM job's input needs 'messages' (a chat), 'prompt' (a completion) or 'input' (embeddings)",
            param="input",
        )
    if cfg.kind == "embedding":
        return "/v1/embeddings", json.dumps(named).encode(), "application/json"
    if cfg.kind == "image":
        path = "/img2img" if "init_image" in job_input else "/txt2img"
        return path, json.dumps(named).encode(), "application/json"
    if cfg.kind == "speech":
        return "/v1/audio/speech", json.dumps(named).encode(), "application/json"
    audio = job_input.get("audio")
    if not isinstance(audio, str):
        raise BadRequest("a transcription job's input needs 'audio': the file in base64", param="input.audio")
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("'input.audio' is not valid base64", param="input.audio") from None
    fields = {k: v for k, v in named.items() if k != "audio"}
    body, content_type = _multipart(fields, raw)
    return "/v1/audio/transcriptions", body, content_type


def _scope(path: str, content_type: str, principal: Principal) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", content_type.encode())],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        INTERNAL_PRINCIPAL: principal,
    }


async def run_route(
    app: ASGIApp, path: str, body: bytes, content_type: str, principal: Principal, cancelled: asyncio.Event
) -> tuple[int, str, bytes]:
    """POST ``body`` to one of the app's own routes, as ``principal`` would; ``cancelled``
    acts as that client going away. (status, content type, body)."""
    scope = _scope(path, content_type, principal)
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await cancelled.wait()
        return {"type": "http.disconnect"}

    status = 500
    media = ""
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal status, media
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            media = headers.get("content-type", "")
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, media, b"".join(chunks)


class _Validated(Exception):
    """A dry run reached the lease: the route found nothing to refuse."""


class _DryRunManager:
    """The manager as a dry run's route sees it: everything as it is, but taking a lease stops the run."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    async def acquire(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise _Validated


async def validate(app: Starlette, path: str, body: bytes, content_type: str, principal: Principal) -> None:
    """Run the route as ``run_route`` would, up to the lease it would take, and raise what it refuses with
    (its own ProxyError: 400, 404, 413, ...): every check the proxy makes before a worker is involved. The
    route runs on the app's router, without the middleware (no request events) and without the exception
    handlers (its errors come out as exceptions), with a copy of the app's state whose manager stops at
    ``acquire``."""
    svc = services_of(app)
    dry = dataclasses.replace(svc, manager=cast(ModelManager, _DryRunManager(svc.manager)))
    shim = _DryRunApp(State({**app.state._state, "services": dry}))
    scope = _scope(path, content_type, principal)
    scope["app"] = shim
    sent = False
    status = 200
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app.router(scope, receive, send)
    except _Validated:
        return
    if status >= 400:  # answered without raising (no route for it: cannot happen for route_for's paths)
        raise BadRequest(f"the job's request is refused by {path}: {status} {_error_message(b''.join(chunks))}")


@dataclasses.dataclass(frozen=True)
class _DryRunApp:
    """What a route reads of ``request.app`` in a dry run: its state."""

    state: State


def services_of(app: Starlette) -> Services:
    svc: Services = app.state.services
    return svc


def _error_message(data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        return data.decode(errors="replace")[:1000]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error if error is not None else body)


def outcome_of(status: int, media: str, data: bytes) -> Outcome:
    """A route's answer as a job's outcome: JSON as it is, audio and other bytes in base64."""
    if status >= 400:
        return Outcome(Status.FAILED, error=f"{status}: {_error_message(data)}")
    if media.startswith("application/json"):
        return Outcome(Status.COMPLETED, output=json.loads(data))
    if media.startswith("text/"):
        return Outcome(Status.COMPLETED, output={"text": data.decode(errors="replace")})
    return Outcome(Status.COMPLETED, output={"content_type": media, "base64": base64.b64encode(data).decode()})


def executor(app: ASGIApp, resolve: Any) -> Any:
    """The ``Execute`` that ``proxy.jobs.Jobs`` runs each job with."""

    async def execute(job: Job, job_input: dict[str, Any], cancelled: asyncio.Event) -> Outcome:
        kind = job_input.get(service.SERVICE_KEY)  # a job of /api/v1/run: its route's input, its output's shape
        if kind is not None:
            job_input = job_input.get("request") or {}
        try:
            cfg: ModelConfig = resolve(job.model)
            path, body, content_type = route_for(cfg, job_input)
        except Exception as exc:  # noqa: BLE001 - the model is gone, or the input cannot make a request
            message = getattr(exc, "message", str(exc))
            return Outcome(Status.FAILED, error=message)
        outcome = outcome_of(
            *await run_route(
                app, path, body, content_type, Principal(Role(job.role), frozenset({job.model})), cancelled
            )
        )
        if kind is None or outcome.status is not Status.COMPLETED:
            return outcome
        try:
            return Outcome(Status.COMPLETED, output=service.shape_output(kind, outcome.output))
        except ValueError as exc:
            return Outcome(Status.FAILED, error=str(exc))

    return execute


# -- the routes ------------------------------------------------------------------------------------
async def _input(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    job_input = body.get("input")
    if not isinstance(job_input, dict):
        raise BadRequest('the body must be {"input": {...}}: the request the model\'s usual route takes', param="input")
    if service.SERVICE_KEY in job_input:
        raise BadRequest(f"'input.{service.SERVICE_KEY}' is reserved (POST /api/v1/run makes it)", param="input")
    return job_input


async def _submit(request: Request) -> Job:
    request = await kept(request, services(request).settings.max_json_bytes)  # with a cluster: as sent
    # a scoped key's other models are 404; with a cluster, the job goes whole to where routing sends the
    # model's requests (stored and run there: its id names that node)
    cfg = routed(request, request.path_params["model"])
    job_input = await _input(request)
    if isinstance(job_input.get("messages"), list):  # image URLs fetched once, now: stored as data URLs
        await inline_images(job_input, cfg, fetcher(request))
    return await submit(request, cfg, job_input)


async def submit(request: Request, cfg: ModelConfig, job_input: dict[str, Any], kind: str | None = None) -> Job:
    """Store a job for ``cfg`` whose route takes ``job_input`` (``kind``: a job of /api/v1/run, whose output
    ``executor`` shapes), once the route's dry run finds nothing to refuse."""
    path, body, content_type = route_for(cfg, job_input)
    stored = job_input if kind is None else {service.SERVICE_KEY: kind, "request": job_input}
    text = await anyio.to_thread.run_sync(json.dumps, stored)  # what is stored: the proxy keeps no copy
    del job_input, stored  # before the dry run parses the route's body: one parsed copy at a time
    jobs, owner = jobs_of(request), owner_of(request)
    jobs.check_room(owner, len(text))
    # refuse now what the route would refuse (400, 403, 404, 413, ...), rather than store a job that fails later
    principal = Principal(role_of(request), frozenset({cfg.name}))
    await validate(request.app, path, body, content_type, principal)
    del body
    return await jobs.submit(cfg.name, owner, int(role_of(request)), text)


@guarded(Role.USER)
async def run(request: Request) -> Response:
    job = await _submit(request)
    return JSONResponse({"id": job.id, "status": job.status.value})


def wait_seconds(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None:
        return RUNSYNC_WAIT_MS / 1000
    if not raw.isdigit():
        raise BadRequest("'wait' must be a number of milliseconds", param="wait")
    lo, hi = RUNSYNC_WAIT_RANGE
    return min(max(int(raw), lo), hi) / 1000


@guarded(Role.USER)
async def runsync(request: Request) -> Response:
    """Submit and wait up to ``?wait`` ms; an unfinished job answers with its id and status (the job goes on,
    as it does when the client goes away)."""
    wait = wait_seconds(request)
    job = await _submit(request)
    jobs = jobs_of(request)
    await jobs.wait(job.id, wait)
    job = await jobs.get(job.id, job.owner)
    view = job.view() if job.status in FINAL else {"id": job.id, "status": job.status.value}
    return JSONResponse(view)


async def _model_name(request: Request) -> str:
    return (await model_here(request)).name


@guarded(Role.USER)
async def status(request: Request) -> Response:
    request = await follow_job(request)
    job = await jobs_of(request).get(request.path_params["job_id"], viewer_of(request), await _model_name(request))
    return JSONResponse(job.view())


@guarded(Role.USER)
async def cancel(request: Request) -> Response:
    request = await follow_job(request)
    jobs = jobs_of(request)
    job = await jobs.cancel(request.path_params["job_id"], viewer_of(request), await _model_name(request))
    return JSONResponse({"id": job.id, "status": job.status.value})


@guarded(Role.USER)
async def retry(request: Request) -> Response:
    """RunPod's /retry: a FAILED job back in the queue, same id and input (409 for a job in another state)."""
    request = await follow_job(request)
    jobs = jobs_of(request)
    job = await jobs.retry(request.path_params["job_id"], viewer_of(request), await _model_name(request))
    return JSONResponse({"id": job.id, "status": job.status.value})


@guarded(Role.USER)
async def purge_queue(request: Request) -> Response:
    """RunPod's /purge-queue: the caller's jobs waiting for this model are cancelled; running ones go on. An
    admin's purges every key's (``?owner=``: one key's)."""
    removed = await jobs_of(request).purge_queue(_owner_param(request), await _model_name(request))
    return JSONResponse({"removed": removed, "status": "completed"})


@guarded(Role.USER)
async def health(request: Request) -> Response:
    """RunPod's endpoint health: job counts, and the model's worker as idle or running."""
    name = await _model_name(request)
    jobs = jobs_of(request)
    waiting, running = jobs.counts(name)
    done = await jobs.finished_counts(name)
    state = next((s for s in caller(request).status() if s.name == name), None)
    loaded = state is not None and state.state == "ready"
    busy = loaded and state is not None and state.in_flight > 0
    return JSONResponse(
        {
            "jobs": {
                "completed": done.get(Status.COMPLETED, 0),
                "failed": done.get(Status.FAILED, 0),
                "cancelled": done.get(Status.CANCELLED, 0),
                "inProgress": running,
                "inQueue": waiting,
                "retried": done.get("retried", 0),
            },
            "workers": {"idle": int(loaded and not busy), "running": int(busy)},
        }
    )


def _owner_param(request: Request) -> str | None:
    """The owner a request names with ``?owner=`` (an admin's only: a user key's own jobs are all it sees)."""
    owner = request.query_params.get("owner")
    viewer = viewer_of(request)
    if viewer is None:
        return owner or None
    if owner is not None and owner != viewer:
        raise Forbidden("another key's jobs need an admin key", param="owner")
    return viewer


LIST_LIMIT = (100, 1000)  # GET /v2/jobs: the default and the most jobs one listing answers


@guarded(Role.USER)
async def listing(request: Request) -> Response:
    """The caller's jobs (an admin's: every key's, or ``?owner=``'s), newest first, those not expired:
    ``?model=``, ``?status=`` and ``?limit=`` narrow it."""
    owner = _owner_param(request)
    model = request.query_params.get("model")
    name = caller(request).resolve(model).name if model is not None else None
    raw_status = request.query_params.get("status")
    try:
        wanted = Status(raw_status) if raw_status is not None else None
    except ValueError:
        known = ", ".join(s.value for s in Status)
        raise BadRequest(f"'status' must be one of {known}", param="status") from None
    raw_limit = request.query_params.get("limit", str(LIST_LIMIT[0]))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIST_LIMIT[1]:
        raise BadRequest(f"'limit' must be a number from 1 to {LIST_LIMIT[1]}", param="limit")
    principal: Principal = request.state.principal
    admin = role_of(request) >= Role.ADMIN
    found = await jobs_of(request).listing(owner, name, wanted, int(raw_limit))
    shown = [
        {**job.view(), "model": job.model, "created": job.created, **({"owner": job.owner} if admin else {})}
        for job in found
        if principal.allows((job.model,))  # a scoped key sees nothing of the models outside its scope
    ]
    return JSONResponse({"jobs": shown})


routes = [
    Route("/v2/jobs", listing, methods=["GET"]),
    Route("/v2/{model:path}/run", run, methods=["POST"]),
    Route("/v2/{model:path}/runsync", runsync, methods=["POST"]),
    Route("/v2/{model:path}/status/{job_id}", status, methods=["GET", "POST"]),
    Route("/v2/{model:path}/cancel/{job_id}", cancel, methods=["POST"]),
    Route("/v2/{model:path}/retry/{job_id}", retry, methods=["POST"]),
    Route("/v2/{model:path}/purge-queue", purge_queue, methods=["POST"]),
    Route("/v2/{model:path}/health", health, methods=["GET"]),
]
