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


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"messages": [], "options": "fast"}, "'options' must be an object", "options"),
        (
            {"messages": [], "options": {"num_predict": "5"}},
            "'options.num_predict' must be an integer",
            "options.num_predict",
        ),
        (
            {"messages": [], "options": {"num_predict": True}},
            "'options.num_predict' must be an integer",
            "options.num_predict",
        ),
        ({"messages": [], "options": {"stop": "\n"}}, "'options.stop' must be an array of strings", "options.stop"),
        ({"messages": [], "options": {"stop": ["a", 1]}}, "'options.stop' must be an array of strings", "options.stop"),
        ({"messages": [], "options": {"top_k": False}}, "'options.top_k' must be a number", "options.top_k"),
        (
            {"messages": [], "options": {"temperature": "hot"}},
            "'options.temperature' must be a number",
            "options.temperature",
        ),
        ({"messages": [], "format": 3}, "'format' must be \"json\" or a JSON schema object", "format"),
        ({"messages": [], "format": "yaml"}, "'format' must be \"json\" or a JSON schema object", "format"),
        ({"messages": "hi"}, "'messages' must be an array", "messages"),
        ({"messages": ["hi"]}, "'messages[0]' must be an object", "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "'messages[0].content' must be a string", "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "x", "images": "AAAA"}]},
            "'messages[1].images' must be an array of base64 strings",
            "messages[1].images",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "images": ["AAAA", 1]}]},
            "'messages[0].images' must be an array of base64 strings",
            "messages[0].images",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": {"function": {}}}]},
            "'messages[0].tool_calls' must be an array",
            "messages",
        ),
        ({"messages": [], "tools": {"type": "function"}}, "'tools' must be an array of tools, got dict", "tools"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
            "'messages[0].tool_calls[0]' must be an object with 'function': {'name', 'arguments'}",
            "messages",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": ["not a call"]}]},
            "'messages[0].tool_calls[0]' must be an object with 'function': {'name', 'arguments'}",
            "messages",
        ),
    ],
)
def test_bad_chat_fields_get_a_clear_message_and_param(body: dict[str, Any], message: str, param: str) -> None:
    with pytest.raises(BadRequest) as info:
        d.chat_request(body, "m")
    assert (info.value.message, info.value.param) == (message, param)


def test_chat_request_exactly() -> None:
    body = {
        "messages": [
            {"role": "system", "content": None},
            {"role": "user", "content": "look", "images": ["QUJD", "REVG"]},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "function": {"name": "f", "arguments": {"x": 1}}},
                    {"function": {"name": "g"}},
                ],
            },
            {"role": "tool", "content": "r"},
        ],
        "options": {"num_predict": 0, "top_p": 0.5, "stop": [], "num_ctx": 4096, "mirostat_tau": 5},
        "format": "",
        "tools": [],
    }
    assert d.chat_request(body, "m") == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 0,
        "top_p": 0.5,
        "stop": [],
        "mirostat_tau": 5,
        "messages": [
            {"role": "system", "content": ""},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,REVG"}},
                ],
            },
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                    {"id": "call_2_1", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "content": "r"},
        ],
    }
    assert d.chat_request({"messages": [], "options": None}, "m") == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [],
    }


def test_generate_request_exactly() -> None:
    body = {"prompt": "what", "images": ["QUJD"], "options": {"seed": 1}, "format": "json"}
    assert d.generate_request(body, "m") == (
        "/v1/chat/completions",
        {
            "model": "m",
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": 1,
            "response_format": {"type": "json_object"},
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                    ],
                }
            ],
        },
    )
    path, out = d.generate_request({"system": ""}, "m")  # no prompt: an empty one; an empty system: none
    assert path == "/v1/chat/completions" and out["messages"] == [{"role": "user", "content": ""}]
    path, out = d.generate_request({"raw": True, "system": "ignored"}, "m")
    assert path == "/v1/completions" and out["prompt"] == "" and "messages" not in out
    with pytest.raises(BadRequest) as info:
        d.generate_request({"prompt": "x", "images": "QUJD"}, "m")
    assert (info.value.message, info.value.param) == ("'images' must be an array of base64 strings", "images")
    with pytest.raises(BadRequest) as info:
        d.generate_request({"prompt": 5}, "m")
    assert info.value.param == "prompt"
    with pytest.raises(BadRequest) as info:
        d.generate_request({"prompt": "x", "system": 5}, "m")
    assert info.value.param == "system"


