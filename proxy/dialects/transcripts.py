"""OpenAI's transcription request checked, and a worker's canonical transcript (text, language,
duration, segments) in OpenAI's response formats."""

from __future__ import annotations

from typing import Any

from proxy.errors import BadRequest

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


_GRANULARITIES = {"segment", "word"}


def check_request(fields: dict[str, str], granularities: list[str], file_size: int | None) -> str:
    """Check a transcription request's form fields (the audio's size, its text fields, its
    ``timestamp_granularities[]``); returns the response format."""
    if not file_size:
        raise BadRequest("'file' is empty", param="file")
    fmt = fields.get("response_format") or "json"
    if fmt not in FORMATS:
        raise BadRequest(f"'response_format' must be one of {', '.join(FORMATS)}, got {fmt!r}", param="response_format")
    if "temperature" in fields:
        try:
            temperature = float(fields["temperature"])
        except ValueError:
            raise BadRequest("'temperature' must be a number", param="temperature") from None
        if not 0.0 <= temperature <= 1.0:
            raise BadRequest("'temperature' must be between 0 and 1", param="temperature")
    unknown = [g for g in granularities if g not in _GRANULARITIES]
    if unknown:
        raise BadRequest(
            f"'timestamp_granularities[]' must be segment or word, got {unknown[0]!r}", param="timestamp_granularities"
        )
    return fmt


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: list[dict[str, Any]]) -> str:
    blocks = [
        f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text'].strip()}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(blocks)


def vtt(segments: list[dict[str, Any]]) -> str:
    cues = [f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{s['text'].strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def render(transcript: dict[str, Any], fmt: str, task: str) -> str | dict[str, Any]:
    """The body OpenAI sends for ``response_format`` ``fmt`` (a string or a JSON object)."""
    segments = transcript.get("segments") or []
    if fmt == "text":
        text: str = transcript["text"]
        return text + "\n"
    if fmt == "srt":
        return srt(segments)
    if fmt == "vtt":
        return vtt(segments)
    if fmt == "verbose_json":
        out: dict[str, Any] = {
            "task": task,
            "language": transcript.get("language"),
            "duration": transcript.get("duration"),
            "text": transcript["text"],
            "segments": segments,
        }
        if "words" in transcript:
            out["words"] = transcript["words"]
        return out
    return {"text": transcript["text"]}
