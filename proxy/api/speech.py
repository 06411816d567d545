"""Text to speech: OpenAI's /v1/audio/speech, /api/tts, and the lists Open WebUI asks for
(/v1/audio/models, /v1/audio/voices).

Requests are validated here (text, voice, format, speed) and shaped into the canonical speech
request; the worker's audio is relayed chunk by chunk, bound to the lease.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import voices
from proxy.api.common import guarded, json_bytes, model_for, read_json, services
from proxy.auth import Role
from proxy.config import ModelConfig
from proxy.dialects.shaping import optional
from proxy.errors import BadRequest, ProxyError
from proxy.relay import LeasedCall
from proxy.upstream import UpstreamStream
from proxy.wire import AUDIO_FORMATS, AUDIO_MEDIA_TYPES

MAX_CHARS = 4096
FORMATS = AUDIO_FORMATS
MEDIA_TYPES = AUDIO_MEDIA_TYPES


def _check(body: dict[str, Any], cfg: ModelConfig, text_key: str, format_key: str, default_format: str) -> dict:
    text = body.get(text_key)
    if not isinstance(text, str) or not text.strip():
        raise BadRequest(f"'{text_key}' must be a non-empty string", param=text_key)
    if len(text) > MAX_CHARS:
        raise BadRequest(f"'{text_key}' is {len(text)} characters; the limit is {MAX_CHARS}", param=text_key)
    fmt = optional(body, format_key, str, "a string") or default_format
    if fmt not in FORMATS:
        raise BadRequest(f"'{format_key}' must be one of {', '.join(FORMATS)}, got {fmt!r}", param=format_key)
    speed = optional(body, "speed", (int, float), "a number")
    if speed is not None and not 0.25 <= speed <= 4.0:
        raise BadRequest(f"'speed' must be between 0.25 and 4, got {speed}", param="speed")
    voice = optional(body, "voice", str, "a string")
    speaker_wav = optional(body, "speaker_wav", str, "a string (base64 audio or a voice file's name)")
    if speaker_wav and not cfg.backend_can("clone"):
        raise BadRequest(f"model '{cfg.name}' cannot clone voices (speaker_wav is for XTTS models)",
                         param="speaker_wav")
    if speaker_wav:
        _check_speaker_wav(cfg, speaker_wav)
    language = optional(body, "language", str, "a string")
    known = voices.languages(cfg)
    if language and known and language not in known:
        raise BadRequest(f"'language' must be one of {', '.join(known)}, got {language!r}", param="language")
    out: dict[str, Any] = {"model": cfg.name, "input": text, "voice": voices.resolve(cfg, voice),
                           "response_format": fmt, "speed": float(speed or 1.0)}
    if language:
        out["language"] = language
    if speaker_wav:
        out["speaker_wav"] = speaker_wav
    return out


def sized_wav(data: bytes) -> bytes:
    """A whole WAV with its real sizes in the header (the worker streams it open-ended)."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[36:40] != b"data":
        return data
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:40] + struct.pack("<I", len(data) - 44) + data[44:]


def _check_speaker_wav(cfg: ModelConfig, speaker_wav: str) -> None:
    """A voice file's name in the model's voices folder, or base64 audio (decoded by the worker)."""
    if speaker_wav in voices.voice_files(cfg):
        return
    try:
        audio = base64.b64decode(speaker_wav, validate=True)
    except (binascii.Error, ValueError):
        files = ", ".join(voices.voice_files(cfg)) or "none"
        raise BadRequest(f"'speaker_wav' is neither a voice file of this model ({files}) nor base64 audio",
                         param="speaker_wav") from None
    if len(audio) < 64:
        raise BadRequest("'speaker_wav' is too short to be audio", param="speaker_wav")


async def _relay(stream: UpstreamStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream.raw():
            yield chunk
    except ProxyError:
        return  # audio has no error frame: the stream ends short, and the log says why


async def _speak(request: Request, cfg: ModelConfig, keep_alive: float | None, body: dict[str, Any],
                 stream: bool) -> Response:
    media_type = MEDIA_TYPES[body["response_format"]]
    async with LeasedCall(services(request).manager, cfg.name, keep_alive) as call:
        if stream:
            return await call.stream("/v1/audio/speech", json_bytes(body), _relay, media_type)
        upstream = await call.open("/v1/audio/speech", json_bytes(body))
        audio = b"".join([chunk async for chunk in upstream.raw()])
    return Response(sized_wav(audio) if body["response_format"] == "wav" else audio, media_type=media_type)


@guarded(Role.USER)
async def openai_speech(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = model_for(request, body, ("speech",), "does not speak (it is not a text-to-speech model)")
    canonical = _check(body, cfg, "input", "response_format", "mp3")
    # Every format streams but wav: a WAV file's header must hold its length, so it comes whole
    # (pcm is the streaming choice for raw samples, as OpenAI's docs advise).
    return await _speak(request, cfg, keep_alive, canonical, stream=canonical["response_format"] != "wav")


@guarded(Role.USER)
async def tts(request: Request) -> Response:
    body = await read_json(request)
    cfg, keep_alive = model_for(request, body, ("speech",), "does not speak (it is not a text-to-speech model)")
    canonical = _check(body, cfg, "text", "format", "wav")
    stream = optional(body, "stream", bool, "a boolean") or False
    return await _speak(request, cfg, keep_alive, canonical, stream=stream)


def _speech_models(request: Request) -> list[ModelConfig]:
    return [c for c in services(request).manager.configs if "speech" in c.capabilities]


@guarded(Role.USER)
async def audio_models(request: Request) -> Response:
    return JSONResponse({"models": [{"id": c.name, "name": c.name} for c in _speech_models(request)]})


@guarded(Role.USER)
async def audio_voices(request: Request) -> Response:
    wanted = request.query_params.get("model")
    models = _speech_models(request)
    if wanted:
        models = [services(request).manager.resolve(wanted)]
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
