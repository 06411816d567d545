"""``GET /openapi.json``: an OpenAPI 3.1 document of every route, built from types and one table.

Schemas come from the typed dicts in ``openapi_types`` through msgspec's JSON Schema generator; this
module holds the per-route table (``OPERATIONS``: method, path, summary, who may call it, request body,
answers) and puts the document together. ``tests/test_openapi.py`` compares the table with the app's
routes, so a route added without a line here fails the suite. Public: it names no model and no key.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import proxy
from proxy.api import openapi_types as t

Access = Literal["public", "user", "admin", "setting"]  # setting: a user key unless a setting opens it
JSON = "application/json"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
AUDIO = ("audio/wav", "audio/pcm", "audio/mpeg", "audio/opus", "audio/flac", "audio/aac")
TEXT = "text/plain"
HTML = "text/html"
REF = "#/components/schemas/{name}"


@dataclass(frozen=True)
class Op:
    """One operation: what the document says of one method on one path."""

    method: str
    path: str  # Starlette's form: "/v1/models/{model:path}"
    summary: str
    tag: str
    access: Access = "user"
    body: type | None = None
    body_media: str = JSON
    ok: type | None = None  # the 200 answer's JSON schema (None: any JSON object)
    answers: bool = True  # False: the route only explains, with an error, why it does nothing here
    ok_media: tuple[str, ...] = (JSON,)
    model: bool = False  # answered by a model's worker: 404 unknown model, 503 (Retry-After), 507
    query: tuple[tuple[str, str, str], ...] = ()  # (name, JSON type, description)
    extra: dict[int, str] = field(default_factory=dict)  # more statuses with their meaning


def _op(method: str, path: str, summary: str, tag: str, **kw: Any) -> Op:
    return Op(method, path, summary, tag, **kw)


_JOB_REFUSALS = {
    404: "no such model",
    413: "the job's input alone is over jobs.max_bytes_per_key",
    429: "the key has jobs.max_queued_per_key jobs or max_bytes_per_key bytes waiting or running (Retry-After)",
    503: "jobs.max_queued jobs are waiting or running (Retry-After)",
}
_KEEP = ("keep_alive", "string", "keep the model loaded this long after the load (a duration or seconds)")

OPERATIONS: tuple[Op, ...] = (
    # OpenAI
    _op("POST", "/v1/chat/completions", "Chat completion (SSE with stream: true)", "OpenAI",
        body=t.ChatCompletionRequest, ok=t.ChatCompletion, ok_media=(JSON, SSE), model=True),
    _op("POST", "/v1/completions", "Text completion (SSE with stream: true)", "OpenAI",
        body=t.CompletionRequest, ok_media=(JSON, SSE), model=True),
    _op("POST", "/v1/embeddings", "Embeddings", "OpenAI", body=t.EmbeddingRequest, model=True),
    _op("GET", "/v1/models", "The models (Anthropic's list with an anthropic-version header)", "OpenAI",
        ok=t.ModelList),
    _op("GET", "/v1/models/{model:path}", "One model", "OpenAI", ok=t.Model, extra={404: "no such model"}),
    _op("POST", "/v1/audio/speech", "Text to speech (audio, streamed)", "OpenAI", body=t.SpeechBody,
        ok_media=AUDIO, model=True),
    _op("GET", "/v1/audio/models", "The speech models (no key with server.public_audio_listings)", "OpenAI",
        access="setting"),
    _op("GET", "/v1/audio/voices", "The voices, of one model with ?model= (no key with server.public_audio_listings)",
        "OpenAI", access="setting",
        query=(("model", "string", "a speech model's name"),), extra={404: "no such model"}),
    _op("POST", "/v1/audio/transcriptions", "Speech to text", "OpenAI", body=t.TranscriptionForm,
        body_media="multipart/form-data", ok_media=(JSON, TEXT), model=True),
    _op("POST", "/v1/audio/translations", "Speech to English text", "OpenAI", body=t.TranscriptionForm,
        body_media="multipart/form-data", ok_media=(JSON, TEXT), model=True),
    _op("POST", "/v1/images/generations", "Images from a prompt", "OpenAI", body=t.ImageGenerationRequest,
        model=True),
    # Anthropic, Responses
    _op("POST", "/v1/messages", "Anthropic Messages (SSE with stream: true)", "Anthropic", body=t.MessagesRequest,
        ok_media=(JSON, SSE), model=True),
    _op("POST", "/v1/messages/count_tokens", "Anthropic token count", "Anthropic", body=t.CountTokensRequest,
        model=True),
    _op("POST", "/v1/responses", "OpenAI Responses (SSE with stream: true)", "OpenAI",
        body=t.ResponsesRequest, ok_media=(JSON, SSE), model=True),
    # Ollama
    _op("POST", "/api/chat", "Ollama chat (NDJSON unless stream: false)", "Ollama", body=t.OllamaChatRequest,
        ok_media=(NDJSON, JSON), model=True),
    _op("POST", "/api/generate", "Ollama generate (NDJSON unless stream: false)", "Ollama",
        body=t.OllamaGenerateRequest, ok_media=(NDJSON, JSON), model=True),
    _op("POST", "/api/embed", "Ollama embeddings", "Ollama", body=t.OllamaEmbedRequest, model=True),
    _op("POST", "/api/embeddings", "Ollama embeddings (older)", "Ollama", body=t.OllamaEmbeddingsRequest,
        model=True),
    _op("GET", "/api/tags", "Ollama's model list", "Ollama"),
    _op("GET", "/api/ps", "Ollama's loaded models", "Ollama"),
    _op("POST", "/api/show", "Ollama's model details", "Ollama", body=t.OllamaShowRequest,
        extra={404: "no such model"}),
    _op("GET", "/api/version", "Ollama's version answer", "Ollama", access="public"),
    _op("POST", "/api/pull", "Ollama pull: a model installed here succeeds at once (NDJSON unless stream: false)",
        "Ollama", body=t.OllamaPullRequest, ok_media=(NDJSON, JSON), extra={404: "not installed here"}),
    _op("DELETE", "/api/delete", "Ollama delete: refused (a model is removed with its config)", "Ollama",
        body=t.OllamaModelRef, answers=False, extra={403: "not over the API", 404: "no such model"}),
    _op("POST", "/api/copy", "Ollama copy: refused (a new name is an alias in the config)", "Ollama",
        body=t.OllamaCopyRequest, answers=False, extra={403: "not over the API", 404: "no such model"}),
    _op("POST", "/api/create", "Ollama create: refused (models are installed as files and a config)", "Ollama",
        answers=False, extra={403: "not over the API"}),
    _op("POST", "/api/push", "Ollama push: refused", "Ollama", answers=False, extra={403: "not over the API"}),
    _op("HEAD", "/api/blobs/{digest}", "Ollama blob check: no blobs are kept here", "Ollama", answers=False,
        extra={404: "no such blob"}),
    _op("POST", "/api/blobs/{digest}", "Ollama blob upload: refused", "Ollama", answers=False,
        extra={403: "not over the API"}),
    _op("GET", "/", "'Ollama is running'", "Ollama", access="public", ok_media=(TEXT,)),
    _op("POST", "/api/tts", "Text to speech (Ollama-style)", "Ollama", body=t.TtsRequest,
        ok_media=AUDIO, model=True),
    # images
    _op("POST", "/txt2img", "Inference API: images from a prompt", "Images", body=t.InferenceImageRequest,
        model=True),
    _op("POST", "/img2img", "Inference API: images from an image", "Images", body=t.InferenceImageRequest,
        model=True),
    _op("POST", "/sdapi/v1/txt2img", "AUTOMATIC1111: images from a prompt", "Images", body=t.A1111Request,
        model=True),
    _op("POST", "/sdapi/v1/img2img", "AUTOMATIC1111: images from an image", "Images", body=t.A1111Request,
        model=True),
    _op("GET", "/sdapi/v1/sd-models", "AUTOMATIC1111: the image models", "Images"),
    _op("GET", "/sdapi/v1/options", "AUTOMATIC1111: the options", "Images", ok=t.A1111Options),
    _op("POST", "/sdapi/v1/options", "AUTOMATIC1111: select a checkpoint", "Images", body=t.A1111Options,
        extra={404: "no such model"}),
    _op("POST", "/infer", "Seed 001's inference API", "Images", body=t.InferRequest, model=True),
    _op("POST", "/v1/infer", "Seed 001's inference API", "Images", body=t.InferRequest, model=True),
    _op("GET", "/v1", "The API's name, version and links", "Proxy", access="public"),
    _op("GET", "/v1/health", "Health with model counts", "Proxy", access="public"),
    # jobs (RunPod's shape)
    _op("GET", "/v2/jobs", "The caller's jobs (an admin's: every key's)", "Jobs", ok=t.JobList,
        query=(("owner", "string", "admin only: one key's jobs (the sha256 of the key, in hex)"),
               ("model", "string", "one model's jobs"), ("status", "string", "jobs in this status"),
               ("limit", "integer", "at most this many, newest first (1-1000, default 100)")),
        extra={403: "owner names another key's jobs (a user key)", 404: "no such model"}),
    _op("POST", "/v2/{model:path}/run", "Queue a job", "Jobs", body=t.JobRequest, ok=t.Job,
        extra=_JOB_REFUSALS),
    _op("POST", "/v2/{model:path}/runsync", "Run a job, waiting up to ?wait ms", "Jobs", body=t.JobRequest,
        ok=t.Job, query=(("wait", "integer", "milliseconds to wait"),), extra=_JOB_REFUSALS),
    _op("GET", "/v2/{model:path}/status/{job_id}", "A job's status and output", "Jobs", ok=t.Job,
        extra={404: "no such model or job"}),
    _op("POST", "/v2/{model:path}/status/{job_id}", "A job's status and output", "Jobs", ok=t.Job,
        extra={404: "no such model or job"}),
    _op("POST", "/v2/{model:path}/cancel/{job_id}", "Cancel a job", "Jobs", ok=t.Job,
        extra={404: "no such model or job"}),
    _op("POST", "/v2/{model:path}/retry/{job_id}", "Put a failed job back in the queue", "Jobs", ok=t.Job,
        extra={404: "no such model or job", 409: "the job did not fail"}),
    _op("POST", "/v2/{model:path}/purge-queue", "Cancel the caller's waiting jobs (an admin's: every key's)",
        "Jobs", ok=t.PurgedQueue, query=(("owner", "string", "admin only: one key's jobs"),),
        extra={404: "no such model"}),
    _op("GET", "/v2/{model:path}/health", "Job counts of a model", "Jobs", extra={404: "no such model"}),
    # the seed's service API, on the same jobs
    _op("POST", "/api/v1/run", "Queue a service job: describe an image, a product description, speech", "Jobs",
        body=t.ServiceRequest, ok=t.Job, extra={**_JOB_REFUSALS, 400: "bad input, wrong kind of model, a URL refused"}),
    _op("POST", "/api/v1/runsync", "Run a service job, waiting up to ?wait ms", "Jobs", body=t.ServiceRequest,
        ok=t.Job, query=(("wait", "integer", "milliseconds to wait"),),
        extra={**_JOB_REFUSALS, 400: "bad input, wrong kind of model, a URL refused"}),
    _op("GET", "/api/v1/status/{job_id}", "A job's status and output", "Jobs", ok=t.Job, extra={404: "no such job"}),
    # the proxy's own
    _op("GET", "/health", "Liveness", "Proxy", access="public", ok=t.Health),
    _op("GET", "/status", "Every model's state, memory and queue", "Proxy", ok=t.Status),
    _op("GET", "/cluster", "The cluster's nodes: alive, advertise URL, age, models, free memory", "Proxy",
        access="admin", extra={404: "this proxy is not in a cluster"}),
    _op("POST", "/load/{model:path}", "Load a model", "Proxy", access="admin", ok=t.Loaded, model=True,
        query=(_KEEP,)),
    _op("POST", "/unload", "Unload every model", "Proxy", access="admin", ok=t.Unloaded),
    _op("POST", "/unload/{model:path}", "Unload a model once its requests are done", "Proxy", access="admin",
        ok=t.Unloaded, extra={404: "no such model"}),
    _op("POST", "/models/unload", "llama.cpp's router API: unload a model", "Proxy", access="admin",
        body=t.RouterUnload, ok=t.RouterUnloaded),
    _op("POST", "/v1/models/unload", "llama.cpp's router API: unload a model", "Proxy", access="admin",
        body=t.RouterUnload, ok=t.RouterUnloaded),
    _op("POST", "/models/rescan", "Look for new weights in models/", "Proxy", access="admin"),
    _op("GET", "/metrics", "Prometheus metrics (no key with server.metrics_public)", "Proxy", access="setting",
        ok_media=(TEXT,)),
    _op("GET", "/status/events", "Live events (SSE)", "Proxy", access="admin", ok_media=(SSE,)),
    _op("GET", "/status/requests", "The last requests", "Proxy", access="admin"),
    _op("GET", "/logs/{model:path}", "A model's worker log (followed with ?follow=true)", "Proxy", access="admin",
        ok_media=(TEXT,), query=(("lines", "integer", "how many lines"), ("follow", "boolean", "keep streaming")),
        extra={404: "no such model"}),
    _op("GET", "/ui", "The operator's page (its data come from the key-guarded routes)", "Proxy", access="public",
        ok_media=(HTML,)),
    _op("GET", "/ui/static/{path}", "The page's script and style", "Proxy", access="public",
        ok_media=("text/css", "text/javascript"), extra={404: "no such file"}),
    _op("GET", "/openapi.json", "This document", "Proxy", access="public"),
)  # fmt: skip


def openapi_path(path: str) -> str:
    """Starlette's path syntax to OpenAPI's: ``{model:path}`` -> ``{model}``."""
    return re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", path)


def _error_schema(path: str) -> str:
    if path.startswith("/api/"):
        return "OllamaError"
    if path.startswith("/v1/messages"):
        return "AnthropicError"
    return "OpenAIError"


def _responses(op: Op) -> dict[str, Any]:
    ok_schema = {"$ref": REF.format(name=op.ok.__name__)} if op.ok else {"type": "object"}
    content = {m: {"schema": ok_schema if m == JSON else {"type": "string"}} for m in op.ok_media}
    out: dict[str, Any] = {"200": {"description": "OK", "content": content}} if op.answers else {}
    error = {JSON: {"schema": {"$ref": REF.format(name=_error_schema(op.path))}}}
    statuses: dict[int, str] = {}
    if op.body is not None:
        statuses |= {400: "invalid request, naming the field", 413: "body over the size limit"}
        statuses[415] = "not " + op.body_media
    if op.access != "public":
        statuses |= {401: "no key or a wrong key (when keys are configured)", 403: "the key's role is too low"}
    if op.model:
        statuses |= {
            404: "no such model",
            409: "the model cannot do this",
            503: "busy, loading failed, or the queue is full; Retry-After says when to try again",
            507: "the model does not fit in memory",
        }
    statuses |= op.extra
    for status, meaning in sorted(statuses.items()):
        answer: dict[str, Any] = {"description": meaning, "content": error}
        if status == 503:
            answer["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        out[str(status)] = answer
    return out


def _operation(op: Op) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "operationId": f"{op.method.lower()}_{re.sub(r'[^a-zA-Z0-9]+', '_', openapi_path(op.path)).strip('_')}",
    }
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in re.findall(r"\{(\w+)\}", openapi_path(op.path))
    ]
    params += [
        {"name": n, "in": "query", "required": False, "schema": {"type": k}, "description": d} for n, k, d in op.query
    ]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {op.body_media: {"schema": {"$ref": REF.format(name=op.body.__name__)}}},
        }
    out["responses"] = _responses(op)
    keys: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    out["security"] = {"public": [], "setting": [{}, *keys]}.get(op.access, keys)
    return out


@functools.cache
def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (built once)."""
    _, schemas = msgspec.json.schema_components(t.COMPONENTS, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(openapi_path(op.path), {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-lifecycle-proxy",
            "version": proxy.__version__,
            "description": (
                "OpenAI-, Ollama-, Anthropic- and AUTOMATIC1111-compatible routes in front of local models that "
                "load on their first request and unload when their keep_alive runs out. Every GET also answers "
                "HEAD. Keys go in 'Authorization: Bearer' or 'x-api-key'; with no keys configured "
                "the proxy is open. Errors come in the caller's dialect: Ollama's under /api/, Anthropic's under "
                "/v1/messages, OpenAI's elsewhere."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a key from api_tokens.yml, or a JWT signed with auth.jwt_secret (HS256)",
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


@functools.cache
def encoded() -> bytes:
    return msgspec.json.encode(document())


async def openapi_json(request: Request) -> Response:
    return Response(encoded(), media_type="application/json")


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
