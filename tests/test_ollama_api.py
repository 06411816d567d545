"""The Ollama dialect on the real path: the official `ollama` SDK, a live proxy, a real SmolLM2 worker."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import ollama
import pytest

from tests.harness import LiveProxy, gone, wait_until

MODEL = "smollm2:135m"
pytestmark = pytest.mark.real


@pytest.fixture
def client(smollm2_proxy: LiveProxy) -> Iterator[ollama.Client]:
    with ollama.Client(host=smollm2_proxy.url) as c:
        yield c


def test_list_show_version_and_root(client: ollama.Client, smollm2_proxy: LiveProxy) -> None:
    models = client.list().models
    assert [m.model for m in models] == [MODEL]
    details = models[0].details
    assert details is not None and details.format == "gguf" and details.quantization_level == "Q4_1"
    assert details.parameter_size == "135M" and details.family == "llama"
    assert models[0].size and models[0].size > 50_000_000
    shown = client.show("smollm2")
    assert shown.capabilities is not None and "completion" in shown.capabilities
    assert shown.details is not None and shown.details.format == "gguf"
    # the GGUF's own metadata, as Ollama shows it (the configured n_ctx is in /api/ps)
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 8192
    assert "temperature" in (shown.parameters or "")
    version = httpx.get(smollm2_proxy.url + "/api/version").json()["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert httpx.head(smollm2_proxy.url + "/api/version").status_code == 200
    assert httpx.get(smollm2_proxy.url + "/").text == "Ollama is running"
    assert httpx.head(smollm2_proxy.url + "/").status_code == 200


def test_ps_shows_the_loaded_model_with_expiry(client: ollama.Client) -> None:
    client.generate(MODEL, prompt="", keep_alive="3m")  # empty prompt: load only
    running = client.ps().models
    assert [m.model for m in running] == [MODEL]
    entry = running[0]
    assert entry.expires_at is not None and entry.expires_at.tzinfo is not None
    remaining = entry.expires_at - datetime.now(UTC)
    assert timedelta(minutes=2) < remaining <= timedelta(minutes=3, seconds=5)
    assert entry.size and entry.size > 50_000_000 and entry.size_vram == 0


def test_chat_streaming(client: ollama.Client) -> None:
    parts = list(
        client.chat(
            MODEL,
            messages=[{"role": "user", "content": "Count from one to ten."}],
            options={"num_predict": 24},
            stream=True,
        )
    )
    pieces = [p.message.content for p in parts if not p.done]
    assert len([p for p in pieces if p]) > 3
    final = parts[-1]
    assert final.done and final.done_reason in ("stop", "length")
    assert final.eval_count and 0 < final.eval_count <= 24
    assert final.prompt_eval_count and final.prompt_eval_count > 0
    assert final.total_duration and final.eval_duration and final.total_duration >= final.eval_duration > 0
    assert all(not p.done for p in parts[:-1])


def test_chat_non_streaming(client: ollama.Client) -> None:
    reply = client.chat(MODEL, messages=[{"role": "user", "content": "Say hello."}], options={"num_predict": 12})
    assert reply.done and reply.message.role == "assistant" and reply.message.content
    assert reply.eval_count and reply.eval_count <= 12
    assert reply.created_at and reply.created_at.endswith("Z")


def test_generate_streaming_and_options(client: ollama.Client) -> None:
    parts = list(client.generate(MODEL, prompt="Why is the sky blue?", options={"num_predict": 16}, stream=True))
    assert len([p for p in parts if p.response]) > 3 and parts[-1].done
    assert parts[-1].eval_count and parts[-1].eval_count <= 16

    def seeded() -> str | None:
        return client.generate(
            MODEL, prompt="Name an animal.", options={"num_predict": 10, "temperature": 0, "seed": 7}
        ).response

    seeded()  # llama.cpp's numerics differ slightly between a cold prompt and a cached one
    assert seeded() == seeded()


def test_generate_system_and_raw(client: ollama.Client) -> None:
    reply = client.generate(
        MODEL, prompt="What are you?", system="You are a pirate. Answer like one.", options={"num_predict": 16}
    )
    assert reply.response and reply.done
    raw = client.generate(MODEL, prompt="The capital of France is", raw=True, options={"num_predict": 6})
    assert raw.response and raw.done


def test_format_json_and_schema(client: ollama.Client) -> None:
    reply = client.generate(
        MODEL,
        prompt="Describe a cat as JSON with keys name and colour.",
        format="json",
        options={"num_predict": 96, "temperature": 0},
    )
    assert isinstance(json.loads(reply.response or ""), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]}
    reply2 = client.chat(
        MODEL,
        messages=[{"role": "user", "content": "Name a city."}],
        format=schema,
        options={"num_predict": 64, "temperature": 0},
    )
    assert isinstance(json.loads(reply2.message.content or "")["city"], str)


def test_a_real_model_answers_a_request_with_tools(client: ollama.Client) -> None:
    """The real worker takes tools through the Ollama dialect and answers (the translation of tool calls
    both ways is proven on a fake worker, test_lifecycle.py::test_two_tool_calls_at_once_...)."""

    def get_weather(city: str) -> str:
        """Get the weather in a city.

        Args:
            city: the city
        """
        return "sunny"

    reply = client.chat(
        MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[get_weather],
        options={"num_predict": 64},
    )
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.message.content or reply.message.tool_calls
    for call in reply.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    result = client.embed(MODEL, input=["hello world", "goodbye moon"])
    a, b = result.embeddings
    assert len(a) == len(b) > 100 and a != b
    assert math.isclose(math.fsum(x * x for x in a), 1.0, rel_tol=1e-3)
    assert result.prompt_eval_count and result.prompt_eval_count > 0
    single = client.embed(MODEL, input="hello world").embeddings[0]
    assert single == pytest.approx(a, abs=1e-4)
    legacy = client.embeddings(MODEL, prompt="hello world").embedding
    assert list(legacy) == pytest.approx(a, abs=1e-4)


def test_empty_prompt_loads_and_keep_alive_zero_unloads(client: ollama.Client, smollm2_proxy: LiveProxy) -> None:
    loaded = client.generate(MODEL, prompt="")
    assert loaded.done and loaded.done_reason == "load"
    assert [m.model for m in client.ps().models] == [MODEL]
    pid = smollm2_proxy.status()[MODEL]["pid"]
    unloaded = client.chat(MODEL, messages=[], keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert client.ps().models == []
    wait_until(lambda: gone([pid]))


@pytest.mark.parametrize(
    ("value", "shown", "seconds"),
    [(600, "10m", 600), ("5m", "5m", 300), ("1h30m", "1h30m", 5400), ("300", "5m", 300), (42.5, "42.5s", 42.5)],
)
def test_keep_alive_values_set_the_lifetime(
    smollm2_proxy: LiveProxy, value: object, shown: str, seconds: float
) -> None:
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}, "keep_alive": value}
    assert httpx.post(smollm2_proxy.url + "/api/generate", json=body, timeout=60).status_code == 200
    status = smollm2_proxy.status()[MODEL]
    assert status["keep_alive"] == shown
    expires = httpx.get(smollm2_proxy.url + "/api/ps").json()["models"][0]["expires_at"]
    remaining = datetime.fromisoformat(expires.replace("Z", "+00:00")) - datetime.now(UTC)
    assert timedelta(seconds=seconds - 10) < remaining <= timedelta(seconds=seconds + 1)


def test_keep_alive_inside_options_and_forever(smollm2_proxy: LiveProxy) -> None:
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2, "keep_alive": -1}}
    assert httpx.post(smollm2_proxy.url + "/api/generate", json=body, timeout=60).status_code == 200
    assert smollm2_proxy.status()[MODEL]["expires_at"] == "never"
    expires = httpx.get(smollm2_proxy.url + "/api/ps").json()["models"][0]["expires_at"]
    assert datetime.fromisoformat(expires.replace("Z", "+00:00")).year > 2100
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}, "keep_alive": "10m"}
    assert httpx.post(smollm2_proxy.url + "/api/generate", json=body, timeout=60).status_code == 200


def test_keep_alive_zero_unloads_after_the_request(smollm2_proxy: LiveProxy) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"num_predict": 2},
        "keep_alive": 0,
    }
    r = httpx.post(smollm2_proxy.url + "/api/chat", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["done"] is True
    wait_until(lambda: smollm2_proxy.status()[MODEL]["state"] == "stopped", timeout=15)


@pytest.mark.parametrize("value", ["abc", True, {"x": 1}, "5 minutes"])
def test_bad_keep_alive_is_a_400_and_loads_nothing(smollm2_proxy: LiveProxy, value: object) -> None:
    httpx.post(smollm2_proxy.url + "/unload", timeout=60)
    body = {"model": MODEL, "prompt": "hi", "keep_alive": value}
    r = httpx.post(smollm2_proxy.url + "/api/generate", json=body, timeout=60)
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]
    assert smollm2_proxy.status()[MODEL]["state"] == "stopped"


def test_sdk_errors_are_ollama_shaped(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat("no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404 and "no-such-model" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(MODEL, messages=[{"role": "user", "content": "what is this?", "images": [b"\x89PNG fake"]}])
    assert info.value.status_code == 400 and "images" in info.value.error
