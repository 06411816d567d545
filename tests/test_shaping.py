"""Checks and per-model defaults every generation request goes through (proxy/dialects/shaping.py),
in-process: what a client sends that is refused, with which message and param, and what is passed on.
The same checks through a live proxy, in each dialect, are in test_bad_input.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.config import ModelConfig
from proxy.dialects import shaping
from proxy.errors import BadRequest, UnsupportedInput
from tests.test_manager import model as manager_model


def model(**kw: Any) -> ModelConfig:
    """A chat model's config (the manager tests' builder, with a chat capability)."""
    return manager_model(kw.pop("name", "m"), **{"capabilities": ("chat",), **kw})


def refused(call: Any, *args: Any) -> tuple[str, str | None]:
    with pytest.raises(BadRequest) as info:
        call(*args)
    return info.value.message, info.value.param


def test_model_is_required_and_a_string() -> None:
    assert shaping.require_model({"model": "m"}) == "m"
    assert refused(shaping.require_model, {}) == ("'model' is required", "model")
    assert refused(shaping.require_model, {"model": ""}) == ("'model' is required", "model")
    assert refused(shaping.require_model, {"model": 5}) == ("'model' must be a string, got int", "model")


def test_optional_fields_are_typed() -> None:
    assert shaping.optional({}, "n", int, "an integer") is None
    assert shaping.optional({"n": 2}, "n", int, "an integer") == 2
    assert refused(shaping.optional, {"n": True}, "n", int, "an integer") == (
        "'n' must be an integer, got a boolean",
        "n",
    )
    assert refused(shaping.optional, {"n": "2"}, "n", int, "an integer") == ("'n' must be an integer, got str", "n")
    assert shaping.optional({"s": False}, "s", bool, "a boolean") is False
    assert shaping.optional({"s": True}, "s", (bool, str), "a flag") is True
    assert refused(shaping.optional, {"t": True}, "t", (int, float), "a number") == (
        "'t' must be a number, got a boolean",
        "t",
    )


def test_messages_are_checked_one_by_one() -> None:
    cfg = model()
    ok = [{"role": r, "content": "x"} for r in ("system", "developer", "user", "assistant", "tool", "function")]
    assert shaping.check_messages(ok, cfg) is ok
    assert shaping.check_messages([{"role": "user", "content": [{"type": "text", "text": "x"}]}], cfg)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert shaping.check_messages([{"role": "assistant", "content": None, "tool_calls": [call]}], cfg)
    assert refused(shaping.check_messages, [{"role": "assistant", "content": None}], cfg) == (
        "'messages[0].content' is required",
        "messages",
    )
    assert refused(shaping.check_messages, [{"role": "user", "content": ["x"]}], cfg) == (
        "'messages[0].content' parts must be objects with a 'type' (text, image_url)",
        "messages",
    )
    must = "'messages' must be a non-empty array of messages"
    assert refused(shaping.check_messages, [], cfg) == (must, "messages")
    assert refused(shaping.check_messages, {"role": "user"}, cfg) == (must, "messages")
    assert refused(shaping.check_messages, [ok[0], "hi"], cfg) == ("'messages[1]' must be an object", "messages")
    assert refused(shaping.check_messages, [{"role": "bot", "content": "x"}], cfg) == (
        "'messages[0].role' must be one of assistant, developer, function, system, tool, user, got 'bot'",
        "messages",
    )
    assert refused(shaping.check_messages, [ok[0], {"role": "user", "content": 5}], cfg) == (
        "'messages[1].content' must be a string or an array of parts",
        "messages",
    )


@pytest.mark.parametrize("kind", ["image_url", "input_image", "image"])
def test_images_need_a_vision_model(kind: str) -> None:
    messages = [
        {"role": "user", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": kind}]},
    ]
    with pytest.raises(UnsupportedInput) as info:
        shaping.check_messages(messages, model(name="plain"))
    assert info.value.message == "model 'plain' cannot read images (messages[1] has one); configure a vision model"
    assert info.value.param == "messages"
    assert shaping.check_messages(messages, model(vision=True)) is messages


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_model_defaults_sampling_and_system_prompt(utc: None) -> None:
    cfg = model(sampling={"temperature": 0.2, "top_k": 5}, system="Be brief.")
    body: dict[str, Any] = {"temperature": 0.9, "messages": [{"role": "user", "content": "hi"}]}
    shaping.apply_model_defaults(body, cfg)
    assert body == {
        "temperature": 0.9,  # the request wins
        "top_k": 5,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    }
    for own in ("system", "developer"):  # the client's own system prompt wins
        body = {"messages": [{"role": own, "content": "mine"}]}
        shaping.apply_model_defaults(body, cfg)
        assert body["messages"] == [{"role": own, "content": "mine"}]
    body = {"prompt": "no messages"}
    shaping.apply_model_defaults(body, model(system="s"))
    assert body == {"prompt": "no messages"}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    shaping.apply_model_defaults(body, model())
    assert body == {"messages": [{"role": "user", "content": "hi"}]}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    shaping.apply_model_defaults(body, model(system="Be brief.", system_time=True), clock_time=86400 * 365)
    assert body["messages"][0] == {
        "role": "system",
        "content": "Be brief.\n\nThe current date and time is Friday, 1971-01-01 00:00 UTC.",
    }


def test_common_fields() -> None:
    assert shaping.check_common({}) is False
    assert shaping.check_common({"stream": True, "temperature": 1, "top_p": 0.5, "n": 1, "stop": "x"}) is True
    assert shaping.check_common({"stop": ["a", "b"], "tools": [], "response_format": {}, "stream_options": {}}) is False
    cases = [
        ({"stream": "yes"}, ("'stream' must be a boolean, got str", "stream")),
        ({"top_p": "1"}, ("'top_p' must be a number, got str", "top_p")),
        ({"presence_penalty": True}, ("'presence_penalty' must be a number, got a boolean", "presence_penalty")),
        ({"frequency_penalty": []}, ("'frequency_penalty' must be a number, got list", "frequency_penalty")),
        ({"max_tokens": 1.5}, ("'max_tokens' must be an integer, got float", "max_tokens")),
        (
            {"max_completion_tokens": "9"},
            ("'max_completion_tokens' must be an integer, got str", "max_completion_tokens"),
        ),
        ({"n": 1.0}, ("'n' must be an integer, got float", "n")),
        ({"seed": "1"}, ("'seed' must be an integer, got str", "seed")),
        ({"top_k": 2.5}, ("'top_k' must be an integer, got float", "top_k")),
        ({"stop": 5}, ("'stop' must be a string or an array of strings", "stop")),
        ({"stop": ["a", 5]}, ("'stop' must be a string or an array of strings", "stop")),
        ({"tools": {}}, ("'tools' must be an array of tools, got dict", "tools")),
        ({"response_format": "json"}, ("'response_format' must be an object, got str", "response_format")),
        ({"stream_options": []}, ("'stream_options' must be an object, got list", "stream_options")),
    ]
    for body, expected in cases:
        assert refused(shaping.check_common, body) == expected


def test_prompt_encoding_format_and_embedding_input() -> None:
    body: dict[str, Any] = {"prompt": ["one"]}
    shaping.check_prompt(body)
    assert body == {"prompt": "one"}
    body = {"prompt": "text"}
    shaping.check_prompt(body)
    assert body == {"prompt": "text"}
    assert refused(shaping.check_prompt, {"prompt": 5}) == ("'prompt' must be a string", "prompt")
    assert refused(shaping.check_prompt, {"prompt": ["a", 5]}) == ("'prompt' must be a string", "prompt")
    many = ("'prompt' as an array must hold exactly one string here", "prompt")
    assert refused(shaping.check_prompt, {"prompt": ["a", "b"]}) == many
    assert refused(shaping.check_prompt, {"prompt": []}) == many
    empty = ("'prompt' must not be empty", "prompt")  # found by schemathesis: the worker answered 500
    assert refused(shaping.check_prompt, {"prompt": ""}) == empty
    assert refused(shaping.check_prompt, {"prompt": [""]}) == empty

    for fmt in ("float", "base64", None):
        body = {"input": "x", "encoding_format": fmt}
        assert shaping.pop_encoding_format(body) == fmt and body == {"input": "x"}
    assert refused(shaping.pop_encoding_format, {"encoding_format": "hex"}) == (
        '\'encoding_format\' must be "float" or "base64"',
        "encoding_format",
    )

    assert shaping.check_embedding_input("a") == ["a"]
    assert shaping.check_embedding_input(["a", "b"]) == ["a", "b"]
    for bad in ([], ["a", 1], 5, None):
        assert refused(shaping.check_embedding_input, bad) == (
            "'input' must be a string or a non-empty array of strings",
            "input",
        )
    assert refused(shaping.check_embedding_input, 5, "prompt")[1] == "prompt"
    # found by schemathesis: an empty string has no token, and llama.cpp's worker aborted on it
    assert refused(shaping.check_embedding_input, "") == (
        "'input' must not hold an empty string (item 0 is empty)",
        "input",
    )
    assert refused(shaping.check_embedding_input, ["a", ""])[0].endswith("(item 1 is empty)")
