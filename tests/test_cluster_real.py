"""A real SmolLM2 stream through a hop: node b has no LLM, node a serves SmolLM2 (llama.cpp); a client of
b streams from a token by token, and walking away mid-stream stops a's generation."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from tests.harness import LiveProxy, fake_config, gone, smollm2_config, wait_until
from tests.redis_server import RedisServer

SECRET = "cluster-secret-for-the-real-test-0123456789"


@pytest.mark.real
def test_a_real_stream_through_a_hop_and_its_client_going(tmp_path: Path, redis_server: RedisServer) -> None:
    cluster = {"redis_url": redis_server.url, "secret": SECRET}
    a = LiveProxy(tmp_path / "a", [smollm2_config()], cluster={**cluster, "node": "a"}).start()
    b = LiveProxy(tmp_path / "b", [fake_config("other")], cluster={**cluster, "node": "b"}).start()
    pids: list[int] = []
    try:
        client = openai.OpenAI(base_url=b.url + "/v1", api_key="x")
        wait_until(lambda: "smollm2:135m" in [m.id for m in client.models.list()])  # a's model, on b's list
        with client.chat.completions.with_streaming_response.create(
            model="smollm2",  # its alias: b knows it from a's publication
            messages=[{"role": "user", "content": "Count from one to twenty."}],
            stream=True,
            max_tokens=24,
            temperature=0,
        ) as response:
            assert response.headers["x-served-by"] == "a"
            pieces = [c.choices[0].delta.content for c in response.parse() if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 5  # token by token, not one block
        pids = [p.pid for p in a.workers()]
        # a long answer, left after its first tokens: a's worker stops generating
        with client.chat.completions.with_streaming_response.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Write a long story about the sea."}],
            stream=True,
            max_tokens=1500,
        ) as response:
            stream = response.parse()
            for _ in range(3):
                next(iter(stream))
            wait_until(lambda: a.status()["smollm2:135m"]["in_flight"] == 1, timeout=30)
        left = time.monotonic()
        wait_until(lambda: a.status()["smollm2:135m"]["in_flight"] == 0, timeout=30)
        assert time.monotonic() - left < 5  # well before 1500 tokens (0.4 s measured)
    finally:
        b.stop()
        a.stop()
        wait_until(lambda: gone(pids), timeout=15)
