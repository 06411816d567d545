"""Anthropic's Messages API on the real path: the official `anthropic` SDK, a live proxy, a real SmolLM2
worker; a recording fake worker for what SmolLM2 does not do reliably (calling tools) and for breakage."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.harness import LiveProxy, fake_config, smollm2_config, wait_until

MODEL = "smollm2:135m"
MakeProxy = Callable[..., LiveProxy]
WEATHER = {
    "name": "get_weather",
    "description": "Get the weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}
ASK: Any = [{"role": "user", "content": "Weather and time in Paris?"}]


@pytest.fixture
def client(smollm2_proxy: LiveProxy) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=smollm2_proxy.url, api_key="unused", max_retries=0) as c:
        yield c


SDK = Callable[..., anthropic.Anthropic]


@pytest.fixture
def sdk() -> Iterator[SDK]:
    """An `anthropic` SDK client for a live proxy (no retries), closed after the test."""
    clients: list[anthropic.Anthropic] = []

    def make(proxy: LiveProxy, **kw: Any) -> anthropic.Anthropic:
        clients.append(anthropic.Anthropic(base_url=proxy.url, max_retries=0, **({"api_key": "unused"} | kw)))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def test_messages_create(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "Say hello."}], extra_body={"temperature": 0}
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.id.startswith("msg_")
    assert len(msg.content) == 1 and msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 16


def test_messages_stream_text_and_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL,
        max_tokens=24,
        system="You are terse.",
        messages=[{"role": "user", "content": "Count from one to ten."}],
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len([p for p in pieces if p]) > 3  # it really streamed, piece by piece
    assert final.content[0].type == "text" and final.content[0].text == "".join(pieces)
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.input_tokens > 0 and 0 < final.usage.output_tokens <= 24


def test_raw_stream_has_anthropic_events_in_order(smollm2_proxy: LiveProxy) -> None:
    body = {"model": MODEL, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", smollm2_proxy.url + "/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}


def test_a_stop_sequence_ends_the_answer_and_is_named(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model=MODEL,
        max_tokens=48,
        extra_body={"temperature": 0},
        stop_sequences=[" "],
        messages=[{"role": "user", "content": "Write a sentence about the sea."}],
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == " "
    assert msg.content[0].type == "text" and " " not in msg.content[0].text


def test_structured_output_follows_the_schema(client: anthropic.Anthropic) -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}},
        "required": ["city"],
    }
    msg = client.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "Name a city."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body={"temperature": 0},
    )
    assert msg.content[0].type == "text" and isinstance(json.loads(msg.content[0].text)["city"], str)


def test_count_tokens_is_the_prompt_the_model_reads(client: anthropic.Anthropic) -> None:
    kw: Any = {
        "model": MODEL,
        "system": "Answer in French.",
        "messages": [{"role": "user", "content": "What is the capital of Italy?"}],
    }
    counted = client.messages.count_tokens(**kw).input_tokens
    usage = client.messages.create(max_tokens=1, **kw).usage
    used = usage.input_tokens + (usage.cache_read_input_tokens or 0)  # Anthropic's input_tokens leave out cache reads
    assert counted == used > 10
    longer = client.messages.count_tokens(
        model=MODEL, system="Answer in French.", messages=[{"role": "user", "content": "What is the capital of Spain?"}]
    ).input_tokens
    assert longer == counted  # one word for another, same length
    more = client.messages.count_tokens(
        model=MODEL, messages=[*kw["messages"], {"role": "assistant", "content": "Rome."}, *kw["messages"]]
    ).input_tokens
    assert more > counted


def test_a_tool_round_trip_on_the_real_model(client: anthropic.Anthropic) -> None:
    """A tool definition, a tool_use from the assistant and its tool_result go to the real model, which
    answers; whatever it says, tool calls it makes are well-formed tool_use blocks."""
    messages: Any = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 24 C"}]},
    ]
    msg = client.messages.create(model=MODEL, max_tokens=32, tools=[WEATHER], messages=messages)  # type: ignore[list-item]
    assert msg.stop_reason in ("end_turn", "max_tokens", "tool_use") and msg.content
    for block in msg.content:
        assert block.type in ("text", "tool_use")
        if block.type == "tool_use":
            assert block.name == "get_weather" and isinstance(block.input, dict)


def test_parallel_tool_calls_both_ways_through_a_recording_worker(
    make_proxy: MakeProxy, tmp_path: Path, sdk: SDK
) -> None:
    """Two tool calls streamed in interleaved pieces come back as two tool_use blocks whose inputs arrive as
    input_json_delta; the tools and the results fed back reach the worker in OpenAI's shape."""
    record = tmp_path / "bodies.jsonl"
    proxy = make_proxy([fake_config("tooly", "--tool-calls", "--record", str(record))])
    client = sdk(proxy)
    deltas: list[tuple[int, str]] = []
    with client.messages.stream(model="tooly", max_tokens=64, tools=[WEATHER, TIME], messages=ASK) as stream:  # type: ignore[list-item]
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                deltas.append((event.index, event.delta.partial_json))
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    calls = [(b.id, b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert [(name, args) for _, name, args in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert [i for i, _ in deltas] == sorted(i for i, _ in deltas)  # one block at a time
    assert json.loads("".join(p for i, p in deltas if i == 0)) == {"city": "Paris"}
    whole = client.messages.create(model="tooly", max_tokens=64, tools=[WEATHER, TIME], messages=ASK)  # type: ignore[list-item]
    assert [(b.name, b.input) for b in whole.content if b.type == "tool_use"] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    # the results go back: tool_use blocks become tool calls, tool_result blocks tool messages
    back: Any = [
        *ASK,
        {"role": "assistant", "content": [{"type": "tool_use", "id": i, "name": n, "input": a} for i, n, a in calls]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": calls[0][0], "content": "sunny"},
                {"type": "tool_result", "tool_use_id": calls[1][0], "content": [{"type": "text", "text": "noon"}]},
            ],
        },
    ]
    client.messages.create(model="tooly", max_tokens=4, messages=back)
    sent = [json.loads(line)["body"] for line in record.read_text().splitlines()]
    fn = {"name": "get_weather", "parameters": WEATHER["input_schema"], "description": WEATHER["description"]}
    assert sent[0]["tools"][0] == {"type": "function", "function": fn}
    last = sent[-1]["messages"]
    assert last[-3]["tool_calls"] == [
        {"id": calls[0][0], "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": calls[1][0], "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
    ]
    assert last[-2:] == [
        {"role": "tool", "tool_call_id": calls[0][0], "content": "sunny"},
        {"role": "tool", "tool_call_id": calls[1][0], "content": "noon"},
    ]


def test_unknown_model_is_a_not_found_error_in_anthropic_shape(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert info.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model 'no-such-model' not found"},
    }


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"max_tokens": 5, "messages": "hi"}, "messages"),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "document",
        ),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
                        ],
                    }
                ],
            },
            "images",
        ),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "keep_alive": "soon"}, "keep_alive"),
    ],
)
def test_bad_input_is_a_400_in_anthropic_shape(smollm2_proxy: LiveProxy, body: dict[str, Any], word: str) -> None:
    r = httpx.post(smollm2_proxy.url + "/v1/messages", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400
    err = r.json()
    assert (
        err["type"] == "error" and err["error"]["type"] == "invalid_request_error" and word in err["error"]["message"]
    )


def test_not_json_and_unknown_method_answer_in_anthropic_shape(smollm2_proxy: LiveProxy) -> None:
    r = httpx.post(smollm2_proxy.url + "/v1/messages", content=b"{nope", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(smollm2_proxy.url + "/v1/messages", timeout=30)
    assert r.status_code == 405 and r.json()["type"] == "error"


def test_models_list_in_anthropic_shape_when_asked_by_an_anthropic_client(
    client: anthropic.Anthropic, smollm2_proxy: LiveProxy
) -> None:
    models = list(client.models.list())
    assert [(m.id, m.type, m.display_name) for m in models] == [(MODEL, "model", MODEL)]
    assert models[0].max_input_tokens == 2048 and models[0].created_at.year >= 2024
    assert client.models.retrieve("smollm2").id == MODEL  # aliases resolve
    with pytest.raises(anthropic.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    plain = httpx.get(smollm2_proxy.url + "/v1/models", timeout=30).json()  # an OpenAI client: OpenAI's list
    assert plain["object"] == "list" and plain["data"][0]["object"] == "model"


def test_keys_from_x_api_key_or_bearer(make_proxy: MakeProxy, sdk: SDK) -> None:
    proxy = make_proxy([fake_config("fake")], tokens={"api_key": ["user-key"], "admin_key": ["admin-key"]})
    ask: Any = {"model": "fake", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    assert sdk(proxy, api_key="user-key").messages.create(**ask).content[0].text
    bearer = sdk(proxy, api_key=None, auth_token="user-key")
    assert bearer.messages.count_tokens(model="fake", messages=ask["messages"]).input_tokens == 1  # via usage
    with pytest.raises(anthropic.AuthenticationError) as info:
        sdk(proxy, api_key="user-key2").messages.create(**ask)
    assert info.value.status_code == 401 and info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    r = httpx.get(proxy.url + "/v1/models", headers={"anthropic-version": "2023-06-01", "x-api-key": "no"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_keep_alive_at_the_top_level_sets_the_lifetime(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")])
    ask = {"model": "fake", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(proxy.url + "/v1/messages", json={**ask, "keep_alive": "7m"}, timeout=60)
    assert r.status_code == 200 and proxy.status()["fake"]["keep_alive"] == "7m"
    r = httpx.post(proxy.url + "/v1/messages", json={**ask, "stream": True, "keep_alive": 0}, timeout=60)
    assert r.status_code == 200 and "message_stop" in r.text
    wait_until(lambda: proxy.status()["fake"]["state"] == "stopped", timeout=15)


def test_a_worker_dying_mid_stream_ends_it_with_an_error_event(make_proxy: MakeProxy, sdk: SDK) -> None:
    proxy = make_proxy([fake_config("crashy", "--tokens", "50", "--crash-after", "5")])
    with pytest.raises(anthropic.APIStatusError) as info:
        with sdk(proxy).messages.stream(model="crashy", max_tokens=50, messages=ASK) as stream:
            for _ in stream:
                pass
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_a_stop_sequence_across_chunks_stops_the_worker(make_proxy: MakeProxy, sdk: SDK) -> None:
    """The fake streams "tok " pieces: "k t" spans two of them; the answer ends before it."""
    proxy = make_proxy([fake_config("fake", "--tokens", "40")])
    msg = sdk(proxy).messages.create(model="fake", max_tokens=40, stop_sequences=["k t"], messages=ASK)
    assert (msg.content[0].text, msg.stop_reason, msg.stop_sequence) == ("to", "stop_sequence", "k t")  # type: ignore[union-attr]


def test_the_real_model_is_served_through_messages_with_its_config(make_proxy: MakeProxy, sdk: SDK) -> None:
    """A proxy of its own with keys: x-api-key reaches the real worker."""
    proxy = make_proxy([smollm2_config()], tokens={"api_key": ["k1"]})
    msg = sdk(proxy, api_key="k1").messages.create(
        model="smollm2", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
    )
    assert msg.model == MODEL and msg.usage.output_tokens > 0


def test_what_claude_code_sends_reaches_the_worker(make_proxy: MakeProxy, tmp_path: Path) -> None:
    """Claude Code 2.1's request, shape for shape (``?beta=true``, ``anthropic-beta``, ``system`` blocks with
    cache_control, a system message after the user's, thinking, context_management, output_config.effort,
    metadata, server tools): answered; the worker sees the client tools and one leading system message."""
    record = tmp_path / "bodies.jsonl"
    proxy = make_proxy([fake_config("fake", "--record", str(record))], tokens={"api_key": ["k1"]})
    body = {
        "model": "fake",
        "max_tokens": 32000,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            {"type": "text", "text": "Be helpful."},
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "<env>Working directory: /tmp</env>"},
        ],
        "tools": [
            {**WEATHER, "cache_control": {"type": "ephemeral"}},
            {"type": "web_search_20250305", "name": "web_search"},
            {"type": "bash_20250124", "name": "bash"},
            {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
        ],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_1_account__session_2"},
        "service_tier": "auto",
        "container": None,
        "stream": True,
    }
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27",
        "authorization": "Bearer k1",
    }
    for stream in (True, False):
        r = httpx.post(
            proxy.url + "/v1/messages?beta=true", json={**body, "stream": stream}, headers=headers, timeout=60
        )
        assert r.status_code == 200, r.text
    sent = [json.loads(line)["body"] for line in record.read_text().splitlines()]
    for worker_body in sent:
        assert [t["function"]["name"] for t in worker_body["tools"]] == ["get_weather"]
        assert worker_body["messages"] == [
            {"role": "system", "content": "You are Claude Code.\nBe helpful."},
            {"role": "user", "content": "hi\n\n<system>\n<env>Working directory: /tmp</env>\n</system>"},
        ]


def test_a_system_message_mid_conversation_on_the_real_model(client: anthropic.Anthropic) -> None:
    """SmolLM2's template reads the folded conversation (the strict template's case: test_dialect_blocks)."""
    messages: Any = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Again."},
        {"role": "system", "content": "Be polite."},
    ]
    msg = client.messages.create(model=MODEL, max_tokens=8, messages=messages, extra_body={"temperature": 0})
    assert msg.content and msg.content[0].type == "text" and msg.usage.output_tokens > 0
    counted = client.messages.count_tokens(model=MODEL, messages=messages)
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) == counted.input_tokens
