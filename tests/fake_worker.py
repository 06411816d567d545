"""A fake worker speaking the internal API, for lifecycle edge cases (and the proxy-overhead bench).

Run as an ``external`` model's cmd: ``python tests/fake_worker.py --port ${PORT} [flags]``.
It streams ``--tokens`` chunks of ``tok`` at ``--rate`` per second (0: as fast as it can), and
can be told to load slowly (``--load-time``, or ``--load-until FILE``: until that file exists), crash
while loading (``--fail-unless FILE``: unless that file exists), hang
while loading, crash, hang or end early mid-stream, hold its streams after the first chunk until a file
exists (``--gate``), print a request's ``user`` field as a log line (``--say``), or ignore SIGTERM;
``--signals FILE`` records each SIGTERM it receives, so a test can tell a stop by SIGTERM from a kill.
``--script FILE`` makes it a scripted model for the agents' tool round trips (``scripted_answer``).
``GET /health`` reports ``in_flight`` and the number of chunks generated so far, so a test can see
generation stop when its client goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# --tool-calls: what a model makes when it calls two tools at once, streamed as OpenAI does: each call's
# name first, then its arguments in pieces, the two calls' pieces interleaved
TOOL_CALL_DELTAS: list[dict[str, Any]] = [
    {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
    {"index": 1, "id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    {"index": 0, "function": {"arguments": '{"city": '}},
    {"index": 1, "function": {"arguments": '{"zone": '}},
    {"index": 0, "function": {"arguments": '"Paris"}'}},
    {"index": 1, "function": {"arguments": '"CET"}'}},
]


def tool_chunk(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}],
    }


def scripted_answer(script: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """What a scripted model answers (``--script``: a JSON object ``{"calls": {tool name: arguments}, "secret":
    text, "answer": text}``): a request that offers one of the tools named in ``calls`` and has no tool result
    holding ``secret`` yet gets a call of the first such tool; once a tool result holds ``secret``, the answer
    is ``answer``; after a call whose result does not hold it, a text saying so; a request that offers none of
    the tools (an agent's side request: a title, a summary) gets "ok". Returns the assistant's message."""
    offered = [
        t["function"]["name"]
        for t in body.get("tools") or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    results = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "tool"]
    if any(script["secret"] in json.dumps(m.get("content")) for m in results):
        return {"role": "assistant", "content": script["answer"]}
    called = any(
        isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls") for m in body.get("messages") or []
    )
    if results or called:  # one call only: a result that did not come back ends the turn, not a loop of calls
        return {"role": "assistant", "content": "the tool's result did not hold the secret"}
    for name, arguments in script["calls"].items():
        if name in offered:
            call = {
                "id": "call_scripted",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
            return {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"role": "assistant", "content": "ok"}


def _scripted_chunks(message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A scripted message streamed as OpenAI's chunks, then the usage chunk."""
    head = {"id": "fake", "object": "chat.completion.chunk", "created": 0, "model": "fake"}
    if message.get("tool_calls"):
        call = message["tool_calls"][0]
        yield {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "tool_calls": [{"index": 0, **call}]},
                    "finish_reason": None,
                }
            ],
        }
        finish = "tool_calls"
    else:
        yield {
            **head,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": message["content"]}, "finish_reason": None}
            ],
        }
        finish = "stop"
    yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    yield {**head, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


# a 1x1 PNG: what the fake "image model" makes
FAKE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def build(args: argparse.Namespace) -> Starlette:
    state = {"in_flight": 0, "generated": 0, "requests": 0}

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ready", "progress": 1.0, "pid": os.getpid(), **state})

    def chunk(i: int, text: str | None, finish: str | None = None) -> bytes:
        delta = {"content": text} if text is not None else {}
        body = {
            "id": "fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        state["requests"] += 1
        if args.record:
            with open(args.record, "a") as fh:
                fh.write(json.dumps({"path": request.url.path, "body": body}) + "\n")
        n = int(body.get("max_tokens") or args.tokens)
        if args.script:
            with open(args.script) as fh:
                message = scripted_answer(json.load(fh), body)
            if not body.get("stream"):
                finish = "tool_calls" if message.get("tool_calls") else "stop"
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                choice = {"index": 0, "message": message, "finish_reason": finish}
                return JSONResponse(
                    {
                        "id": "fake",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "fake",
                        "choices": [choice],
                        "usage": usage,
                    }
                )
            events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in _scripted_chunks(message)]
            return StreamingResponse(iter([*events, b"data: [DONE]\n\n"]), media_type="text/event-stream")
        if args.say and isinstance(body.get("user"), str):  # a line in its log, on demand
            print(f"fake worker says: {body['user']}", file=sys.stderr, flush=True)
        if not body.get("stream"):
            await asyncio.sleep(args.delay)
            while args.gate_answers and not os.path.exists(args.gate_answers):  # held until the test opens it
                await asyncio.sleep(0.05)
            text = "tok " * n
            return JSONResponse(
                {
                    "id": "fake",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "fake",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
                }
            )

        async def gen() -> AsyncIterator[bytes]:
            state["in_flight"] += 1
            try:
                if args.tool_calls and body.get("tools"):
                    for delta in TOOL_CALL_DELTAS:  # two calls at once, their pieces interleaved
                        yield b"data: " + json.dumps(tool_chunk(delta)).encode() + b"\n\n"
                    yield chunk(0, None, "tool_calls")
                    yield b"data: [DONE]\n\n"
                    return
                for i in range(n):
                    if args.gate and i == 1:
                        while not os.path.exists(args.gate):  # held until the test opens the gate
                            await asyncio.sleep(0.02)
                    if args.crash_after is not None and i == args.crash_after:
                        sys.stderr.write(f"fake worker: crashing after {i} chunks\n")
                        sys.stderr.flush()
                        os._exit(3)
                    if args.hang_after is not None and i == args.hang_after:
                        await asyncio.Event().wait()  # stuck, using no CPU, /health still answering
                    if args.end_after is not None and i == args.end_after:
                        return  # a clean end of the HTTP answer, without finish_reason or [DONE]
                    if args.rate:
                        await asyncio.sleep(1.0 / args.rate)
                    state["generated"] += 1
                    yield chunk(i, "tok ")
                yield chunk(n, None, "stop")
                usage = {
                    "id": "fake",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "fake",
                    "choices": [],
                    "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
                }
                yield b"data: " + json.dumps(usage).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                state["in_flight"] -= 1

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def embeddings(request: Request) -> Response:
        body = json.loads(await request.body())
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vector = [1.0, 0.0] + [0.1234567890123 * (j % 7) for j in range(args.embedding_dim - 2)]
        data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(inputs))]
        return JSONResponse({"object": "list", "data": data, "model": "fake", "usage": {"prompt_tokens": 1}})

    async def images(request: Request) -> Response:  # a model configured as kind: image
        body = json.loads(await request.body())
        seed = int(body.get("seed") or 0)
        image = {"base64": FAKE_PNG, "seed": seed, "width": 1, "height": 1}
        return JSONResponse({"images": [image] * int(body.get("batch_size") or 1), "processing_time": 0.01})

    async def speech(request: Request) -> Response:  # kind: speech; the text back as the "audio"
        body = json.loads(await request.body())
        return Response(("fake audio: " + str(body.get("input"))).encode(), media_type="application/octet-stream")

    async def transcriptions(request: Request) -> Response:  # kind: transcription; the upload's size as text
        async with request.form() as form:
            upload = form["file"]
            size = len(await upload.read()) if not isinstance(upload, str) else 0
        text = f"fake transcript of {size} bytes"
        return JSONResponse({"language": "en", "duration": 1.0, "text": text, "segments": []})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", chat, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/images", images, methods=["POST"]),
            Route("/v1/audio/speech", speech, methods=["POST"]),
            Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
            Route("/v1/audio/translations", transcriptions, methods=["POST"]),
        ]
    )


