"""Input a hostile client sends, on a live proxy with the real SmolLM2 worker: each is a 4xx in the
caller's dialect naming the problem, never a 500, and the worker keeps running (the same pid)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import anthropic
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


FORCE_F: Any = {"type": "function", "function": {"name": "f"}}  # only a forced tool's schema becomes a grammar


def _tool(parameters: Any) -> Any:
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
                client.chat.completions.create(
                    model=MODEL,
                    messages=MSG,
                    max_tokens=4,
                    tools=_tool(schema),
                    tool_choice=FORCE_F,
                )
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


def test_schema_caps_hold_on_the_anthropic_and_responses_routes_too(proxy: LiveProxy, worker_pid: int) -> None:
    """Issue 25, defect 6: a schema over the limits, as Anthropic's output_config.format or tools' input_schema
    and as the Responses API's text.format or tools' parameters, reached llama.cpp and killed the worker; now
    every dialect passes the same gate. A 30,000-value enum (issue 26: 4.4 s a token) is refused at once."""
    huge: Any = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5000}}}
    enum: Any = {"type": "object", "properties": {"v": {"enum": [f"value {i}" for i in range(30_000)]}}}
    with anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0, timeout=120) as client:
        for schema, limit in ((huge, "max_schema_repeat"), (enum, "max_schema_bytes")):
            with pytest.raises(anthropic.BadRequestError) as info:
                client.messages.create(
                    model=MODEL,
                    max_tokens=4,
                    messages=MSG,
                    extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}},
                )
            assert "'output_config.format'" in str(info.value) and limit in str(info.value), info.value
            with pytest.raises(anthropic.BadRequestError) as info:
                client.messages.create(
                    model=MODEL,
                    max_tokens=4,
                    messages=MSG,
                    tools=[{"name": "f", "input_schema": schema}],
                    tool_choice={"type": "tool", "name": "f"},
                )
            assert "'tools[0].input_schema'" in str(info.value) and limit in str(info.value), info.value
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=120) as oc:
        for schema, limit in ((huge, "max_schema_repeat"), (enum, "max_schema_bytes")):
            fmt: Any = {"format": {"type": "json_schema", "name": "x", "schema": schema}}
            with pytest.raises(openai.BadRequestError) as oinfo:
                oc.responses.create(model=MODEL, input="hi", max_output_tokens=16, text=fmt)
            assert "'text.format'" in str(oinfo.value) and limit in str(oinfo.value), oinfo.value
            tool: Any = {"type": "function", "name": "f", "parameters": schema}
            with pytest.raises(openai.BadRequestError) as oinfo:
                oc.responses.create(
                    model=MODEL,
                    input="hi",
                    max_output_tokens=16,
                    tools=[tool],
                    tool_choice={"type": "function", "name": "f"},
                )
            assert "'tools (function 'f').parameters'" in str(oinfo.value), oinfo.value
            with pytest.raises(openai.BadRequestError) as oinfo:
                oc.chat.completions.create(
                    model=MODEL,
                    messages=MSG,
                    max_tokens=4,
                    tools=_tool(schema),
                    tool_choice=FORCE_F,
                )
            assert limit in str(oinfo.value)
        # a tool that is not forced is only text in the prompt (Claude Code's maxLength 524288): served
        agent: Any = {"type": "object", "properties": {"content": {"type": "string", "maxLength": 524288}}}
        served = oc.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, tools=_tool(agent))
        assert served.choices[0].finish_reason in ("stop", "length", "tool_calls")
        # an enum within the limits still constrains the answer
        small: Any = {"type": "object", "properties": {"v": {"enum": ["red", "green"]}}, "required": ["v"]}
        answer = oc.responses.create(
            model=MODEL,
            input="Pick a colour.",
            max_output_tokens=16,
            text={"format": {"type": "json_schema", "name": "x", "schema": small}},
        )
        assert json.loads(answer.output_text)["v"] in ("red", "green")


def test_too_many_embedding_inputs_are_400s_and_a_large_answer_comes_back_whole(
    proxy: LiveProxy, worker_pid: int
) -> None:
    """Issue 26: at most limits.max_embedding_inputs (2048) inputs a request, in OpenAI's and Ollama's shape;
    a few hundred inputs make an answer over largejson.LARGE_BYTES, which is decoded and reshaped in pieces."""
    for n in (2049, 3000):
        r = httpx.post(proxy.url + "/v1/embeddings", json={"model": MODEL, "input": ["hi"] * n}, timeout=60)
        _openai_400(r, f"{n} inputs", "limits.max_embedding_inputs")
        r = httpx.post(proxy.url + "/api/embed", json={"model": MODEL, "input": ["hi"] * n}, timeout=60)
        _ollama_400(r, f"{n} inputs", "limits.max_embedding_inputs")
    texts = [f"text number {i}" for i in range(300)]
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
        as_base64 = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64
        as_floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    with ollama.Client(host=proxy.url, timeout=300) as oc:
        embedded = oc.embed(model=MODEL, input=texts)
    assert len(as_base64.data) == len(as_floats.data) == len(embedded.embeddings) == 300
    assert len(json.dumps([d.embedding for d in as_floats.data])) > 1024 * 1024  # over largejson.LARGE_BYTES
    for i in (0, 150, 299):
        floats = as_floats.data[i].embedding
        assert as_base64.data[i].embedding == pytest.approx(floats, rel=1e-6, abs=1e-6)
        assert list(embedded.embeddings[i]) == pytest.approx(floats, rel=1e-6, abs=1e-6)
    assert as_floats.data[0].embedding != as_floats.data[1].embedding


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
