"""Requests given up while they wait in the queue leave it (issue 25, defect 4), on the real path: a live proxy
with fake worker processes, the official wire formats over httpx.

Model ``a`` is held busy by a stream its worker holds after the first chunk, with room for one model; three
clients ask for ``b`` (a non-streamed OpenAI chat, an Ollama ``/api/chat`` stream and an OpenAI SSE stream,
which has loading feedback), wait in the queue and give up (their connections close). Before the fix the lease
was taken before the client was watched: ``b`` kept ``queued: 3`` for as long as ``a`` was busy, held three
places of ``limits.max_queue``, and when ``a`` was done ``b`` was loaded (``a`` evicted) for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.harness import LiveProxy, fake_config, wait_until

CHAT = [{"role": "user", "content": "hi"}]


def queued(proxy: LiveProxy, name: str) -> int:
    return int(proxy.status()[name]["queued"])


async def test_requests_given_up_in_the_queue_leave_it_and_load_nothing(
    make_proxy: Callable[..., LiveProxy], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    proxy = make_proxy(
        [fake_config("a", "--gate", str(gate), "--tokens", "5"), fake_config("b")],
        limits={"max_loaded_models": 1},
    )
    async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as holder:
        body: dict[str, Any] = {"model": "a", "messages": CHAT, "stream": True}
        async with holder.stream("POST", "/v1/chat/completions", json=body) as busy:
            lines = busy.aiter_lines()
            async for line in lines:  # past the loading comments: a is busy until the gate opens
                if line.startswith("data: "):
                    break

            clients = [httpx.AsyncClient(base_url=proxy.url, timeout=60) for _ in range(3)]

            async def stream(client: httpx.AsyncClient, path: str, request: dict[str, Any]) -> None:
                async with client.stream("POST", path, json=request) as response:
                    async for _ in response.aiter_lines():
                        pass

            tasks = [
                asyncio.create_task(clients[0].post("/v1/chat/completions", json={"model": "b", "messages": CHAT})),
                asyncio.create_task(stream(clients[1], "/api/chat", {"model": "b", "messages": CHAT, "stream": True})),
                # SSE with loading feedback: b waits for a, not for its load, so nothing is answered yet
                asyncio.create_task(
                    stream(clients[2], "/v1/chat/completions", {"model": "b", "messages": CHAT, "stream": True})
                ),
            ]
            await asyncio.to_thread(wait_until, lambda: queued(proxy, "b") == 3, 30)

            for task in tasks:  # the clients give up: their connections close
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients:
                await client.aclose()

            await asyncio.to_thread(wait_until, lambda: queued(proxy, "b") == 0, 15)
            gate.touch()
            rest = [line async for line in lines if line]
            assert rest[-1] == "data: [DONE]"
    await asyncio.to_thread(wait_until, lambda: proxy.status()["a"]["in_flight"] == 0, 15)
    status = proxy.status()
    assert status["a"]["state"] == "ready"  # not evicted for b's gone requests
    assert status["b"]["state"] == "stopped"
    assert "model b: starting" not in proxy.log()
