"""The proxy–worker wire contract: what crosses the socket between the proxy and a worker.

Both sides import this module, and it imports nothing but the standard library: a worker may run
under another interpreter (``python:`` in a model's YAML) that has none of the proxy's dependencies.
It holds the typed payloads of the canonical internal API (ARCHITECTURE.md), the names both sides
must agree on (samplers, audio formats and their media types), the stream headers, the error body,
SSE framing, and how either side notices that its client has gone.

LLM requests and answers are OpenAI's own wire format and are not restated here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

if TYPE_CHECKING:
    import asyncio

# -- names both sides agree on -----------------------------------------------------------------

# sampler / scheduler names clients send (A1111's and short ones) -> diffusers scheduler class
SAMPLERS: Mapping[str, str] = {
    "euler": "EulerDiscreteScheduler",
    "euler a": "EulerAncestralDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm++ 2m": "DPMSolverMultistepScheduler",
    "dpm++_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}

AudioFormat = Literal["wav", "pcm", "mp3", "opus", "flac", "aac"]
AUDIO_MEDIA_TYPES: Mapping[str, str] = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "aac": "audio/aac",
}
AUDIO_FORMATS: tuple[str, ...] = tuple(AUDIO_MEDIA_TYPES)

# streamed answers are flushed as they are made, by us and by any reverse proxy in front
STREAM_HEADERS: Mapping[str, str] = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# -- what a worker says on stdout while it starts -------------------------------------------------
# one JSON object a line: {"event": "progress", "progress": 0.4, "phase": "loading weights"} as the load goes
# on (progress: the backend's own fraction of its weights loaded, 0..1), then {"event": "ready", ...}
PROGRESS_EVENT = "progress"


def progress_line(fraction: float, phase: str) -> str:
    return json.dumps({"event": PROGRESS_EVENT, "progress": round(min(1.0, max(0.0, fraction)), 3), "phase": phase})


async def output_lines(stream: asyncio.StreamReader | None) -> AsyncIterator[str]:
    """A worker's (or a spare's) stdout or stderr, a line at a time (decoded, trailing space off), to EOF."""
    if stream is None:
        return
    while line := await stream.readline():
        yield line.decode("utf-8", "replace").rstrip()


def read_progress(line: str) -> tuple[float, str] | None:
    """A progress line's fraction (0..1) and phase; None for any other line."""
    if not line.startswith('{"event": "progress"'):
        return None
    try:
        data = json.loads(line)
        fraction = float(data["progress"])
        phase = str(data["phase"])
    except (ValueError, KeyError, TypeError):
        return None
    return min(1.0, max(0.0, fraction)) if fraction == fraction else 0.0, phase[:80]


# -- payloads ------------------------------------------------------------------------------------


class Health(TypedDict):
    """``GET /health``: 200 when ready, 503 while loading; a backend adds its own keys (device, ...)."""

    status: Literal["loading", "ready"]
    progress: float
    detail: str
    in_flight: int


class ImageRequest(TypedDict):
    """``POST /v1/images``: one canonical request for every image dialect."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    n: int
    scheduler: str | None  # a SAMPLERS key, or None for the model's own
    init_image: NotRequired[str]  # base64 (img2img)
    strength: NotRequired[float]
    # img2img with no width/height asked: the init image's size, rounded down to the model's multiple of 8
    # (as diffusers does), scaled down to fit width x height's upper bound ``max_size`` where it is larger
    size_from_init: NotRequired[bool]
    max_size: NotRequired[int]


class Image(TypedDict):
    base64: str  # PNG
    seed: int
    width: int
    height: int


class ImageResult(TypedDict):
    images: list[Image]
    processing_time: float


class SpeechRequest(TypedDict):
    """``POST /v1/audio/speech``: OpenAI's request, shaped; answered with audio bytes, streamed."""

    model: str
    input: str
    voice: str
    response_format: AudioFormat
    speed: float
    language: NotRequired[str]
    speaker_wav: NotRequired[str]  # base64 audio, or a voice file's name (cloning backends)


class TranscriptionFields(TypedDict, total=False):
    """``POST /v1/audio/transcriptions`` (and ``/translations``): multipart, the audio in ``file``,
    these text fields, and ``timestamp_granularities[]`` repeated."""

    language: str
    prompt: str
    temperature: str


class Word(TypedDict):
    word: str
    start: float
    end: float


class Segment(TypedDict):
    """OpenAI's verbose_json segment."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: NotRequired[list[Word]]


class Transcript(TypedDict):
    """What a transcription worker answers; the proxy renders OpenAI's formats from it."""

    language: str
    duration: float
    text: str
    segments: list[Segment]
    words: NotRequired[list[Word]]


# ``POST /v1/tokenize``: how many of the model's tokens a chat (its messages rendered by the model's own
# template, with its tools) or a bare prompt takes. LLM workers that can tokenize serve it; others (external
# servers) answer 404, and the proxy then asks for one token and reads ``usage.prompt_tokens``.
TOKENIZE_PATH = "/v1/tokenize"


