"""OpenAI's speech request and Ollama-style /api/tts, checked and shaped into the canonical speech
request (``proxy.wire.SpeechRequest``); and a streamed WAV made whole. Pure functions but for the
voice lists ``proxy.voices`` reads from the model's files."""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

from proxy import voices
from proxy.config import ModelConfig
from proxy.dialects.shaping import optional
from proxy.errors import BadRequest
from proxy.wire import AUDIO_FORMATS, AudioFormat, SpeechRequest

MAX_CHARS = 4096


def check(
    body: dict[str, Any], cfg: ModelConfig, text_key: str, format_key: str, default_format: AudioFormat
) -> SpeechRequest:
    """The canonical request from a speech body whose text is ``text_key`` and format ``format_key``."""
    text = body.get(text_key)
    if not isinstance(text, str) or not text.strip():
        raise BadRequest(f"'{text_key}' must be a non-empty string", param=text_key)
    if len(text) > MAX_CHARS:
        raise BadRequest(f"'{text_key}' is {len(text)} characters; the limit is {MAX_CHARS}", param=text_key)
    fmt = optional(body, format_key, str, "a string") or default_format
    if fmt not in AUDIO_FORMATS:
        raise BadRequest(f"'{format_key}' must be one of {', '.join(AUDIO_FORMATS)}, got {fmt!r}", param=format_key)
    speed = optional(body, "speed", (int, float), "a number")
    if speed is not None and not 0.25 <= speed <= 4.0:
        raise BadRequest(f"'speed' must be between 0.25 and 4, got {speed}", param="speed")
    voice = optional(body, "voice", str, "a string")
    speaker_wav = optional(body, "speaker_wav", str, "a string (base64 audio or a voice file's name)")
    if speaker_wav and not cfg.backend_can("clone"):
        raise BadRequest(
            f"model '{cfg.name}' cannot clone voices (speaker_wav is for XTTS models)", param="speaker_wav"
        )
    if speaker_wav:
        _check_speaker_wav(cfg, speaker_wav)
    language = optional(body, "language", str, "a string")
    known = voices.languages(cfg)
    if language and known and language not in known:
        raise BadRequest(f"'language' must be one of {', '.join(known)}, got {language!r}", param="language")
    out: SpeechRequest = {
        "model": cfg.name,
        "input": text,
        "voice": voices.resolve(cfg, voice),
        "response_format": fmt,
        "speed": float(speed or 1.0),
    }
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
        raise BadRequest(
            f"'speaker_wav' is neither a voice file of this model ({files}) nor base64 audio", param="speaker_wav"
        ) from None
    if len(audio) < 64:
        raise BadRequest("'speaker_wav' is too short to be audio", param="speaker_wav")
