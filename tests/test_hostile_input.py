"""Input a hostile client sends, on a live proxy with the real SmolLM2 worker: each is a 4xx in the
caller's dialect naming the problem, never a 500, and the worker keeps running (the same pid)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import psutil
import pytest

from tests.harness import LiveProxy, smollm2_config, wait_until

MODEL = "smollm2:135m"
MSG: Any = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    live = LiveProxy(tmp_path_factory.mktemp("hostile"), [smollm2_config()]).start()
    yield live
    live.stop()


@pytest.fixture
def worker_pid(proxy: LiveProxy) -> Iterator[int]:
    """The worker's pid, loaded before the test; after it, the same worker must still be serving."""
    assert httpx.post(proxy.url + "/load/" + MODEL, timeout=120).status_code == 200
    pid = int(proxy.status()[MODEL]["pid"])
    yield pid
    status = proxy.status()[MODEL]
    assert (status["state"], status["pid"]) == ("ready", pid), proxy.log()[-3000:]


def _tool(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "f", "description": "d", "parameters": parameters}}]


HUGE_SCHEMAS = [
    {"type": "string", "maxLength": 2000},
    {"type": "string", "minLength": 1200},
    {"type": "string", "pattern": "^a{0,3000}$"},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 3000}}},
]


def test_a_schema_llama_cpp_cannot_take_is_a_400_and_the_worker_lives(proxy: LiveProxy, worker_pid: int) -> None:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        for schema in HUGE_SCHEMAS:
            fmt: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, response_format=fmt)
            assert "limits.max_schema_repeat" in str(info.value), info.value
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, tools=_tool(schema))  # type: ignore[arg-type]
            assert "tools[0].function.parameters" in str(info.value)
        # within the limit, a schema still constrains the answer
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 20}}}
        answer = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=16, response_format=fmt)
        assert (answer.choices[0].message.content or "").startswith('"')
    with ollama.Client(host=proxy.url, timeout=120) as oc:
        for schema in [{"type": "string", "maxLength": 10000}, *HUGE_SCHEMAS]:
            with pytest.raises(ollama.ResponseError) as oinfo:
                oc.chat(model=MODEL, messages=MSG, format=schema, options={"num_predict": 4})
            assert oinfo.value.status_code == 400 and "max_schema_repeat" in oinfo.value.error
            with pytest.raises(ollama.ResponseError) as oinfo:
                oc.generate(model=MODEL, prompt="hi", format=schema, options={"num_predict": 4})
            assert oinfo.value.status_code == 400


def _openai_400(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, r.text
    for word in words:
        assert word in r.json()["error"]["message"], r.text


def _ollama_400(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, r.text
    for word in words:
        assert word in r.json()["error"], r.text


def _raw(url: str, text: str) -> httpx.Response:
    return httpx.post(url, content=text.encode(), headers={"content-type": "application/json"}, timeout=60)


def test_bad_values_are_400s_not_500s(proxy: LiveProxy, worker_pid: int) -> None:
    chat, ochat = proxy.url + "/v1/chat/completions", proxy.url + "/api/chat"
    deep = '{"model": "smollm2", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _openai_400(_raw(chat, deep), "deep")
    _ollama_400(_raw(ochat, deep), "deep")
    _openai_400(_raw(chat, '{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}'))
    _ollama_400(_raw(ochat, '{"model": "\\ud800", "messages": []}'))
    big = "1" * 400
    _openai_400(_raw(chat, f'{{"model": "smollm2", "messages": [], "keep_alive": {big}}}'), "keep_alive")
    _ollama_400(httpx.post(ochat, json={"model": MODEL, "messages": MSG, "keep_alive": "1e400"}), "keep_alive")
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": "x"}]}
    _ollama_400(httpx.post(ochat, json={"model": MODEL, "messages": [*MSG, call]}), "tool_calls")
    for bad in ({"logit_bias": [1]}, {"logit_bias": {"x": 1}}):
        _openai_400(httpx.post(chat, json={"model": MODEL, "messages": MSG, **bad}), "logit_bias")
    _openai_400(httpx.post(chat, json={"model": MODEL, "messages": [{"role": "user", "content": [1, 2]}]}), "parts")
    _openai_400(httpx.post(chat, json={"model": MODEL, "messages": [{"role": "user"}]}), "content")


def test_a_keep_alive_beyond_any_date_is_forever_and_listings_still_work(proxy: LiveProxy, worker_pid: int) -> None:
    with ollama.Client(host=proxy.url, timeout=120) as client:
        client.chat(model=MODEL, messages=MSG, keep_alive=3e11, options={"num_predict": 2})
        (model,) = client.ps().models
        assert model.expires_at is not None and model.expires_at.year >= 2300  # Ollama's "forever"
    assert proxy.status()[MODEL]["expires_at"] == "never"
    assert httpx.get(proxy.url + "/v1/models").status_code == 200


def test_the_device_is_what_llama_cpp_was_built_for(proxy: LiveProxy, worker_pid: int) -> None:
    import llama_cpp

    expected = "gpu" if llama_cpp.llama_supports_gpu_offload() else "cpu"
    assert smollm2_config()["model"]["n_gpu_layers"] == -1  # asks for every layer on a GPU
    assert proxy.status()[MODEL]["worker"]["device"] == expected


def test_a_crashed_worker_is_not_said_to_ignore_sigterm(proxy: LiveProxy) -> None:
    assert httpx.post(proxy.url + "/load/" + MODEL, timeout=120).status_code == 200
    psutil.Process(int(proxy.status()[MODEL]["pid"])).send_signal(signal.SIGKILL)
    wait_until(lambda: proxy.status()[MODEL]["state"] == "stopped", timeout=30)
    wait_until(lambda: "exited" in proxy.log() or "died" in proxy.log() or "-9" in proxy.log(), timeout=30)
    assert "ignored SIGTERM" not in proxy.log()


def test_what_schemathesis_found_is_a_400_and_the_worker_lives(proxy: LiveProxy, worker_pid: int) -> None:
    """Each case tests/test_fuzz_real.py found answering 500, sent once on the real path."""
    completions = proxy.url + "/v1/completions"
    for prompt in ("", [""]):  # llama.cpp had no token to start from: an AssertionError in the worker
        _openai_400(httpx.post(completions, json={"model": MODEL, "prompt": prompt}, timeout=60), "prompt", "empty")
    # an empty string to embed: llama_decode failed on the empty batch and left the heap corrupt, so the
    # worker aborted (exit -6) on a later request
    embeddings, embed = proxy.url + "/v1/embeddings", proxy.url + "/api/embed"
    _openai_400(httpx.post(embeddings, json={"model": MODEL, "input": ""}, timeout=60), "empty")
    _ollama_400(httpx.post(embed, json={"model": MODEL, "input": ["hi", ""]}, timeout=60), "empty")
    # and the worker refuses it on its own (a client of the worker other than this proxy's checks)
    socket = psutil.Process(worker_pid).cmdline()
    socket_path = socket[socket.index("--socket") + 1]
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://worker", timeout=60) as worker:
        for _ in range(2):  # twice: the first would have corrupted the heap, the second would have aborted
            r = worker.post("/v1/embeddings", json={"model": MODEL, "input": ["hi", ""]})
            assert r.status_code == 400 and "no tokens" in r.json()["error"]["message"], r.text
        assert worker.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}).status_code == 200
