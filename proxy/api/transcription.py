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

from proxy.api.common import checked_keep_alive, guarded, kept, routed, services
from proxy.auth import Role
from proxy.dialects.transcripts import MEDIA_TYPES, check_request, render
from proxy.errors import BadRequest, PayloadTooLarge
from proxy.keepalive import keep_alive_of
from proxy.relay import LeasedCall


async def _form(request: Request) -> FormData:
    limited = await kept(request)  # with a cluster, the body as sent: forwarded whole if another node serves it
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("the request must be multipart/form-data with the audio in 'file'", param="file")
    try:
        return await limited.form(max_files=1, max_fields=50)
    except PayloadTooLarge:
        raise
    except Exception as exc:  # python-multipart's and starlette's parse errors
        raise BadRequest(f"the multipart body cannot be read: {exc}") from exc


def _upload(form: FormData) -> UploadFile:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise BadRequest("'file' is required: the audio to transcribe", param="file")
    return upload


def transcribe_route(task: str) -> Any:
    @guarded(Role.USER)
    async def handler(request: Request) -> Response:
        form = await _form(request)
        try:
            upload = _upload(form)
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            granularities = [str(g) for g in form.getlist("timestamp_granularities[]")]
            fmt = check_request(fields, granularities, upload.size)
            keep_alive = checked_keep_alive(request, keep_alive_of(fields))
            model = fields.get("model")
            if not model:
                raise BadRequest("'model' is required", param="model")
            manager = services(request).manager
            cfg = routed(request, model)  # with a cluster: Routing when another node serves it
            if "transcription" not in cfg.capabilities:
                raise BadRequest(f"model '{cfg.name}' does not transcribe audio", param="model")
            send = {k: v for k, v in fields.items() if k in ("language", "prompt", "temperature")}
            async with LeasedCall(manager, cfg.name, keep_alive, client=request) as call:
                transcript = await call.post_file(
                    f"/v1/audio/{'translations' if task == 'translate' else 'transcriptions'}",
                    send,
                    [("timestamp_granularities[]", g) for g in granularities],
                    ("file", upload.filename or "audio", upload.file, upload.content_type),
                )
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
