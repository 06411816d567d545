"""Text to speech: OpenAI's /v1/audio/speech, /api/tts, and the lists Open WebUI asks for
(/v1/audio/models, /v1/audio/voices).

Requests are validated and shaped into the canonical speech request by ``proxy.dialects.speech``;
the worker's audio is relayed chunk by chunk, bound to the lease.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import voices
from proxy.api.common import caller, guarded, json_bytes, model_for, public_listing, read_json, services
from proxy.auth import Role
from proxy.config import ModelConfig, Settings
from proxy.dialects.shaping import optional
from proxy.dialects.speech import check, sized_wav
from proxy.errors import ProxyError
from proxy.relay import LeasedCall
from proxy.upstream import UpstreamStream
from proxy.wire import AUDIO_MEDIA_TYPES, SpeechRequest


async def _relay(stream: UpstreamStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream.raw():
            yield chunk
    except ProxyError:
        return  # audio has no error frame: the stream ends short, and the log says why


async def _speak(
    request: Request, cfg: ModelConfig, keep_alive: float | None, body: SpeechRequest, stream: bool
) -> Response:
    media_type = AUDIO_MEDIA_TYPES[body["response_format"]]
    async with LeasedCall(services(request).manager, cfg.name, keep_alive, client=request) as call:
        if stream:
            return await call.stream("/v1/audio/speech", json_bytes(body), _relay, media_type)
        upstream = await call.open("/v1/audio/speech", json_bytes(body))
        audio = b"".join([chunk async for chunk in upstream.raw()])
    return Response(sized_wav(audio) if body["response_format"] == "wav" else audio, media_type=media_type)


@guarded(Role.USER)
async def openai_speech(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = model_for(request, body, ("speech",), "does not speak (it is not a text-to-speech model)")
    canonical = check(body, cfg, "input", "response_format", "mp3")
    # Every format streams but wav: a WAV file's header must hold its length, so it comes whole
    # (pcm is the streaming choice for raw samples, as OpenAI's docs advise).
    return await _speak(request, cfg, keep_alive, canonical, stream=canonical["response_format"] != "wav")


@guarded(Role.USER)
async def tts(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = model_for(request, body, ("speech",), "does not speak (it is not a text-to-speech model)")
    canonical = check(body, cfg, "text", "format", "wav")
    stream = optional(body, "stream", bool, "a boolean") or False
    return await _speak(request, cfg, keep_alive, canonical, stream=stream)


def _speech_models(request: Request) -> list[ModelConfig]:
    return [c for c in caller(request).configs if "speech" in c.capabilities]


def _public(settings: Settings) -> bool:
    return settings.public_audio_listings


@public_listing(_public)
async def audio_models(request: Request) -> Response:
    return JSONResponse({"models": [{"id": c.name, "name": c.name} for c in _speech_models(request)]})


@public_listing(_public)
async def audio_voices(request: Request) -> Response:
    wanted = request.query_params.get("model")
    models = _speech_models(request)
    if wanted:
        models = [caller(request).resolve(wanted)]
    names: dict[str, None] = {}
    for cfg in models:
        names.update(dict.fromkeys(voices.listed(cfg)))
    return JSONResponse({"voices": [{"id": n, "name": n} for n in names]})


routes = [
    Route("/v1/audio/speech", openai_speech, methods=["POST"]),
    Route("/api/tts", tts, methods=["POST"]),
    Route("/v1/audio/models", audio_models, methods=["GET"]),
    Route("/v1/audio/voices", audio_voices, methods=["GET"]),
]
