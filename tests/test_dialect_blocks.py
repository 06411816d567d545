"""Pure translation for the Anthropic and Responses dialects (no I/O): requests one way, chunks the other,
chunk by chunk; the block planner and the stop-sequence scanner they share."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.dialects import anthropic as a
from proxy.dialects import responses as r
from proxy.dialects.blocks import StopScanner
from proxy.errors import BadRequest


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def call(index: int, args: str, name: str | None = None, id_: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if name is not None:
        c["function"]["name"] = name
        c["id"], c["type"] = id_ or f"call_{index}", "function"
    return {"tool_calls": [c]}


# -- Anthropic requests ----------------------------------------------------------------------------


def test_messages_request_translates_system_blocks_tools_and_tool_results() -> None:
    body = {
        "model": "m",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
        "tools": [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any"},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_k": 4,
        "metadata": {"user_id": "u"},
    }
    out, stops = a.messages_request(body, "m")
    assert stops == ["END"] and "stop" not in out  # the proxy watches for them itself
    assert (out["max_tokens"], out["temperature"], out["top_k"], out["stream"]) == (50, 0.2, 4, True)
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    fn = {"name": "get_weather", "parameters": {"type": "object"}, "description": "weather"}
    assert out["tools"] == [{"type": "function", "function": fn}]
    assert out["tool_choice"] == "required"


def test_tool_choice_forms_and_error_results() -> None:
    base: dict[str, Any] = {"max_tokens": 5, "tools": [{"name": "t"}], "messages": [{"role": "user", "content": "x"}]}
    out, _ = a.messages_request({**base, "tool_choice": {"type": "tool", "name": "t"}}, "m")
    assert out["tool_choice"] == {"type": "function", "function": {"name": "t"}}
    out, _ = a.messages_request({**base, "tool_choice": {"type": "none"}}, "m")
    assert "tools" not in out and "tool_choice" not in out
    failed = {"type": "tool_result", "tool_use_id": "t1", "content": "boom", "is_error": True}
    out, _ = a.messages_request({**base, "messages": [{"role": "user", "content": [failed]}]}, "m")
    assert out["messages"] == [{"role": "tool", "tool_call_id": "t1", "content": "Error: boom"}]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "name": "t", "input": {}}]}]}, "messages"),
        ({"system": 5}, "system"),
        ({"tools": [{"name": "t"}], "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_messages_requests_name_the_field(change: dict[str, Any], field: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], **change}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(BadRequest) as info:
        a.messages_request(body, "m")
    assert info.value.param == field


# a chat template that takes one system message, first (as Qwen3's does): any other raises
STRICT_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and not loop.first %}{{ raise_exception('System message must be at the beginning.') }}"
    "{%- endif %}<|{{ m.role }}|>{{ m.content }}\n"
    "{%- endfor %}"
)


def _render(messages: list[dict[str, Any]]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    template = ImmutableSandboxedEnvironment().from_string(STRICT_TEMPLATE)
    return template.render(messages=messages, raise_exception=raise_exception)


def test_system_messages_anywhere_become_one_leading_system_message_and_marked_blocks() -> None:
    """Claude Code's body: ``system`` blocks, then its environment notes as a system message after the user's
    turn; later system messages join the nearest user turn as <system> blocks, so a strict template renders it."""
    body = {
        "max_tokens": 5,
        "system": [{"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "system", "content": "Leading note."},
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": [{"type": "text", "text": "Env: linux."}]},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ok"},
            {"role": "system", "content": "Last word."},
        ],
    }
    out, _ = a.messages_request(body, "m")
    assert out["messages"] == [
        {"role": "system", "content": "You are an agent.\n\nLeading note."},
        {"role": "user", "content": "hi\n\n<system>\nEnv: linux.\n</system>"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "<system>\nBe brief.\n</system>\n\nbye"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "<system>\nLast word.\n</system>"},
    ]
    assert _render(out["messages"]).count("<|system|>") == 1
    # Claude Code's own shape: the system message right after the user's, last
    cc = {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "Env."}]}
    out, _ = a.messages_request(cc, "m")
    assert out["messages"] == [{"role": "user", "content": "hi\n\n<system>\nEnv.\n</system>"}]
    _render(out["messages"])


def test_the_responses_input_folds_system_and_developer_messages_the_same_way() -> None:
    body = {
        "instructions": "You are Codex.",
        "input": [
            {"role": "developer", "content": [{"type": "input_text", "text": "Sandbox: none."}]},
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": "Env."},
            {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "done"},
        ],
    }
    out = r.responses_request(body, "m")
    assert out["messages"] == [
        {"role": "system", "content": "You are Codex.\n\nSandbox: none."},
        {"role": "user", "content": "hi\n\n<system>\nEnv.\n</system>"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "shell", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    _render(out["messages"])


def test_what_agents_send_is_accepted_and_server_tools_are_left_out() -> None:
    """Claude Code 2.1's fields: thinking, context_management, output_config.effort, metadata, service_tier,
    container, cache_control everywhere, server tools and their blocks in the history."""
    body: dict[str, Any] = {
        "max_tokens": 32000,
        "messages": [
            {"role": "user", "content": "search"},
            {
                "role": "assistant",
                "content": [
                    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
                    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                    {"type": "text", "text": "found"},
                ],
            },
            {"role": "user", "content": "thanks"},
        ],
        "tools": [
            {"name": "Read", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
            {"type": "bash_20250124", "name": "bash"},
            {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
            {"type": "code_execution_20250825", "name": "code_execution"},
        ],
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_abc"},
        "service_tier": "auto",
        "container": "container_1",
        "stream": True,
    }
    out, _ = a.messages_request(body, "m")
    assert [t["function"]["name"] for t in out["tools"]] == ["Read"]
    assert out["messages"][1] == {"role": "assistant", "content": "found"}
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}):
        a.messages_request({**body, "thinking": thinking}, "m")
    only_server = {**body, "tools": body["tools"][1:]}
    assert "tools" not in a.messages_request(only_server, "m")[0]


def test_images_translate() -> None:
    """(Refused without vision by the gate: tests/test_gate.py.)"""
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}}
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]}
    out, _ = a.messages_request(body, "m")
    parts = out["messages"][0]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}


# -- Anthropic answers, chunk by chunk ---------------------------------------------------------------


def test_a_text_answer_streams_as_anthropic_events_in_order() -> None:
    tr = a.MessageStream("m", [])
    names = [n for n, _ in tr.start()]
    assert names == ["message_start", "ping"]
    first = tr.feed(chunk({"role": "assistant", "content": "Hel"}))
    assert [n for n, _ in first] == ["content_block_start", "content_block_delta"]
    assert first[0][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert first[1][1]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert tr.feed(chunk({"content": "lo"}))[0][1]["delta"]["text"] == "lo"
    assert tr.feed(chunk({}, "stop")) == []
    assert tr.feed(USAGE) == []
    end = tr.finish()
    assert [n for n, _ in end] == ["content_block_stop", "message_delta", "message_stop"]
    assert end[1][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert end[1][1]["usage"] == {
        "input_tokens": 7,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 3,
    }
    msg = tr.message()
    assert msg["content"] == [{"type": "text", "text": "Hello"}] and msg["stop_reason"] == "end_turn"


def test_tool_calls_stream_as_tool_use_blocks_with_input_json_deltas() -> None:
    tr = a.MessageStream("m", [])
    tr.start()
    events = tr.feed(chunk({"content": "Sure."}))
    events += tr.feed(chunk(call(0, "", "get_weather", "c0")))
    events += tr.feed(chunk(call(0, '{"city": ')))
    events += tr.feed(chunk(call(0, '"Paris"}')))
    events += tr.feed(chunk({}, "tool_calls"))
    events += tr.finish()
    kinds = [(n, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type")) for n, d in events]
    assert kinds[:7] == [
        ("content_block_start", 0, "text"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
    ]
    assert events[3][1]["content_block"] == {"type": "tool_use", "id": "c0", "name": "get_weather", "input": {}}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert tr.message()["content"][1] == {
        "type": "tool_use",
        "id": "c0",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }


def test_interleaved_parallel_calls_close_each_block_before_the_next() -> None:
    tr = a.MessageStream("m", [])
    events = tr.feed(chunk(call(0, "", "a")))
    events += tr.feed(chunk(call(1, "", "b")))
    events += tr.feed(chunk(call(0, '{"x": 1}')))
    events += tr.feed(chunk(call(1, '{"y": 2}')))
    events += tr.finish()
    open_blocks: set[int] = set()
    for name, data in events:  # never two blocks open at once; a block gets nothing after its stop
        if name == "content_block_start":
            assert not open_blocks
            open_blocks.add(data["index"])
        elif name == "content_block_delta":
            assert open_blocks == {data["index"]}
        elif name == "content_block_stop":
            open_blocks.remove(data["index"])
    assert [b["input"] for b in tr.message()["content"]] == [{"x": 1}, {"y": 2}]


def test_a_stop_sequence_across_chunks_ends_the_answer_before_it() -> None:
    tr = a.MessageStream("m", ["END"])
    out = tr.feed(chunk({"content": "one two E"}))
    assert "".join(d["delta"]["text"] for n, d in out if n == "content_block_delta") == "one two "
    assert not tr.done
    assert tr.feed(chunk({"content": "ND three"})) == []
    assert tr.done
    end = tr.finish()
    assert end[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert tr.message()["content"] == [{"type": "text", "text": "one two "}]


def test_held_back_text_is_sent_when_no_stop_sequence_comes() -> None:
    tr = a.MessageStream("m", ["END"])
    tr.feed(chunk({"content": "the E"}))
    tr.feed(chunk({}, "length"))
    end = tr.finish()
    assert end[0][1]["delta"] == {"type": "text_delta", "text": "E"}
    assert tr.message()["stop_reason"] == "max_tokens" and tr.message()["content"][0]["text"] == "the E"


def test_anthropic_error_types_and_model_list() -> None:
    assert a.error_body(404, "no")["error"] == {"type": "not_found_error", "message": "no"}
    assert [a.error_type(s) for s in (400, 401, 403, 413, 415, 429, 500, 503)] == [
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "request_too_large",
        "invalid_request_error",
        "rate_limit_error",
        "api_error",
        "overloaded_error",
    ]
    listed = a.model_list([a.model_info("x", 0, 2048), a.model_info("y", 0, None)])
    assert (listed["first_id"], listed["last_id"], listed["has_more"]) == ("x", "y", False)
    assert listed["data"][0] == {
        "type": "model",
        "id": "x",
        "display_name": "x",
        "created_at": "1970-01-01T00:00:00Z",
        "lifecycle": "active",
        "max_input_tokens": 2048,
    }


def test_prompt_tokens_the_worker_reused_are_cache_reads_in_both_dialects() -> None:
    """OpenAI's prompt_tokens_details.cached_tokens: Anthropic's cache_read_input_tokens (input_tokens the
    rest: their sum is the prompt), the Responses API's input_tokens_details.cached_tokens (of input_tokens)."""
    usage = {
        "choices": [],
        "usage": {"prompt_tokens": 70, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 60}},
    }
    tr = a.MessageStream("m", [])
    tr.feed(chunk({"content": "hi"}, "stop"))
    tr.feed(usage)
    tr.finish()
    assert tr.message()["usage"] == {
        "input_tokens": 10,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 60,
        "output_tokens": 3,
    }
    rs = r.ResponseStream("m", {"input": "hi"}, 0)
    rs.feed(chunk({"content": "hi"}, "stop"))
    rs.feed(usage)
    rs.finish()
    assert rs.response()["usage"]["input_tokens"] == 70
    assert rs.response()["usage"]["input_tokens_details"] == {"cached_tokens": 60}


