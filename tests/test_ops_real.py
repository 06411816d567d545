"""/metrics, /status/events and /logs on the real path: a live proxy, the real llama.cpp worker on SmolLM2,
the official openai and ollama SDKs; /metrics read with prometheus-client's own parser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import LiveProxy, smollm2_config, wait_until
from tests.test_ops import ADMIN, KEYS, USER, Collected

pytestmark = pytest.mark.real

MakeProxy = Callable[..., LiveProxy]
MODEL = "smollm2:135m"
CHAT = "/v1/chat/completions"


def scrape(proxy: LiveProxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    r = httpx.get(proxy.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_events_and_logs_after_real_requests(make_proxy: MakeProxy, request: pytest.FixtureRequest) -> None:
    proxy = make_proxy([smollm2_config()], tokens=KEYS)

    def done(events: list[tuple[str, dict[str, Any]]]) -> bool:
        return any(n == "request_end" for n, _ in events)

    seen = Collected(proxy, done)  # subscribed before the first request
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="user-key", max_retries=0)
    request.addfinalizer(client.close)
    messages: Any = [{"role": "user", "content": "Say hello."}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True)
    chunks = list(stream)
    # the proxy asked the worker for this stream's usage (to count it) and kept it from the client, who did not
    assert all(c.choices and c.usage is None for c in chunks), chunks[-2:]
    plain_tokens = sum(1 for c in chunks if c.choices[0].delta.content)  # the worker counts a token a chunk
    assert plain_tokens > 0
    events = seen.wait()

    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    usage_stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    streamed_tokens = [c.usage.completion_tokens for c in usage_stream if c.usage is not None]
    ollama_client = ollama.Client(host=proxy.url, headers=USER)
    request.addfinalizer(ollama_client.close)
    reply = ollama_client.chat(model=MODEL, messages=messages, options={"num_predict": 8})
    assert reply.eval_count
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=messages)

    # events: the snapshot first, then the load in order, then the request's start and end
    assert events[0][0] == "snapshot" and events[0][1]["models"][0]["state"] == "stopped"
    names = [n for n, _ in events]
    states = [(d["old"], d["new"]) for n, d in events if n == "state"]
    assert states == [("stopped", "starting"), ("starting", "ready")]
    assert names.index("request_start") < names.index("load_start") < names.index("load_end")
    assert names.index("load_end") < names.index("request_end")
    end = dict(events[-1][1])
    assert end["model"] == MODEL and end["route"] == CHAT and end["status"] == 200 and end["ttft"] > 0

    # /metrics: what was sent, counted
    samples = scrape(proxy)
    assert value(samples, "proxy_requests_total", model=MODEL, route=CHAT, status="200") == 3
    assert value(samples, "proxy_requests_total", model=MODEL, route="/api/chat", status="200") == 1
    assert value(samples, "proxy_requests_total", model="", route=CHAT, status="404") == 1
    assert value(samples, "proxy_model_loads_total", model=MODEL) == 1
    assert value(samples, "proxy_model_load_seconds_count", model=MODEL) == 1
    assert value(samples, "proxy_models_loaded") == 1
    assert value(samples, "proxy_model_state", model=MODEL, state="ready") == 1
    assert value(samples, "proxy_model_state", model=MODEL, state="stopped") == 0
    assert value(samples, "proxy_model_memory_bytes", model=MODEL, kind="ram") > 10_000_000
    assert value(samples, "proxy_queue_waiting", model=MODEL) == 0
    assert len(streamed_tokens) == 1  # the stream that asked for its usage got it, once
    # tokens of every answer: the stream without usage, the non-streamed answer, the stream with usage, Ollama's
    expected_tokens = plain_tokens + answer.usage.completion_tokens + sum(streamed_tokens) + reply.eval_count
    assert value(samples, "proxy_generated_tokens_total", model=MODEL) == expected_tokens
    # time to first token: the two streamed requests (the openai SDK ones; the Ollama one was not streamed)
    assert value(samples, "proxy_time_to_first_token_seconds_count", model=MODEL, route=CHAT) == 2
    ttft_counts = [v for (name, _), v in samples.items() if name == "proxy_time_to_first_token_seconds_count"]
    assert sum(ttft_counts) == 2
    assert value(samples, "proxy_request_seconds_count", model=MODEL, route=CHAT) == 3

    # the last requests, as the page reads them
    recent = httpx.get(proxy.url + "/status/requests", headers=ADMIN).json()["requests"]
    assert [(r["route"], r["status"]) for r in recent] == [(CHAT, 200)] * 3 + [("/api/chat", 200), (CHAT, 404)]

    # logs: llama.cpp's own lines while loading, in the tail and in the file
    tail = httpx.get(proxy.url + "/logs/" + MODEL, params={"lines": "1000"}, headers=ADMIN).text
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in tail and "loaded in" in tail
    log_file = proxy.root / "logs" / "smollm2_135m.log"
    on_disk = log_file.read_text()
    assert tail.splitlines()[-1] in on_disk and tail.splitlines()[0] in on_disk

    # an admin unload is counted with its reason
    assert httpx.post(proxy.url + "/unload/" + MODEL, headers=ADMIN, timeout=60).json() == {"unloaded": [MODEL]}
    samples = wait_until(lambda: (s := scrape(proxy)) and value(s, "proxy_models_loaded") == 0 and s)
    assert value(samples, "proxy_model_unloads_total", model=MODEL, reason="admin") == 1
    assert value(samples, "proxy_model_state", model=MODEL, state="stopped") == 1
