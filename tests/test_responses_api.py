"""OpenAI's Responses API on the real path: the official `openai` SDK, a live proxy, a real SmolLM2 worker;
a recording fake worker for tool calls (SmolLM2 does not call tools reliably) and for breakage."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.harness import LiveProxy, fake_config

MODEL = "smollm2:135m"
MakeProxy = Callable[..., LiveProxy]
OpenAIFor = Callable[..., openai.OpenAI]
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME: Any = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}


@pytest.fixture
def client(smollm2_proxy: LiveProxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=smollm2_proxy.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_responses_create(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Say hello.", instructions="Be brief.", max_output_tokens=16)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage is not None and r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 16
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"


def test_streamed_with_stream_true(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(model=MODEL, input="Count from one to ten.", max_output_tokens=24, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3  # it really streamed
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == "".join(deltas)
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == done.text and final.usage is not None and final.usage.output_tokens <= 24


def test_streamed_with_the_stream_helper(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL,
        input=[{"role": "user", "content": "Reply with the single word: yes"}],
        max_output_tokens=200,
        temperature=0,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas) != ""


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}},
        "required": ["city"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=MODEL,
        input="Name a city.",
        max_output_tokens=64,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
    )
    assert isinstance(json.loads(r.output_text)["city"], str)


def test_a_function_tool_and_its_output_fed_back_on_the_real_model(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 24 C"},
        ],
        tools=[WEATHER],
        max_output_tokens=32,
    )
    assert r.status in ("completed", "incomplete") and r.output
    for item in r.output:
        assert item.type in ("message", "function_call")
        if item.type == "function_call":
            assert item.name == "get_weather" and isinstance(json.loads(item.arguments), dict)


def test_function_calls_both_ways_through_a_recording_worker(
    make_proxy: MakeProxy, tmp_path: Path, openai_for: OpenAIFor
) -> None:
    """Two calls streamed in interleaved pieces come back as two function_call items (streamed: argument
    deltas per item); fed back with their outputs, they reach the worker as tool calls and tool messages."""
    record = tmp_path / "bodies.jsonl"
    proxy = make_proxy([fake_config("tooly", "--tool-calls", "--record", str(record))])
    client = openai_for(proxy)
    ask: Any = [{"role": "user", "content": "Weather and time in Paris?"}]
    r = client.responses.create(model="tooly", input=ask, tools=[WEATHER, TIME])
    calls = [(i.call_id, i.name, i.arguments) for i in r.output if i.type == "function_call"]
    assert [(n, json.loads(a)) for _, n, a in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    with client.responses.stream(model="tooly", input=ask, tools=[WEATHER, TIME]) as stream:
        deltas: dict[int, str] = {}
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas[event.output_index] = deltas.get(event.output_index, "") + event.delta
        final = stream.get_final_response()
    streamed = [(i.name, json.loads(i.arguments)) for i in final.output if i.type == "function_call"]
    assert streamed == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert [json.loads(deltas[i]) for i in sorted(deltas)] == [args for _, args in streamed]
    back: Any = [
        *ask,
        *[{"type": "function_call", "call_id": c, "name": n, "arguments": a} for c, n, a in calls],
        {"type": "function_call_output", "call_id": calls[0][0], "output": "sunny"},
        {"type": "function_call_output", "call_id": calls[1][0], "output": "noon"},
    ]
    client.responses.create(model="tooly", input=back, max_output_tokens=4)
    sent = [json.loads(line)["body"] for line in record.read_text().splitlines()]
    assert sent[0]["tools"][0] == {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER["parameters"], "description": WEATHER["description"]},
    }
    last = sent[-1]["messages"]
    assert [c["id"] for c in last[-3]["tool_calls"]] == [calls[0][0], calls[1][0]]
    assert last[-2:] == [
        {"role": "tool", "tool_call_id": calls[0][0], "content": "sunny"},
        {"role": "tool", "tool_call_id": calls[1][0], "content": "noon"},
    ]


def test_previous_response_id_is_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    assert info.value.status_code == 400 and info.value.param == "previous_response_id"
    assert "previous_response_id" in info.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"input": "hi", "max_output_tokens": "many"}, "max_output_tokens"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
        ({"input": "hi", "keep_alive": "soon"}, "keep_alive"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}]}
                ]
            },
            "messages",
        ),
    ],
)
def test_bad_input_is_a_400_in_openai_shape(smollm2_proxy: LiveProxy, body: dict[str, Any], param: str) -> None:
    r = httpx.post(smollm2_proxy.url + "/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="no-such-model", input="hi")
    assert "no-such-model" in info.value.message


def test_keep_alive_and_a_worker_dying_mid_stream(make_proxy: MakeProxy, openai_for: OpenAIFor) -> None:
    proxy = make_proxy([fake_config("fake"), fake_config("crashy", "--tokens", "50", "--crash-after", "5")])
    r = httpx.post(proxy.url + "/v1/responses", json={"model": "fake", "input": "hi", "keep_alive": "9m"}, timeout=60)
    assert r.status_code == 200 and proxy.status()["fake"]["keep_alive"] == "9m"
    events = list(openai_for(proxy).responses.create(model="crashy", input="hi", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None and events[-1].response.error.code == "server_error"
    assert "went away" in events[-1].response.error.message or "ended" in events[-1].response.error.message
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "tok " * 5
