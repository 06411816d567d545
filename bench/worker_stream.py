"""The worker's own CPU per streamed token, without llama.cpp and without sockets: the worker's stream
(``proxy.worker.server._sse``: the pump thread, a chunk's JSON, its SSE event) sent by the streamed response
(``proxy.streaming.ClosingStream``) to an ASGI send that keeps nothing, for a generator that yields a
llama.cpp-shaped chunk at once. What is left per token in a real worker is this, llama.cpp's own work, and
the write of the event to the proxy's socket.

    .venv/bin/python -m bench.worker_stream [--tokens N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator
from typing import Any

from bench.common import median, save, table
from proxy.streaming import ClosingStream
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    per_token = [asyncio.run(one(args.tokens)) for _ in range(args.rounds)]
    summary = {"tokens": args.tokens, "rounds": args.rounds, "cpu_us_per_token": median(per_token) * 1e6}
    path = save("worker_stream", summary | {"raw": per_token})
    figure = f"{summary['cpu_us_per_token']:.1f} us"
    print(table([("worker CPU per token, no model, no socket", figure), ("results", str(path))]))


if __name__ == "__main__":
    main()