def test_a_prompt_too_long_is_worded_as_anthropic_words_it() -> None:
    from proxy.errors import ContextLengthExceeded

    exc = ContextLengthExceeded(25000, 20480)
    assert a.error_message(exc) == "prompt is too long: 25000 tokens > 20480 maximum"
    assert exc.message.startswith("This model's maximum context length is 20480 tokens. However, your messages")
    assert (exc.status, exc.code) == (400, "context_length_exceeded")


# -- Responses requests ------------------------------------------------------------------------------


def test_responses_request_translates_items_tools_and_format() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Use tools."},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
        ],
        "tools": [
            {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
            {"type": "web_search"},
            {"type": "custom", "name": "apply_patch"},
        ],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 30,
        "temperature": 0.5,
        "text": {"format": {"type": "json_schema", "name": "city", "schema": schema}},
        "store": False,
        "include": ["reasoning.encrypted_content"],
    }
    out = r.responses_request(body, "m")
    assert out["messages"] == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
    ]
    assert out["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert (out["max_tokens"], out["temperature"]) == (30, 0.5)
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input"),
        ({"input": [{"type": "computer_call_output"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"tools": [{"type": "function", "name": "t"}], "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_bad_responses_requests_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        r.responses_request({"model": "m", "input": "hi", **change}, "m")
    assert info.value.param == field


# -- Responses answers, chunk by chunk ----------------------------------------------------------------


def test_a_text_answer_streams_as_numbered_typed_events() -> None:
    tr = r.ResponseStream("m", {"input": "hi"}, 1000.0)
    events = tr.start()
    events += tr.feed(chunk({"role": "assistant", "content": "Hel"}))
    events += tr.feed(chunk({"content": "lo"}))
    events += tr.feed(chunk({}, "stop"))
    events += tr.feed(USAGE)
    events += tr.finish()
    assert [n for n, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert all(n == d["type"] for n, d in events)
    item_id = events[2][1]["item"]["id"]
    assert {d["item_id"] for _, d in events[3:8]} == {item_id} == {events[8][1]["item"]["id"]}
    assert {(d["output_index"], d.get("content_index")) for _, d in events[3:8]} == {(0, 0)}
    assert events[6][1]["text"] == "Hello"
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["id"] == tr.id
    assert final["output"] == [
        {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}],
        }
    ]
    assert final["usage"]["input_tokens"] == 7 and final["usage"]["output_tokens"] == 3


def test_function_calls_stream_as_items_with_argument_deltas_and_length_is_incomplete() -> None:
    tr = r.ResponseStream("m", {"input": "hi"}, 0)
    events = tr.feed(chunk(call(0, "", "get_weather", "c0")))
    events += tr.feed(chunk(call(0, '{"city": "Paris"}')))
    events += tr.feed(chunk({}, "length"))
    events += tr.finish()
    assert [n for n, _ in events] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    added = events[0][1]["item"]
    assert (added["type"], added["call_id"], added["name"], added["arguments"]) == (
        "function_call",
        "c0",
        "get_weather",
        "",
    )
    assert events[2][1]["arguments"] == '{"city": "Paris"}' and events[2][1]["name"] == "get_weather"
    final = events[-1][1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["arguments"] == '{"city": "Paris"}'


def test_a_broken_stream_fails_the_response() -> None:
    tr = r.ResponseStream("m", {"input": "hi"}, 0)
    tr.feed(chunk({"content": "par"}))
    name, data = tr.failed("worker_unavailable", "gone")[0]
    assert name == "response.failed"
    assert data["response"]["status"] == "failed"
    assert data["response"]["error"] == {"code": "worker_unavailable", "message": "gone"}


# -- the stop scanner --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "stop"),
    [
        (["abc", "def"], ["cd"], "ab", "cd"),
        (["a", "b", "c"], ["bc", "abx"], "a", "bc"),
        (["xxEN", "Dyy"], ["END", "NDy"], "xx", "END"),
        (["hello"], [], "hello", None),
        (["EEEN", "D"], ["END"], "EE", "END"),
    ],
)
def test_the_stop_scanner_finds_the_first_stop_across_pieces(
    pieces: list[str], stops: list[str], sent: str, stop: str | None
) -> None:
    scanner = StopScanner(stops)
    out = ""
    found = None
    for piece in pieces:
        text, found = scanner.feed(piece)
        out += text
        if found:
            break
    else:
        out += scanner.flush()
    assert (out, found) == (sent, stop)


def test_json_of_events_is_compact_sse() -> None:
    from proxy.dialects.blocks import sse

    frame = sse("ping", {"type": "ping"})
    assert frame == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert json.loads(frame.split(b"data: ")[1]) == {"type": "ping"}
