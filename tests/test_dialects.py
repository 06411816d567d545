"""Pure translation between Ollama's and OpenAI's dialects (no I/O): requests one way, chunks the other."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.dialects import ollama as d
from proxy.errors import BadRequest


def test_chat_request_translates_options_format_tools_and_tool_messages() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
        ],
        "options": {
            "num_predict": 12,
            "temperature": 0.1,
            "top_k": 5,
            "stop": ["\n"],
            "seed": 3,
            "num_ctx": 99,
            "mirostat": 2,
        },
        "format": "json",
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    }
    out = d.chat_request(body, "m")
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert (out["max_tokens"], out["temperature"], out["top_k"], out["stop"], out["seed"]) == (12, 0.1, 5, ["\n"], 3)
    assert out["mirostat_mode"] == 2 and "num_ctx" not in out
    assert out["response_format"] == {"type": "json_object"}
    assert out["tools"] == body["tools"]
    call = out["messages"][1]["tool_calls"][0]
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert out["messages"][2] == {"role": "tool", "content": "sunny", "name": "get_weather"}


def test_schema_format_and_unlimited_num_predict() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = d.chat_request({"messages": [], "format": schema, "options": {"num_predict": -1}}, "m")
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    assert "max_tokens" not in out


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [], "options": {"num_predict": "5"}}, "num_predict"),
        ({"messages": [], "options": {"temperature": "hot"}}, "temperature"),
        ({"messages": [], "options": "fast"}, "options"),
        ({"messages": [], "format": 3}, "format"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "images": "AAAA"}]}, "images"),
    ],
)
def test_bad_fields_are_named(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        d.chat_request(body, "m")
    assert field in info.value.message


def test_generate_request_templated_raw_and_images() -> None:
    path, out = d.generate_request({"prompt": "hi", "system": "be brief"}, "m")
    assert path == "/v1/chat/completions"
    assert out["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path, out = d.generate_request({"prompt": "raw text", "raw": True}, "m")
    assert path == "/v1/completions" and out["prompt"] == "raw text"
    _, out = d.generate_request({"prompt": "what", "images": ["QUJD"]}, "m")
    parts = out["messages"][-1]["content"]
    assert parts[1]["image_url"]["url"] == "data:image/png;base64,QUJD"


def chunk(content: str | None = None, finish: str | None = None, tool: dict[str, Any] | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if tool is not None:
        delta["tool_calls"] = [tool]
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_stream_translator_chat() -> None:
    tr = d.StreamTranslator("m", generate=False, started_ns=1_000, load_ns=100)
    assert tr.feed(chunk(), 1_500) is None  # the role-only first chunk
    first = tr.feed(chunk("Hel"), 2_000)
    assert first is not None and first["message"] == {"role": "assistant", "content": "Hel"} and not first["done"]
    tr.feed(chunk("lo"), 3_000)
    tr.feed(chunk(finish="length"), 3_500)
    tr.feed({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}, 3_600)
    final = tr.final(4_000, whole=True)
    assert final["message"]["content"] == "Hello" and final["done"] is True and final["done_reason"] == "length"
    assert (final["prompt_eval_count"], final["eval_count"]) == (7, 2)
    assert final["total_duration"] == 3_000 and final["load_duration"] == 100
    assert final["prompt_eval_duration"] == 900 and final["eval_duration"] == 2_000
    assert final["created_at"].endswith("Z")
    assert tr.final(4_000, whole=False)["message"]["content"] == ""


def test_stream_translator_collects_tool_call_deltas() -> None:
    tr = d.StreamTranslator("m", generate=False, started_ns=0)
    tr.feed(chunk(tool={"index": 0, "function": {"name": "get_weather", "arguments": '{"ci'}}), 1)
    tr.feed(chunk(tool={"index": 0, "function": {"arguments": 'ty": "Paris"}'}}), 2)
    tr.feed(chunk(finish="tool_calls"), 3)
    final = tr.final(4, whole=False)
    assert final["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert final["done_reason"] == "stop"


def test_stream_translator_generate_and_completion_chunks() -> None:
    tr = d.StreamTranslator("m", generate=True, started_ns=0)
    out = tr.feed({"choices": [{"index": 0, "text": "abc", "finish_reason": None}]}, 1)
    assert out is not None and out["response"] == "abc"
    assert tr.final(2, whole=True)["response"] == "abc"


def test_load_and_embed_responses() -> None:
    assert d.load_response("m", generate=True, unload=False)["done_reason"] == "load"
    assert d.load_response("m", generate=False, unload=True)["message"]["content"] == ""
    result = d.embed_response(
        "m",
        {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}], "usage": {"prompt_tokens": 4}},
        10,
        5,
    )
    assert result["embeddings"] == [[1.0], [2.0]] and result["prompt_eval_count"] == 4
