"""Ollama <-> OpenAI translation of requests and stream chunks: pure functions, no I/O.

Requests go Ollama -> OpenAI (the workers' format); answers come back chunk by chunk through
``StreamTranslator``, which also keeps the counts and times for Ollama's final chunk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy.dialects.shaping import optional
from proxy.errors import BadRequest

# Ollama option -> OpenAI / llama-cpp-python field
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "tfs_z": "tfs_z",
}


_LAST_SECOND = 253402300799.0  # 9999-12-31T23:59:59Z, the last second datetime can show


def rfc3339(ts: float | None = None) -> str:
    """Ollama's created_at: UTC with microseconds and a Z (times past the year 9999 show as its end)."""
    ts = time.time() if ts is None else min(ts, _LAST_SECOND)
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def options_to_openai(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest("'options' must be an object", param="options")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadRequest("'options.num_predict' must be an integer", param="options.num_predict")
            if value >= 0:
                out["max_tokens"] = value
        elif key in _OPTIONS:
            if key == "stop":
                if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                    raise BadRequest("'options.stop' must be an array of strings", param="options.stop")
            elif not isinstance(value, int | float) or isinstance(value, bool):
                raise BadRequest(f"'options.{key}' must be a number", param=f"options.{key}")
            out[_OPTIONS[key]] = value
        # other options (num_ctx, num_thread, ...) are fixed when the model loads: ignored, as Ollama's
        # OpenAI layer ignores what it cannot change per request
    return out


def format_to_response_format(fmt: Any) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise BadRequest("'format' must be \"json\" or a JSON schema object", param="format")


def _image_parts(images: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest(f"'{where}' must be an array of base64 strings", param=where)
    return [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}} for img in images]


def _message_to_openai(message: Any, i: int) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise BadRequest(f"'messages[{i}]' must be an object", param="messages")
    out: dict[str, Any] = {"role": message.get("role"), "content": message.get("content") or ""}
    if not isinstance(out["content"], str):
        raise BadRequest(f"'messages[{i}].content' must be a string", param="messages")
    images = message.get("images")
    if images:
        out["content"] = [{"type": "text", "text": out["content"]}, *_image_parts(images, f"messages[{i}].images")]
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise BadRequest(f"'messages[{i}].tool_calls' must be an array", param="messages")
        out["tool_calls"] = [_tool_call(call, i, j) for j, call in enumerate(calls)]
    if message.get("role") == "tool" and message.get("tool_name"):
        out["name"] = message["tool_name"]
    return out


def _tool_call(call: Any, i: int, j: int) -> dict[str, Any]:
    where = f"messages[{i}].tool_calls[{j}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"'{where}' must be an object with 'function': {{'name', 'arguments'}}", param="messages")
    arguments = function.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise BadRequest(f"'{where}.function.arguments' must be an object", param="messages")
    return {
        "id": call.get("id") or f"call_{i}_{j}",
        "type": "function",
        "function": {"name": function["name"], "arguments": json.dumps(arguments)},
    }


