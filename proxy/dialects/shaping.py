"""Validation and shaping of canonical (OpenAI-format) request bodies: pure functions.

Both dialects end here: the Ollama side translates first, then the same checks and the same
per-model defaults (sampling, system prompt) apply.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from proxy.config import ModelConfig
from proxy.errors import BadRequest, UnsupportedInput

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_SAMPLING_NAMES = {"num_predict": "max_tokens"}  # a model YAML's sampling keys in Ollama's words


def require_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise BadRequest("'model' is required", param="model")
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {type(model).__name__}", param="model")
    return model


def optional(body: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"'{key}' must be {what}, got a boolean", param=key)
    if not isinstance(value, kinds):
        raise BadRequest(f"'{key}' must be {what}, got {type(value).__name__}", param=key)
    return value


def _has_image(content: Any) -> bool:
    if isinstance(content, list):
        return any(isinstance(p, dict) and p.get("type") in ("image_url", "input_image", "image") for p in content)
    return False


def check_messages(messages: Any, cfg: ModelConfig) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of messages", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object", param="messages")
        role = message.get("role")
        if role not in _ROLES:
            raise BadRequest(
                f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}, got {role!r}", param="messages"
            )
        content = message.get("content")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise BadRequest(f"'messages[{i}].content' is required", param="messages")
        if content is not None and not isinstance(content, str | list):
            raise BadRequest(f"'messages[{i}].content' must be a string or an array of parts", param="messages")
        if isinstance(content, list) and not all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
        ):
            raise BadRequest(
                f"'messages[{i}].content' parts must be objects with a 'type' (text, image_url)", param="messages"
            )
        if _has_image(content) and not cfg.vision:
            raise UnsupportedInput(
                f"model '{cfg.name}' cannot read images (messages[{i}] has one); configure a vision model",
                param="messages",
            )
    return messages


def _system_prompt(cfg: ModelConfig, clock_time: float | None) -> str | None:
    if cfg.system is None:
        return None
    text = cfg.system
    if cfg.system_time:
        now = time.localtime(clock_time)
        text = f"{text}\n\nThe current date and time is {time.strftime('%A, %Y-%m-%d %H:%M %Z', now)}."
    return text


def apply_model_defaults(body: dict[str, Any], cfg: ModelConfig, clock_time: float | None = None) -> None:
    """Sampling defaults from the model's YAML (the request wins) and its system prompt. The answer's cap
    is ``max_tokens`` (Ollama's name ``num_predict`` too), used when the request sends no cap of its own."""
    for key, value in cfg.sampling.items():
        key = _SAMPLING_NAMES.get(key, key)
        if key == "max_tokens" and body.get("max_completion_tokens") is not None:
            continue
        body.setdefault(key, value)
    messages = body.get("messages")
    if isinstance(messages, list):
        system = _system_prompt(cfg, clock_time)
        if system and not any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
            body["messages"] = [{"role": "system", "content": system}, *messages]


def check_common(body: Mapping[str, Any]) -> bool:
    """Checks every generation body shares; returns ``stream``."""
    stream = optional(body, "stream", bool, "a boolean")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        optional(body, key, (int, float), "a number")
    for key in ("max_tokens", "max_completion_tokens", "n", "seed", "top_k"):
        optional(body, key, int, "an integer")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise BadRequest("'stop' must be a string or an array of strings", param="stop")
    logit_bias = optional(body, "logit_bias", dict, "an object of token ids to numbers")
    if logit_bias is not None and not all(
        k.lstrip("-").isascii() and k.lstrip("-").isdigit() and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in logit_bias.items()
    ):
        raise BadRequest("'logit_bias' must map token ids to numbers", param="logit_bias")
    optional(body, "tools", list, "an array of tools")
    optional(body, "response_format", dict, "an object")
    optional(body, "stream_options", dict, "an object")
    return bool(stream)


def check_prompt(body: dict[str, Any]) -> None:
    """A completion's prompt: a string, or an array of exactly one (which becomes that string)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
        raise BadRequest("'prompt' must be a string", param="prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest("'prompt' as an array must hold exactly one string here", param="prompt")
        body["prompt"] = prompt[0]
    if body["prompt"] == "":
        # llama.cpp has no token to start from (an AssertionError in the worker)
        raise BadRequest("'prompt' must not be empty", param="prompt")


def pop_encoding_format(body: dict[str, Any]) -> str | None:
    """OpenAI's embeddings ``encoding_format`` (float or base64), taken out of the body."""
    fmt: str | None = optional(body, "encoding_format", str, "a string")
    if fmt not in (None, "float", "base64"):
        raise BadRequest('\'encoding_format\' must be "float" or "base64"', param="encoding_format")
    body.pop("encoding_format", None)
    return fmt


def check_embedding_input(value: Any, key: str = "input") -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise BadRequest(f"'{key}' must be a string or a non-empty array of strings", param=key)
    for i, text in enumerate(value):
        if not text:
            # no token to embed: llama.cpp's decode fails and leaves its heap corrupt (the worker aborts later)
            raise BadRequest(f"'{key}' must not hold an empty string (item {i} is empty)", param=key)
    return value
