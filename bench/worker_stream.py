"""The worker's own CPU per streamed token, without llama.cpp and without sockets: the worker's stream
(``proxy.worker.server._sse``: the pump thread, a chunk's JSON, its SSE event) sent by the streamed response
(``proxy.streaming.ClosingStream``) to an ASGI send that keeps nothing, for a generator that yields a
llama.cpp-shaped chunk at once. What is left per token in a real worker is this, llama.cpp's own work, and
the write of the event to the proxy's socket.

The handed-off path (``proxy.worker.handoff.write_stream``: the generating thread writes each chunk to the
client's socket) is measured the same way, with its socket write (the writing thread's own CPU clock).

    .venv/bin/python -m bench.worker_stream [--tokens N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from bench.common import median, save, table
from proxy.streaming import ClosingStream
from proxy.worker.handoff import write_stream
from proxy.worker.server import _sse


def chunks(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {
            "id": "chatcmpl-0",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "smollm2",
            "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "logprobs": None, "finish_reason": None}],
        }


async def one(tokens: int) -> float:
    """CPU seconds (this process, every thread) per token of one stream."""

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        await asyncio.Event().wait()

    async def closed() -> None:
        pass

    start = time.process_time()
    await ClosingStream(_sse(chunks(tokens)), on_close=closed)({"type": "http"}, receive, send)
    return (time.process_time() - start) / tokens


def handed_off(tokens: int) -> float:
    """CPU seconds of the writing thread per token of one handed-off stream (``proxy.worker.handoff``): the
    chunk's JSON, its SSE event and HTTP chunk, and its write to a socket (a thread here reads it away)."""
    worker, client = socket.socketpair()
    worker.setblocking(False)
    drained = threading.Thread(target=_drain, args=(client,), daemon=True)
    drained.start()
    try:
        start = time.thread_time()
        end = write_stream(chunks(tokens), worker, threading.Event(), True, lambda line: None)
        spent = time.thread_time() - start
    finally:
        worker.close()
        drained.join()
        client.close()
    assert end["complete"]
    return spent / tokens


def _drain(sock: socket.socket) -> None:
    while sock.recv(1 << 20):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    per_token = [asyncio.run(one(args.tokens)) for _ in range(args.rounds)]
    per_token_handoff = [handed_off(args.tokens) for _ in range(args.rounds)]
    summary = {
        "tokens": args.tokens,
        "rounds": args.rounds,
        "cpu_us_per_token": median(per_token) * 1e6,
        "handoff_cpu_us_per_token": median(per_token_handoff) * 1e6,
    }
    path = save("worker_stream", summary | {"raw": per_token, "raw_handoff": per_token_handoff})
    figure = f"{summary['cpu_us_per_token']:.1f} us"
    handoff = f"{summary['handoff_cpu_us_per_token']:.1f} us"
    print(
        table(
            [
                ("worker CPU per token, HTTP path, no model, no socket", figure),
                ("worker CPU per token, handed off, no model, a socket write each", handoff),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