def _common(body: dict[str, Any], model: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    out.update(options_to_openai(body.get("options")))
    response_format = format_to_response_format(body.get("format"))
    if response_format:
        out["response_format"] = response_format
    tools = optional(body, "tools", list, "an array of tools")
    if tools:
        out["tools"] = tools
    return out


def chat_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """/api/chat -> /v1/chat/completions (always streamed from the worker)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array", param="messages")
    out = _common(body, model)
    out["messages"] = [_message_to_openai(m, i) for i, m in enumerate(messages)]
    return out


def generate_request(body: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """/api/generate -> /v1/chat/completions (templated), or /v1/completions when ``raw``."""
    prompt = optional(body, "prompt", str, "a string") or ""
    system = optional(body, "system", str, "a string")
    out = _common(body, model)
    if body.get("raw"):
        out["prompt"] = prompt
        return "/v1/completions", out
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    user: dict[str, Any] = {"role": "user", "content": prompt}
    if body.get("images"):
        user["content"] = [{"type": "text", "text": prompt}, *_image_parts(body["images"], "images")]
    messages.append(user)
    out["messages"] = messages
    return "/v1/chat/completions", out


@dataclass
class StreamTranslator:
    """OpenAI stream chunks in, Ollama NDJSON objects out (``/api/chat`` or ``/api/generate``)."""

    model: str
    generate: bool
    started_ns: int
    load_ns: int = 0
    first_ns: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def _base(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": rfc3339()}

    def _piece(self, text: str) -> dict[str, Any]:
        out = self._base()
        if self.generate:
            out["response"] = text
        else:
            out["message"] = {"role": "assistant", "content": text}
        out["done"] = False
        return out

    def feed(self, chunk: dict[str, Any], now_ns: int) -> dict[str, Any] | None:
        """One OpenAI chunk; returns the Ollama object to send, or None."""
        usage = chunk.get("usage")
        if usage:
            # Ollama counts the prompt tokens it evaluated: those reused from the prompt cache are not
            details = usage.get("prompt_tokens_details")
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
            self.prompt_tokens = max(0, int(usage.get("prompt_tokens") or 0) - cached)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
        choices = chunk.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        text = choice.get("text") if delta is None else delta.get("content")
        for call in (delta or {}).get("tool_calls") or []:
            slot = self.tool_calls.setdefault(int(call.get("index", 0)), {"name": "", "arguments": ""})
            fn = call.get("function") or {}
            slot["name"] += fn.get("name") or ""
            slot["arguments"] += fn.get("arguments") or ""
        if text:
            if self.first_ns is None:
                self.first_ns = now_ns
            self.content.append(text)
            return self._piece(text)
        return None

    def _calls(self) -> list[dict[str, Any]]:
        calls = []
        for _, slot in sorted(self.tool_calls.items()):
            try:
                arguments = json.loads(slot["arguments"]) if slot["arguments"] else {}
            except ValueError:
                arguments = {"_raw": slot["arguments"]}
            calls.append({"function": {"name": slot["name"], "arguments": arguments}})
        return calls

    def final(self, now_ns: int, whole: bool) -> dict[str, Any]:
        """Ollama's last object: done, done_reason, counts and durations in nanoseconds.

        ``whole`` puts the full text in it (non-streaming answers).
        """
        first = self.first_ns if self.first_ns is not None else now_ns
        text = "".join(self.content) if whole else ""
        out = self._base()
        if self.generate:
            out["response"] = text
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tool_calls:
                message["tool_calls"] = self._calls()
            out["message"] = message
        reason = self.finish_reason or "stop"
        out.update(
            done=True,
            done_reason="length" if reason == "length" else "stop",
            total_duration=now_ns - self.started_ns,
            load_duration=self.load_ns,
            prompt_eval_count=self.prompt_tokens,
            prompt_eval_duration=max(0, first - self.started_ns - self.load_ns),
            eval_count=self.completion_tokens or len(self.content),
            eval_duration=max(0, now_ns - first),
        )
        return out


def load_response(model: str, generate: bool, unload: bool) -> dict[str, Any]:
    """Ollama's answer to an empty prompt: the model was loaded (or unloaded)."""
    out: dict[str, Any] = {"model": model, "created_at": rfc3339()}
    if generate:
        out["response"] = ""
    else:
        out["message"] = {"role": "assistant", "content": ""}
    out["done_reason"] = "unload" if unload else "load"
    out["done"] = True
    return out


def embed_response(model: str, openai: dict[str, Any], total_ns: int, load_ns: int) -> dict[str, Any]:
    data = sorted(openai.get("data") or [], key=lambda d: d.get("index", 0))
    usage = openai.get("usage") or {}
    return {
        "model": model,
        "embeddings": [d["embedding"] for d in data],
        "total_duration": total_ns,
        "load_duration": load_ns,
        "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
    }
