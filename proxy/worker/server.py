"""The canonical internal API around one Backend (ARCHITECTURE.md, "proxy <-> worker").

``GET /health`` says loading/ready and how many requests are in flight; the LLM routes speak
OpenAI's wire format, SSE when ``stream`` is true; images, speech and transcription speak the
payloads in ``proxy.wire``. Generation runs in its own thread (``proxy.worker.pump``), so a client
that goes away stops it within a token.

Endpoints are module-level functions; the app's state holds the one ``WorkerState``. Failures are
exceptions, mapped to responses in one place (``HANDLERS``): a ``BackendError`` is the backend's own
status; anything else is reported to the proxy (``report_failure``) and answered 500.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.streaming import ClosingStream
from proxy.wire import (
    AUDIO_MEDIA_TYPES,
    SSE_DONE,
    STREAM_HEADERS,
    TOKENIZE_PATH,
    Health,
    ImageRequest,
    SpeechRequest,
    TokenizeRequest,
    Transcript,
    client_gone,
    error_body,
    sse_event,
)
from proxy.worker.backends.base import (
    Backend,
    BackendError,
    BackendFailure,
    Generator,
    ImageMaker,
    InvalidRequest,
    Speaker,
    Tokenizer,
    Transcriber,
)
from proxy.worker.pump import pump

encode = msgspec.json.Encoder().encode


class NotReady(BackendError):
    status = 503


class ClientWentAway(BackendError):
    status = 499


class WorkerState:
    def __init__(self, backend: Backend, parallel: int = 1) -> None:
        self.backend = backend
        self.ready = False
        self.error: str | None = None
        self.in_flight = 0
        self.slots = asyncio.Semaphore(parallel)

    def slot(self) -> Slot:
        return Slot(self)


class Slot:
    """One of the backend's ``parallel`` slots, held for a request; released once, when the request
    ends or, for a stream, when the stream it was handed over to closes."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self.handed_over = False

    async def __aenter__(self) -> Slot:
        self.state.in_flight += 1
        await self.state.slots.acquire()
        return self

    async def release(self) -> None:
        self.state.slots.release()
        self.state.in_flight -= 1

    def hand_over(self) -> Callable[[], Awaitable[None]]:
        self.handed_over = True
        return self.release

    async def __aexit__(self, *exc: object) -> None:
        if not self.handed_over:
            await self.release()


def report_failure(exc: BaseException, what: str) -> None:
    """Tell the proxy, in one line on stdout, that a request failed and why: it logs that at warning
    level with the model's name (a traceback on stderr would reach its log only line by line)."""
    trace = "".join(traceback.format_exception(exc)).rstrip()
    line = json.dumps({"event": "error", "what": what, "message": f"{type(exc).__name__}: {exc}", "traceback": trace})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _state(request: Request) -> WorkerState:
    state: WorkerState = request.app.state.worker
    return state


def _ready(request: Request) -> WorkerState:
    state = _state(request)
    if not state.ready:
        raise NotReady("model is still loading")
    return state


def _json(data: Any) -> Response:
    return Response(encode(data), media_type="application/json")


async def _body(request: Request) -> dict[str, Any]:
    """The request's JSON object, once the model is ready."""
    _ready(request)
    return _parsed(await request.body())