class TokenizeRequest(TypedDict, total=False):
    messages: list[dict[str, Any]]  # OpenAI chat messages (or ``prompt``)
    tools: list[dict[str, Any]]
    prompt: str


class TokenCount(TypedDict):
    count: int


# -- errors and SSE ------------------------------------------------------------------------------

SSE_DONE = b"data: [DONE]\n\n"


# A prompt longer than the model's context: the error's ``code``, and its counts under llama-server's keys
# (``n_prompt_tokens``, ``n_ctx``), so the proxy reads an external llama-server's answer the same way.
CONTEXT_EXCEEDED = "context_length_exceeded"


def error_body(
    message: str,
    *,
    kind: str = "server_error",
    param: str | None = None,
    code: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """OpenAI's error shape, which workers answer in and the proxy reads (``extra``: more keys in it)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code, **(extra or {})}}


def context_exceeded(error: Any) -> tuple[int, int] | None:
    """The prompt's tokens and the context's size, when an error body's ``error`` says the prompt did not fit."""
    if not isinstance(error, Mapping):
        return None
    n, m = error.get("n_prompt_tokens"), error.get("n_ctx")
    if isinstance(n, int) and isinstance(m, int) and not isinstance(n, bool) and not isinstance(m, bool):
        return n, m
    return None


def completion_tokens(data: Any) -> int:
    """The generated tokens an answer's (or a chunk's) usage counts; 0 when it has none."""
    usage = data.get("usage") if isinstance(data, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and tokens > 0 else 0


def sse_event(data: bytes) -> bytes:
    """One SSE event carrying ``data`` (a JSON document, on one line)."""
    return b"data: " + data + b"\n\n"


class StreamEnd(Exception):
    """``[DONE]``: the stream is complete."""


def sse_data(line: str) -> dict[str, Any] | None:
    """The JSON document an SSE line carries; None for other lines (comments, blank, ``event:``);
    raises StreamEnd at ``data: [DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        raise StreamEnd
    chunk = json.loads(data)
    return chunk if isinstance(chunk, dict) else {"error": {"message": f"not a JSON object: {data[:100]}"}}


# -- the client going away -----------------------------------------------------------------------

Receive = Callable[[], Awaitable[Mapping[str, Any]]]


async def client_gone(receive: Receive) -> None:
    """Return when the client has gone away (an ASGI ``receive``, once the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# -- the stream handoff (ARCHITECTURE.md, "Streamed tokens without the proxy on their path") ------------------
# A streamed /v1/chat/completions or /v1/completions whose client speaks plain HTTP/1.1 to the proxy: the proxy
# writes the answer's head, then sends the client's socket (SCM_RIGHTS) with the request to the worker's second
# Unix socket (its HTTP socket's path + HANDOFF_SUFFIX); the worker writes the body's chunks to the client itself
# (HTTP/1.1 chunked framing: the proxy's server still owns the connection, and writes the last chunk when the
# worker says it has ended, so the connection is kept alive). One connection per stream, lines of JSON:
#   proxy -> worker: HandoffRequest + "\n" (with the fd) and ``length`` bytes of body; later HANDOFF_GO once
#                    the head is out, HANDOFF_STOP when the client has gone
#   worker -> proxy: {"ok": true} once the stream has begun (else {"status": N, "body": {error}}: the proxy
#                    answers it as any worker's error, the client's socket untouched); then {"first": true} at the
#                    first chunk written, {"writing": bool} when a write to the client blocks (a client not
#                    reading) and when it goes on, {"sent": bytes} every ``progress`` seconds while it writes,
#                    and one HandoffEnd
HANDOFF_SUFFIX = ".handoff"
HANDOFF_GO = b"go\n"
HANDOFF_STOP = b"stop\n"


class HandoffRequest(TypedDict):
    path: str  # the worker's route: /v1/chat/completions or /v1/completions
    length: int  # bytes of body that follow the line
    drop_usage: bool  # the proxy asked for usage the client did not: count it, do not send its chunk
    progress: float  # seconds between two {"sent": bytes} lines while it writes (the proxy's idle watch); 0: none


class HandoffEnd(TypedDict):
    end: bool
    tokens: int  # completion tokens, from the stream's usage (0 when it had none)
    bytes: int  # of body written to the client
    client_gone: bool  # a write failed, or the proxy said stop: the client went away
    complete: bool  # the stream ended with [DONE] (or its error event) written whole
    cut: bool  # it stopped inside a chunk (told to stop while a write waited): the client's framing is broken


def handoff_path(socket_path: str) -> str:
    """The worker's handoff socket, beside its HTTP socket."""
    return socket_path + HANDOFF_SUFFIX


def chunk_frame(data: bytes) -> bytes:
    """``data`` as one chunk of an HTTP/1.1 chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)
