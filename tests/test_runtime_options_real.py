"""``runtime_options: [num_ctx]`` on the real path: the ollama SDK, a live proxy, real SmolLM2 workers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.harness import LiveProxy, gone, running, smollm2_config, wait_until

pytestmark = pytest.mark.real

HI = [{"role": "user", "content": "Say hi."}]


def loaded(proxy: LiveProxy, name: str) -> tuple[int, int, int]:
    """(pid, /api/ps context_length, the worker's own n_ctx) of a loaded model."""
    status = proxy.status()[name]
    ps = {m["name"]: m for m in httpx.get(proxy.url + "/api/ps", timeout=10).json()["models"]}
    entry = ps[name if ":" in name else f"{name}:latest"]
    return status["pid"], entry["context_length"], status["worker"]["n_ctx"]


def test_a_request_with_another_num_ctx_reloads_the_model_with_it(tmp_path: Path) -> None:
    models = [smollm2_config(), smollm2_config(name="plain", aliases=[], runtime_options=[])]
    with running(tmp_path, models) as proxy, ollama.Client(host=proxy.url) as client:
        name = "smollm2:135m"
        client.chat(model=name, messages=HI, options={"num_ctx": 1024, "num_predict": 4})
        first, ctx, worker_ctx = loaded(proxy, name)
        assert (ctx, worker_ctx) == (1024, 1024)  # a stopped model loads straight with the value asked

        client.chat(model=name, messages=HI, options={"num_ctx": 2048, "num_predict": 4})
        second, ctx, worker_ctx = loaded(proxy, name)
        assert second != first and (ctx, worker_ctx) == (2048, 2048)
        assert gone([first])

        client.generate(model=name, prompt="Hi", options={"num_predict": 4})  # no num_ctx: what is loaded serves
        client.chat(model=name, messages=HI, options={"num_ctx": 2048, "num_predict": 4})
        assert loaded(proxy, name)[0] == second

        with pytest.raises(ollama.ResponseError) as info:  # past the GGUF's own context length
            client.chat(model=name, messages=HI, options={"num_ctx": 10**7})
        assert info.value.status_code == 400 and "num_ctx" in info.value.error
        assert loaded(proxy, name)[0] == second

        # without runtime_options the value is ignored, and that is said once
        for _ in range(2):
            client.chat(model="plain", messages=HI, options={"num_ctx": 1024, "num_predict": 4})
        plain, ctx, worker_ctx = loaded(proxy, "plain")
        assert (ctx, worker_ctx) == (2048, 2048)  # the config's
        assert proxy.log().count("ignored: not in its runtime_options") == 1


def test_a_stream_in_flight_finishes_before_the_reload(tmp_path: Path) -> None:
    with running(tmp_path, [smollm2_config()]) as proxy:
        name = "smollm2:135m"
        client = ollama.Client(host=proxy.url)
        stream = client.chat(
            model=name, messages=HI, stream=True, options={"num_ctx": 2048, "num_predict": 48, "temperature": 0}
        )
        chunks = [next(stream)]  # the stream is under way
        old = proxy.status()[name]["pid"]
        result: dict[str, Any] = {}

        def reload() -> None:
            with ollama.Client(host=proxy.url) as other:
                result["answer"] = other.chat(model=name, messages=HI, options={"num_ctx": 1024, "num_predict": 4})

        thread = threading.Thread(target=reload)
        thread.start()
        wait_until(lambda: "reload" in (proxy.status()[name]["waiting"] or ""))  # it waits for the stream
        chunks.extend(stream)
        assert chunks[-1].done and chunks[-1].done_reason in ("stop", "length")  # whole, from the old worker
        thread.join(timeout=120)
        assert result["answer"].done
        new, ctx, worker_ctx = loaded(proxy, name)
        assert new != old and (ctx, worker_ctx) == (1024, 1024)
        client._client.close()