def _parsed(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


_STREAMED = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


async def begin(state: WorkerState, path: str, raw: bytes) -> Iterator[dict[str, Any]] | dict[str, Any]:
    """Begin a handed-off generation (``proxy.worker.handoff``): the checks and the backend's call of the HTTP
    route, in a slot the caller holds; its chunks, or its answer when the request was not streamed."""
    if not state.ready:
        raise NotReady("model is still loading")
    method = _STREAMED.get(path)
    if method is None:
        raise InvalidRequest(f"no streamed route {path!r}")
    result: Iterator[dict[str, Any]] | dict[str, Any] = await run_in_threadpool(
        getattr(state.backend, method), _parsed(raw)
    )
    return result


# -- streams ---------------------------------------------------------------------------------------
async def _sse(chunks: Iterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    items = pump(chunks)
    try:
        async for chunk in items:
            yield sse_event(encode(chunk))
        yield SSE_DONE
    except Exception as exc:  # the stream has started: the error can only travel as an event
        yield sse_event(encode(stream_error(exc)))
    finally:
        await items.aclose()


def stream_error(exc: Exception) -> dict[str, Any]:
    """The error event's body for a stream that failed once begun (a bug is reported to the proxy first)."""
    if isinstance(exc, BackendError):
        return error_body(exc.message, code=exc.code, extra=exc.extra)
    report_failure(exc, "stream failed")
    return error_body(f"{type(exc).__name__}: {exc}")


async def _audio(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Audio bytes as they are made; a failure mid-way can only end the stream early (and says so)."""
    items = pump(chunks)
    try:
        async for chunk in items:
            yield chunk
    except Exception as exc:
        report_failure(exc, "synthesis failed mid-stream")
        raise
    finally:
        await items.aclose()


# -- endpoints -------------------------------------------------------------------------------------
async def health(request: Request) -> Response:
    state = _state(request)
    report: Health = {
        "status": "ready" if state.ready else "loading",
        "progress": 1.0 if state.ready else state.backend.progress(),
        "detail": state.error or "",
        "in_flight": state.in_flight,
    }
    return JSONResponse({**report, **state.backend.info()}, 200 if state.ready else 503)


async def _unless_gone(request: Request, work: Awaitable[Any], stop: Callable[[asyncio.Future[Any]], None]) -> Any:
    """``work``'s result; if the client goes away first, ``stop`` it (set the backend's cancel event, or
    cancel the task), wait until it has stopped (the slot stays held until then), and raise ClientWentAway.
    A non-streaming endpoint is otherwise never told of the disconnect and works to the end."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone(request.receive))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job.done():
        return job.result()
    stop(job)
    await asyncio.wait({job})
    if not job.cancelled():
        job.exception()  # retrieved: whatever it ended with, nobody is left to tell
    raise ClientWentAway("the client went away")


def _setter(cancel: threading.Event) -> Callable[[asyncio.Future[Any]], None]:
    return lambda job: cancel.set()


def _cancel(job: asyncio.Future[Any]) -> None:
    job.cancel()


def _generation(method: str) -> Callable[[Request], Awaitable[Response]]:
    """An LLM route: a JSON answer, or SSE when the backend returns an iterator of chunks. A JSON answer
    stops within a token when the client goes away (the backend's ``cancel``), as a stream does."""

    async def endpoint(request: Request) -> Response:
        body = await _body(request)
        state = _state(request)
        cancel = threading.Event()
        run = getattr(state.backend, method)
        async with state.slot() as slot:
            if body.get("stream") or method == "embeddings":
                result = await run_in_threadpool(run, body)
            else:
                result = await _unless_gone(request, run_in_threadpool(run, body, cancel), _setter(cancel))
            if isinstance(result, dict):
                return _json(result)
            return ClosingStream(_sse(result), on_close=slot.hand_over(), headers=STREAM_HEADERS)

    return endpoint


async def tokenize(request: Request) -> Response:
    """Count a prompt's tokens: cheap (the vocabulary and the template, not the context), so it takes no
    slot and does not wait for a generation."""
    body: TokenizeRequest = await _body(request)  # type: ignore[assignment]  # shaped by the proxy (proxy.wire)
    backend = _state(request).backend
    assert isinstance(backend, Tokenizer)
    return _json(await run_in_threadpool(backend.count_tokens, body))


async def speech(request: Request) -> Response:
    body = await _body(request)
    media_type = AUDIO_MEDIA_TYPES.get(str(body.get("response_format") or "wav"))
    if media_type is None:
        raise InvalidRequest(f"unknown response_format; known: {', '.join(AUDIO_MEDIA_TYPES)}", param="response_format")
    state = _state(request)
    backend = state.backend
    assert isinstance(backend, Speaker)
    async with state.slot() as slot:
        request_: SpeechRequest = body  # type: ignore[assignment]  # shaped by the proxy (proxy.wire)
        chunks = await run_in_threadpool(backend.speech, request_)
        return ClosingStream(_audio(chunks), on_close=slot.hand_over(), media_type=media_type, headers=STREAM_HEADERS)


async def images(request: Request) -> Response:
    body: ImageRequest = await _body(request)  # type: ignore[assignment]  # shaped by the proxy (proxy.wire)
    state = _state(request)
    backend = state.backend
    assert isinstance(backend, ImageMaker)
    cancel = threading.Event()
    async with state.slot():  # the client going away stops the job at its next step
        return _json(await _unless_gone(request, run_in_threadpool(backend.images, body, cancel), _setter(cancel)))


def _transcription(task: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        state = _ready(request)
        backend = state.backend
        assert isinstance(backend, Transcriber)
        async with request.form(max_files=1) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("'file' is required", param="file")
            params: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
            params["task"] = task
            params["temperature"] = float(params.get("temperature") or 0.0)
            params["word_timestamps"] = "word" in form.getlist("timestamp_granularities[]")

            async def transcribe() -> tuple[dict[str, Any], list[Any]]:
                header, segments = await run_in_threadpool(backend.transcribe, upload.file, params)
                items = pump(segments)
                try:
                    return header, [segment async for segment in items]
                finally:
                    await items.aclose()  # a cancelled transcription stops after the segment it is making

            async with state.slot():
                header, found = await _unless_gone(request, transcribe(), _cancel)
        transcript: Transcript = {
            "language": header["language"],
            "duration": header["duration"],
            "text": "".join(s["text"] for s in found).strip(),
            "segments": found,
        }
        words = [w for s in found for w in s.get("words", [])]
        if words:
            transcript["words"] = words
        return _json(transcript)

    return endpoint


# -- errors ----------------------------------------------------------------------------------------
def refusal(exc: BackendError) -> dict[str, Any]:
    """The error body a refused request is answered with (its status is ``exc.status``)."""
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return error_body(exc.message, kind=kind, param=exc.param, code=exc.code, extra=exc.extra)


async def _backend_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BackendError)
    return JSONResponse(refusal(exc), exc.status)


def _reported(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A backend bug becomes a reported BackendFailure (500): the worker keeps serving, and the proxy
    logs why (Starlette would re-raise a bare Exception after answering it)."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except BackendError:
            raise
        except Exception as exc:
            report_failure(exc, "request failed")
            raise BackendFailure(f"{type(exc).__name__}: {exc}") from exc

    return guarded


HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {BackendError: _backend_error}


def create_worker_app(state: WorkerState) -> Starlette:
    """The routes this backend can serve, by the protocols it implements."""
    backend = state.backend
    endpoints: list[tuple[str, Callable[[Request], Awaitable[Response]]]] = []
    if isinstance(backend, Generator):
        endpoints += [
            ("/v1/chat/completions", _generation("chat")),
            ("/v1/completions", _generation("completion")),
            ("/v1/embeddings", _generation("embeddings")),
        ]
    if isinstance(backend, Tokenizer):
        endpoints.append((TOKENIZE_PATH, tokenize))
    if isinstance(backend, ImageMaker):
        endpoints.append(("/v1/images", images))
    if isinstance(backend, Speaker):
        endpoints.append(("/v1/audio/speech", speech))
    if isinstance(backend, Transcriber):
        endpoints += [
            ("/v1/audio/transcriptions", _transcription("transcribe")),
            ("/v1/audio/translations", _transcription("translate")),
        ]
    routes = [Route("/health", health, methods=["GET"])]
    routes += [Route(path, _reported(endpoint), methods=["POST"]) for path, endpoint in endpoints]
    app = Starlette(routes=routes, exception_handlers=HANDLERS)
    app.state.worker = state
    return app
