"""Speech to text: OpenAI's /v1/audio/transcriptions and /v1/audio/translations (multipart).

The upload is checked against the size limit while it is read (413 past it), spooled by the form
parser (to disk past 1 MiB), validated here, and streamed from there to the worker: it never sits
in memory twice. The worker answers one canonical JSON; ``proxy.dialects.transcripts`` renders it.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message

from proxy.api.common import guarded, services
from proxy.auth import Role
from proxy.dialects.transcripts import FORMATS, MEDIA_TYPES, render
from proxy.errors import BadRequest, PayloadTooLarge
from proxy.keepalive import parse_keep_alive

_GRANULARITIES = {"segment", "word"}


def _limited(request: Request, limit: int) -> Request:
    """The same request, whose body raises PayloadTooLarge once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {limit}")
    seen = 0
    receive = request.receive

    async def counting() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"the upload is over the limit of {limit} bytes")
        return message

    return Request(request.scope, counting)


async def _form(request: Request) -> FormData:
    limited = _limited(request, services(request).settings.max_body_bytes)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("the request must be multipart/form-data with the audio in 'file'", param="file")
    try:
        return await limited.form(max_files=1, max_fields=50)
    except PayloadTooLarge:
        raise
    except Exception as exc:  # python-multipart's and starlette's parse errors
        raise BadRequest(f"the multipart body cannot be read: {exc}") from exc


def _fields(form: FormData) -> tuple[UploadFile, dict[str, Any], str, list[str]]:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise BadRequest("'file' is required: the audio to transcribe", param="file")
    if not upload.size:
        raise BadRequest("'file' is empty", param="file")
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    fmt = fields.get("response_format") or "json"
    if fmt not in FORMATS:
        raise BadRequest(f"'response_format' must be one of {', '.join(FORMATS)}, got {fmt!r}",
                         param="response_format")
    if "temperature" in fields:
        try:
            temperature = float(fields["temperature"])
        except ValueError:
            raise BadRequest("'temperature' must be a number", param="temperature") from None
        if not 0.0 <= temperature <= 1.0:
            raise BadRequest("'temperature' must be between 0 and 1", param="temperature")
    granularities = form.getlist("timestamp_granularities[]")
    unknown = [g for g in granularities if g not in _GRANULARITIES]
    if unknown:
        raise BadRequest(f"'timestamp_granularities[]' must be segment or word, got {unknown[0]!r}",
                         param="timestamp_granularities")
    return upload, fields, fmt, [str(g) for g in granularities]


def transcribe_route(task: str) -> Any:
    @guarded(Role.USER)
    async def handler(request: Request) -> Response:
        form = await _form(request)
        try:
            upload, fields, fmt, granularities = _fields(form)
            keep_alive = parse_keep_alive(fields.pop("keep_alive", None))
            model = fields.get("model")
            if not model:
                raise BadRequest("'model' is required", param="model")
            manager = services(request).manager
            cfg = manager.resolve(model)
            if "transcription" not in cfg.capabilities:
                raise BadRequest(f"model '{cfg.name}' does not transcribe audio", param="model")
            send = {k: v for k, v in fields.items() if k in ("language", "prompt", "temperature")}
            lease = await manager.acquire(cfg.name, keep_alive)
            try:
                transcript = await lease.upstream.post_file(
                    f"/v1/audio/{'translations' if task == 'translate' else 'transcriptions'}",
                    send, [("timestamp_granularities[]", g) for g in granularities],
                    ("file", upload.filename or "audio", upload.file, upload.content_type),
                )
            finally:
                lease.release()
        finally:
            await form.close()
        rendered = render(transcript, fmt, task)
        if isinstance(rendered, dict):
            return JSONResponse(rendered)
        return Response(rendered, media_type=MEDIA_TYPES[fmt])

    return handler


routes = [
    Route("/v1/audio/transcriptions", transcribe_route("transcribe"), methods=["POST"]),
    Route("/v1/audio/translations", transcribe_route("translate"), methods=["POST"]),
]