def test_stream_translator_generate_final_and_counts_without_usage() -> None:
    tr = d.StreamTranslator("m", generate=True, started_ns=100, load_ns=10)
    assert tr.feed({"choices": [{"index": 0, "text": "", "finish_reason": None}]}, 150) is None
    assert tr.feed({"usage": {"prompt_tokens": None}, "choices": None}, 160) is None
    piece = tr.feed({"choices": [{"index": 0, "text": "a", "finish_reason": None}]}, 200)
    assert piece is not None and piece["model"] == "m" and piece["done"] is False and "message" not in piece
    tr.feed({"choices": [{"index": 0, "text": "b", "finish_reason": "stop"}]}, 300)
    final = tr.final(400, whole=True)
    assert final["response"] == "ab" and "message" not in final and final["model"] == "m"
    # no usage from the worker: the pieces are counted
    assert (final["prompt_eval_count"], final["eval_count"], final["done_reason"]) == (0, 2, "stop")
    assert (final["total_duration"], final["load_duration"]) == (300, 10)
    assert (final["prompt_eval_duration"], final["eval_duration"]) == (90, 200)
    assert tr.final(400, whole=False)["response"] == ""


def test_stream_translator_final_without_any_text() -> None:
    tr = d.StreamTranslator("m", generate=False, started_ns=100, load_ns=500)
    final = tr.final(400, whole=True)
    assert final["message"] == {"role": "assistant", "content": ""}  # no tool_calls key without calls
    assert (final["prompt_eval_duration"], final["eval_duration"], final["eval_count"]) == (0, 0, 0)


def test_stream_translator_tool_calls_by_index_and_bad_arguments() -> None:
    tr = d.StreamTranslator("m", generate=False, started_ns=0)
    tr.feed(chunk(tool={"index": 1, "function": {"name": "second", "arguments": "{bad"}}), 1)
    tr.feed(chunk(tool={"function": {"name": "first"}}), 2)  # no index: the first call
    tr.feed(chunk(tool={"index": 2, "function": None}), 3)
    assert tr.final(4, whole=False)["message"]["tool_calls"] == [
        {"function": {"name": "first", "arguments": {}}},
        {"function": {"name": "second", "arguments": {"_raw": "{bad"}}},
        {"function": {"name": "", "arguments": {}}},
    ]


def test_created_at_is_rfc3339_utc_with_microseconds() -> None:
    assert d.rfc3339(0) == "1970-01-01T00:00:00.000000Z"
    assert d.rfc3339(1_700_000_000.25) == "2023-11-14T22:13:20.250000Z"
    assert d.rfc3339().endswith("Z") and len(d.rfc3339()) == 27


def test_load_and_embed_responses_exactly() -> None:
    def without_time(out: dict[str, Any]) -> dict[str, Any]:
        assert out.pop("created_at").endswith("Z")
        return out

    assert without_time(d.load_response("m", generate=True, unload=False)) == {
        "model": "m",
        "response": "",
        "done_reason": "load",
        "done": True,
    }
    assert without_time(d.load_response("m", generate=False, unload=True)) == {
        "model": "m",
        "message": {"role": "assistant", "content": ""},
        "done_reason": "unload",
        "done": True,
    }
    assert d.embed_response("m", {"data": [{"embedding": [1.0]}]}, 10, 5) == {
        "model": "m",
        "embeddings": [[1.0]],
        "total_duration": 10,
        "load_duration": 5,
        "prompt_eval_count": 0,
    }
    assert d.embed_response("m", {}, 1, 0)["embeddings"] == []
