"""RunPod's serverless endpoint API over the proxy's models: ``/v2/{model}/run``, ``/runsync``,
``/status/{id}``, ``/cancel/{id}``, ``/health`` (the queue itself: ``proxy.jobs``).

A job's ``input`` is the body the model's usual route takes, and its ``output`` what that route answers:
chat (``messages``) or completion (``prompt``) for an LLM, ``/v1/embeddings`` for an embedding model,
``/txt2img`` (``/img2img`` with an ``init_image``) for an image model, ``/v1/audio/speech`` for a voice
(the audio in base64), and base64 ``audio`` plus the form fields of ``/v1/audio/transcriptions`` for
Whisper. The job runs that route in-process (``run_route``): the same validation, lease, queue and
lifecycle as a request from a client, with the owner's role.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from proxy.api.common import INTERNAL_PRINCIPAL, caller, guarded, limits, read_json, role_of, services
from proxy.auth import Principal, Role, key_from_headers
from proxy.config import ModelConfig
from proxy.dialects.gate import check_chat, check_embeddings
from proxy.errors import BadRequest
from proxy.jobs import FINAL, Job, Jobs, Outcome, Status

RUNSYNC_WAIT_MS = 90_000  # RunPod's default ?wait, and its bounds
RUNSYNC_WAIT_RANGE = (1_000, 300_000)


def jobs_of(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


def owner_of(request: Request) -> str:
    """Who owns the jobs a request makes or sees: a hash of its key; everyone alike in open mode."""
    if services(request).keys.open:
        return ""
    key = key_from_headers(request.headers) or ""
    return hashlib.sha256(key.encode()).hexdigest()


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


async def run_route(
    app: ASGIApp, path: str, body: bytes, content_type: str, principal: Principal, cancelled: asyncio.Event
) -> tuple[int, str, bytes]:
    """POST ``body`` to one of the app's own routes, as ``principal`` would; ``cancelled``
    acts as that client going away. (status, content type, body)."""
    scope: dict[str, Any] = {
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

    async def execute(job: Job, cancelled: asyncio.Event) -> Outcome:
        try:
            cfg: ModelConfig = resolve(job.model)
            path, body, content_type = route_for(cfg, job.input)
        except Exception as exc:  # noqa: BLE001 - the model is gone, or the input cannot make a request
            message = getattr(exc, "message", str(exc))
            return Outcome(Status.FAILED, error=message)
        return outcome_of(
            *await run_route(
                app, path, body, content_type, Principal(Role(job.role), frozenset({job.model})), cancelled
            )
        )

    return execute


# -- the routes ------------------------------------------------------------------------------------
async def _input(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    job_input = body.get("input")
    if not isinstance(job_input, dict):
        raise BadRequest('the body must be {"input": {...}}: the request the model\'s usual route takes', param="input")
    return job_input


def _gate(request: Request, cfg: ModelConfig, path: str, job_input: dict[str, Any]) -> None:
    """The checks of the gate the job's route passes (``proxy.dialects.gate``), at submit: a chat, a
    completion or embeddings the route would refuse is a 400 now, not a failed job later."""
    if path in ("/v1/chat/completions", "/v1/completions"):
        request_body = {**job_input, "model": cfg.name, "stream": False}  # as route_for sends it
        check_chat(request_body, cfg, limits(request), completion=path == "/v1/completions")
    elif path == "/v1/embeddings":
        check_embeddings(job_input.get("input"), limits(request))


async def _submit(request: Request) -> Job:
    cfg = caller(request).resolve(request.path_params["model"])  # a scoped key's other models are 404
    job_input = await _input(request)
    path, _, _ = route_for(cfg, job_input)  # refuse now what cannot make a request (400), not fail the job later
    _gate(request, cfg, path, job_input)
    return await jobs_of(request).submit(cfg.name, owner_of(request), int(role_of(request)), job_input)


@guarded(Role.USER)
async def run(request: Request) -> Response:
    job = await _submit(request)
    return JSONResponse({"id": job.id, "status": job.status.value})


def _wait_seconds(request: Request) -> float:
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
    wait = _wait_seconds(request)
    job = await _submit(request)
    jobs = jobs_of(request)
    await jobs.wait(job.id, wait)
    job = await jobs.get(job.id, job.owner)
    view = job.view() if job.status in FINAL else {"id": job.id, "status": job.status.value}
    return JSONResponse(view)


def _model_name(request: Request) -> str:
    return caller(request).resolve(request.path_params["model"]).name


@guarded(Role.USER)
async def status(request: Request) -> Response:
    job = await jobs_of(request).get(request.path_params["job_id"], owner_of(request), _model_name(request))
    return JSONResponse(job.view())


@guarded(Role.USER)
async def cancel(request: Request) -> Response:
    job = await jobs_of(request).cancel(request.path_params["job_id"], owner_of(request), _model_name(request))
    return JSONResponse({"id": job.id, "status": job.status.value})


@guarded(Role.USER)
async def retry(request: Request) -> Response:
    """RunPod's /retry: a FAILED job back in the queue, same id and input (409 for a job in another state)."""
    job = await jobs_of(request).retry(request.path_params["job_id"], owner_of(request), _model_name(request))
    return JSONResponse({"id": job.id, "status": job.status.value})


@guarded(Role.USER)
async def purge_queue(request: Request) -> Response:
    """RunPod's /purge-queue: the caller's jobs waiting for this model are cancelled; running ones go on."""
    removed = await jobs_of(request).purge_queue(owner_of(request), _model_name(request))
    return JSONResponse({"removed": removed, "status": "completed"})


@guarded(Role.USER)
async def health(request: Request) -> Response:
    """RunPod's endpoint health: job counts, and the model's worker as idle or running."""
    name = _model_name(request)
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


routes = [
    Route("/v2/{model:path}/run", run, methods=["POST"]),
    Route("/v2/{model:path}/runsync", runsync, methods=["POST"]),
    Route("/v2/{model:path}/status/{job_id}", status, methods=["GET", "POST"]),
    Route("/v2/{model:path}/cancel/{job_id}", cancel, methods=["POST"]),
    Route("/v2/{model:path}/retry/{job_id}", retry, methods=["POST"]),
    Route("/v2/{model:path}/purge-queue", purge_queue, methods=["POST"]),
    Route("/v2/{model:path}/health", health, methods=["GET"]),
]
