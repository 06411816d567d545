"""The canonical internal API around one Backend (DESIGN.md, "proxy <-> worker").

``GET /health`` says loading/ready and how many requests are in flight; the LLM routes speak
OpenAI's wire format, SSE when ``stream`` is true. Generation runs in its own thread
(``proxy.worker.pump``), so a client that goes away stops it within a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
from proxy.worker.audio import MEDIA_TYPES
from proxy.worker.backends.base import Backend, BackendError, ImageMaker, Speaker, Transcriber
from proxy.worker.pump import pump

log = logging.getLogger("proxy.worker")
_encode = msgspec.json.Encoder().encode
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


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


def _failure(exc: Exception) -> JSONResponse:
    """A request the backend could not serve: its own status for a BackendError, else a reported 500."""
    if isinstance(exc, BackendError):
        return _error(exc.status, exc.message, exc.param)
    report_failure(exc, "request failed")
    return _error(500, f"{type(exc).__name__}: {exc}")


async def _sse(chunks: Iterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    items = pump(chunks)
    try:
        async for chunk in items:
            yield b"data: " + _encode(chunk) + b"\n\n"
        yield b"data: [DONE]\n\n"
    except Exception as exc:  # the stream has started: the error can only travel as an event
        if not isinstance(exc, BackendError):
            report_failure(exc, "stream failed")
        message = exc.message if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
        yield b"data: " + _encode({"error": {"message": message, "type": "server_error"}}) + b"\n\n"
    finally:
        await items.aclose()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone away (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


def create_worker_app(state: WorkerState) -> Starlette:
    async def health(request: Request) -> Response:
        body = {
            "status": "ready" if state.ready else "loading",
            "progress": 1.0 if state.ready else state.backend.progress(),
            "detail": state.error or "",
            "in_flight": state.in_flight,
            **state.backend.info(),
        }
        return JSONResponse(body, 200 if state.ready else 503)

    async def json_request(request: Request) -> dict[str, Any] | Response:
        """The request's JSON object once the model is ready, or the error answer to send instead."""
        if not state.ready:
            return _error(503, "model is still loading")
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return _error(400, f"invalid JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        return body

    def generation(method: Callable[[dict[str, Any]], Any]) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            body = await json_request(request)
            if isinstance(body, Response):
                return body
            async with state.slot() as slot:
                try:
                    result = await run_in_threadpool(method, body)
                except Exception as exc:  # a backend error or bug: report it, keep serving
                    return _failure(exc)
                if isinstance(result, dict):
                    return Response(_encode(result), media_type="application/json")
                return ClosingStream(_sse(result), on_close=slot.hand_over(), headers=_STREAM_HEADERS)

        return handler

    def transcription(task: str, backend: Transcriber) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            if not state.ready:
                return _error(503, "model is still loading")
            async with request.form(max_files=1) as form:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    return _error(400, "'file' is required", "file")
                params: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
                params["task"] = task
                params["temperature"] = float(params.get("temperature") or 0.0)
                params["word_timestamps"] = "word" in form.getlist("timestamp_granularities[]")
                async with state.slot():
                    try:
                        header, segments = await run_in_threadpool(backend.transcribe, upload.file, params)
                        found = [segment async for segment in pump(segments)]
                    except Exception as exc:  # a backend error or bug: report it, keep serving
                        return _failure(exc)
            body = {**header, "text": "".join(s["text"] for s in found).strip(), "segments": found}
            words = [w for s in found for w in s.get("words", [])]
            if words:
                body["words"] = words
            return Response(_encode(body), media_type="application/json")

        return handler

    def speech(backend: Speaker) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            body = await json_request(request)
            if isinstance(body, Response):
                return body
            media_type = MEDIA_TYPES.get(str(body.get("response_format") or "wav"))
            if media_type is None:
                return _error(400, f"unknown response_format; known: {', '.join(MEDIA_TYPES)}", "response_format")
            async with state.slot() as slot:
                try:
                    chunks = await run_in_threadpool(backend.speech, body)
                except Exception as exc:  # a backend error or bug: report it, keep serving
                    return _failure(exc)
                return ClosingStream(_audio(chunks), on_close=slot.hand_over(), media_type=media_type,
                                     headers=_STREAM_HEADERS)

        return handler

    def images(backend: ImageMaker) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            body = await json_request(request)
            if isinstance(body, Response):
                return body
            cancel = threading.Event()
            async with state.slot():
                job = asyncio.ensure_future(run_in_threadpool(backend.images, body, cancel))
                gone = asyncio.ensure_future(_disconnected(request))
                await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
                gone.cancel()
                if not job.done():  # the client went away: stop at the next step, then free the slot
                    cancel.set()
                    await asyncio.wait({job})
                    return _error(499, "the client went away")
                try:
                    return Response(_encode(job.result()), media_type="application/json")
                except Exception as exc:  # a backend error or bug (or the job cancelled): report it
                    return _failure(exc)

        return handler

    backend = state.backend
    routes = [Route("/health", health, methods=["GET"])]
    if hasattr(backend, "chat"):  # an LLM backend
        routes += [
            Route("/v1/chat/completions", generation(backend.chat), methods=["POST"]),
            Route("/v1/completions", generation(backend.completion), methods=["POST"]),
            Route("/v1/embeddings", generation(backend.embeddings), methods=["POST"]),
        ]
    if isinstance(backend, ImageMaker):  # an image backend
        routes.append(Route("/v1/images", images(backend), methods=["POST"]))
    if isinstance(backend, Speaker):  # a text-to-speech backend
        routes.append(Route("/v1/audio/speech", speech(backend), methods=["POST"]))
    if isinstance(backend, Transcriber):  # a speech-to-text backend
        routes += [
            Route("/v1/audio/transcriptions", transcription("transcribe", backend), methods=["POST"]),
            Route("/v1/audio/translations", transcription("translate", backend), methods=["POST"]),
        ]
    return Starlette(routes=routes)
