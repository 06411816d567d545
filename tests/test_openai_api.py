"""The OpenAI dialect on the real path: the official `openai` SDK, a live proxy, a real SmolLM2 worker."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest

from tests.harness import LiveProxy

MODEL = "smollm2:135m"
pytestmark = pytest.mark.real


@pytest.fixture
def client(smollm2_proxy: LiveProxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=smollm2_proxy.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert MODEL in ids
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL
    extra = model.model_extra or {}
    assert isinstance(extra["loaded"], bool) and extra["kind"] == "llm"
    assert client.models.retrieve("smollm2").id == MODEL  # aliases resolve
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert "no-such-model" in str(info.value)


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0, seed=1
    )
    assert reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 0
    assert client.models.retrieve(MODEL).model_extra["loaded"] is True  # type: ignore[index]


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    finish = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 3  # it really streamed, chunk by chunk
    assert finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 24 and usage.prompt_tokens > 0


def test_same_seed_same_text(client: openai.OpenAI) -> None:
    def ask() -> str | None:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=12,
            temperature=0.9,
            seed=42,
        )
        return r.choices[0].message.content

    ask()  # llama.cpp's numerics differ slightly between a cold prompt and a cached one: warm it first
    assert ask() == ask()


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text
    stream = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=8, stream=True)
    texts = [c.choices[0].text for c in stream if c.choices]
    assert len([t for t in texts if t]) > 1


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL, input=["hello world", "goodbye moon"])
    assert [d.index for d in result.data] == [0, 1]
    a, b = (d.embedding for d in result.data)
    assert len(a) == len(b) > 100
    assert math.isclose(math.fsum(x * x for x in a), 1.0, rel_tol=1e-3)
    assert a != b
    single = client.embeddings.create(model=MODEL, input="hello world")
    assert single.data[0].embedding == pytest.approx(a, abs=1e-4)


def test_embeddings_as_float_or_base64(client: openai.OpenAI, smollm2_proxy: LiveProxy) -> None:
    """The SDK asks for base64 unless told otherwise; "float" gives JSON numbers: the same vector."""
    packed = client.embeddings.create(model=MODEL, input="hello world")  # base64, decoded by the SDK
    floats = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(packed.data[0].embedding, rel=1e-5, abs=1e-7)
    body = {"model": MODEL, "input": ["hello world"]}
    raw = {
        fmt: httpx.post(smollm2_proxy.url + "/v1/embeddings", json={**body, "encoding_format": fmt}, timeout=60).json()[
            "data"
        ][0]["embedding"]
        for fmt in ("float", "base64")
    }
    assert isinstance(raw["float"], list) and all(isinstance(x, float) for x in raw["float"])
    decoded = struct.unpack(f"<{len(raw['float'])}f", base64.b64decode(raw["base64"]))  # little-endian float32
    assert list(decoded) == pytest.approx(raw["float"], rel=1e-6, abs=1e-7)
    refused = httpx.post(smollm2_proxy.url + "/v1/embeddings", json={**body, "encoding_format": "int8"}, timeout=60)
    assert refused.status_code == 400 and "encoding_format" in refused.json()["error"]["message"]


def test_json_mode_returns_json(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with a key name and a short value."}],
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "x",
                "schema": {
                    "type": "object",
                    "properties": {"name": {"type": "string", "maxLength": 12}},
                    "required": ["name"],
                },
            },
        },
        max_tokens=64,
        temperature=0,
    )
    data = json.loads(reply.choices[0].message.content or "")
    assert isinstance(data["name"], str)


def test_a_real_model_answers_a_request_with_tools(client: openai.OpenAI) -> None:
    """The real worker takes OpenAI's tools and answers (SmolLM2 seldom calls one: the translation of
    tool calls both ways is proven on a fake worker, test_lifecycle.py::test_two_tool_calls_at_once_...)."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,  # type: ignore[arg-type]
        max_tokens=48,
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls and all(c.type == "function" for c in choice.message.tool_calls)
    else:
        assert choice.message.content


def test_keep_alive_accepted_on_v1(smollm2_proxy: LiveProxy) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "keep_alive": "7m"}
    assert httpx.post(smollm2_proxy.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert smollm2_proxy.status()[MODEL]["keep_alive"] == "7m"
    body["keep_alive"] = "10m"
    assert httpx.post(smollm2_proxy.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_streaming_headers_say_do_not_buffer(smollm2_proxy: LiveProxy) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", smollm2_proxy.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"


def test_images_refused_for_a_text_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ],
        )
    assert "cannot read images" in str(info.value)


async def test_the_usage_chunk_the_proxy_asked_for_is_dropped_however_the_bytes_are_cut() -> None:
    # the worker's stream cut at every byte, and in one piece: the client gets the same events, less the
    # usage-only chunk; a content chunk that mentions "completion_tokens" in its text is kept
    from proxy.api.openai import _without_usage

    events = [
        b'data: {"id":"a","choices":[{"index":0,"delta":{"content":"Hi \\"completion_tokens\\""}}]}\n\n',
        b'data: {"id":"a","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b'data: {"id":"a","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n',
        b"data: [DONE]\n\n",
    ]
    wanted = events[0] + events[1] + events[3]
    whole = b"".join(events)

    async def cut(size: int) -> list[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(whole), size):
                yield whole[i : i + size]

        return [c async for c in _without_usage(chunks())]

    for size in (1, 7, 64, len(whole)):
        out = await cut(size)
        assert b"".join(out) == wanted, size
        assert all(c.endswith(b"\n\n") for c in out), size  # only whole events go on