class _DeafServer(uvicorn.Server):
    """A uvicorn server that installs no signal handlers, so SIGTERM's disposition (ignored) stands."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _record(path: str) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM handler that only writes down that the signal came (the process goes on)."""

    def handler(sig: int, frame: FrameType | None) -> None:
        with open(path, "a") as fh:
            fh.write(f"{signal.Signals(sig).name} {os.getpid()}\n")

    return handler


class _Server(uvicorn.Server):
    """uvicorn's server; with ``signals`` it first writes down each SIGTERM, then shuts down as usual."""

    def __init__(self, config: uvicorn.Config, signals: str | None) -> None:
        super().__init__(config)
        self._note = _record(signals) if signals else None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._note is not None and sig == signal.SIGTERM:
            self._note(sig, frame)
        super().handle_exit(sig, frame)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--load-time", type=float, default=0.0, help="seconds before the port opens")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.0, help="chunks per second; 0 = as fast as possible")
    p.add_argument("--delay", type=float, default=0.0, help="seconds a non-streaming answer takes")
    p.add_argument("--crash-on-load", action="store_true")
    p.add_argument("--fail-unless", default=None, help="crash while loading unless this file exists")
    p.add_argument("--gate", default=None, help="streams wait after their first chunk until this file exists")
    p.add_argument("--gate-answers", default=None, help="answers that are not streamed wait until this file exists")
    p.add_argument("--signals", default=None, help="append a line here for each SIGTERM received")
    p.add_argument("--hang-on-load", action="store_true")
    p.add_argument("--crash-after", type=int, default=None, help="exit after this many streamed chunks")
    p.add_argument("--hang-after", type=int, default=None, help="stop making progress after this many chunks")
    p.add_argument("--end-after", type=int, default=None, help="end the stream after this many chunks, no [DONE]")
    p.add_argument("--record", default=None, help="append each generation request (path, body) to this file")
    p.add_argument("--tool-calls", action="store_true", help="answer a request with tools by calling two at once")
    p.add_argument("--script", default=None, help="answer as a scripted model (scripted_answer) from this JSON file")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--say", action="store_true", help="print a request's `user` field to stderr (a log line)")
    p.add_argument("--pidfile", default=None, help="write our pid here")
    p.add_argument("--embedding-dim", type=int, default=2, help="the length of each embedding (at least 2)")
    p.add_argument("--load-until", default=None, help="the load lasts until this file exists (then goes on)")
    args = p.parse_args()
    if args.pidfile:
        with open(args.pidfile, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, _record(args.signals) if args.signals else signal.SIG_IGN)
    print(f"fake worker {os.getpid()} loading", file=sys.stderr, flush=True)
    while args.load_until and not os.path.exists(args.load_until):
        time.sleep(0.02)
    if args.crash_on_load or (args.fail_unless and not os.path.exists(args.fail_unless)):
        print("fake worker: cannot load weights: file is corrupt", file=sys.stderr, flush=True)
        raise SystemExit(7)
    if args.hang_on_load:
        while True:
            time.sleep(3600)
    time.sleep(args.load_time)
    config = uvicorn.Config(build(args), host="127.0.0.1", port=args.port, log_level="warning", lifespan="off")
    server = _DeafServer(config) if args.ignore_sigterm else _Server(config, args.signals)
    server.run()


if __name__ == "__main__":
    main()
