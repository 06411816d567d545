"""Anthropic's Messages API <-> OpenAI chat: pure translation of requests and stream chunks, no I/O.

Requests go Anthropic -> OpenAI (the workers' format: system and blocks become chat messages,
``tool_use`` / ``tool_result`` become tool calls and ``tool`` messages, ``tools`` become functions);
answers come back chunk by chunk through ``MessageStream`` as Anthropic's named events
(``message_start``, ``ping``, ``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``,
``message_stop``) or, for a non-streamed call, as one ``message``. Stop sequences are found here, not by
the worker, so that the answer can say which one ended it (``stop_reason: stop_sequence``).

What today's agents send is taken: ``system``-role messages anywhere in ``messages`` (``roles.fold_system``
places them), ``cache_control`` on any block, server tools (left out), and ``thinking``,
``context_management``, ``output_config.effort``, ``service_tier``, ``container``: accepted and not used (a
local model has no thinking budget, no server-side context editing, no tiers). Unknown fields are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from proxy.dialects.blocks import Block, BlockPlanner, Event, StopScanner, new_id
from proxy.dialects.roles import fold_system
from proxy.dialects.shaping import optional
from proxy.errors import BadRequest, ContextLengthExceeded, ProxyError

# Anthropic's error type for each status (https://docs.anthropic.com/en/api/errors); others by class
ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_message(exc: ProxyError) -> str:
    """An error's message as Anthropic words it: a prompt too long for the context is the text Claude Code
    matches to compact its conversation."""
    if isinstance(exc, ContextLengthExceeded):
        return f"prompt is too long: {exc.prompt_tokens} tokens > {exc.n_ctx} maximum"
    return exc.message


# -- requests --------------------------------------------------------------------------------------

_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}
_SKIPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})  # a model's earlier reasoning: not re-read


def _skipped(kind: Any) -> bool:
    """Blocks left out of what the model reads: its earlier reasoning, and the calls and results of server
    tools (which a local model never runs, so they can only come from another model's conversation)."""
    return (
        kind in _SKIPPED_BLOCKS
        or kind in ("server_tool_use", "mcp_tool_use")
        or (isinstance(kind, str) and kind.endswith("_tool_result") and kind != "tool_result")
    )


def _text_of(content: Any, where: str) -> str:
    """A system prompt or tool result as text: a string, or text blocks joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise BadRequest(f"'{where}[{j}]' must be a text block", param=where)
            parts.append(block["text"])
        return "\n".join(parts)
    raise BadRequest(f"'{where}' must be a string or an array of text blocks", param=where)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
        media = source.get("media_type") or "image/png"
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{source['data']}"}}
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise BadRequest(f"'{where}.source' must be a base64 or url image source", param=where)


def _tool_result(block: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """A tool_result block -> a ``tool`` message (and a user message for any images in it)."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest(f"'{where}.tool_use_id' is required", param=where)
    content = block.get("content")
    images: list[dict[str, Any]] = []
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                images.append(_image_part(part, f"{where}.content[{j}]"))
            elif kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise BadRequest(f"'{where}.content[{j}]' must be a text or image block", param=where)
        text = "\n".join(texts)
    elif content is None:
        text = ""
    else:
        text = _text_of(content, f"{where}.content")
    if block.get("is_error") and not text.startswith("Error"):
        text = f"Error: {text}"
    out: list[dict[str, Any]] = [{"role": "tool", "tool_call_id": call_id, "content": text}]
    if images:
        out.append({"role": "user", "content": images})
    return out


def _message(message: Any, i: int) -> list[dict[str, Any]]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise BadRequest(f"'{where}' must be an object", param="messages")
    role = message.get("role")
    if role not in ("user", "assistant", "system"):
        raise BadRequest(f'\'{where}.role\' must be "user", "assistant" or "system", got {role!r}', param="messages")
    content = message.get("content")
    if role == "system":  # placed in the conversation by roles.fold_system
        return [{"role": "system", "content": _text_of(content, f"{where}.content")}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"'{where}.content' must be a string or an array of content blocks", param="messages")
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(block, dict):
            raise BadRequest(f"'{at}' must be a content block (an object with a 'type')", param="messages")
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "tool_use" and role == "assistant":
            name, args = block.get("name"), block.get("input", {})
            if not isinstance(name, str) or not isinstance(args, dict):
                raise BadRequest(f"'{at}' must have a string 'name' and an object 'input'", param="messages")
            call_id = block.get("id") or f"toolu_{i}_{j}"
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}})
        elif kind == "tool_result" and role == "user":
            out += _tool_result(block, at)
        elif _skipped(kind):
            continue
        else:
            raise BadRequest(
                f"'{at}' is a {kind!r} block, which this proxy does not take in a {role} message "
                "(text, image, tool_use from the assistant, tool_result from the user)",
                param="messages",
            )
    if parts or calls:
        texts_only = all(p["type"] == "text" for p in parts)
        body: Any = "".join(p["text"] for p in parts) if texts_only else parts
        msg: dict[str, Any] = {"role": role, "content": body}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    """Client tools as functions; server tools (``web_search_*``, ``bash_*``, ``text_editor_*``,
    ``code_execution_*``, ...: any other ``type``) are left out of what the model sees: a local model cannot
    run them, as the Responses route leaves out hosted tools."""
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array of tools", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise BadRequest(f"'tools[{i}]' must be an object with a 'name'", param="tools")
        if tool.get("type") not in (None, "custom"):
            continue
        schema = tool.get("input_schema") or {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise BadRequest(f"'tools[{i}].input_schema' must be an object", param="tools")
        fn: dict[str, Any] = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict) or choice.get("type") not in (*_TOOL_CHOICE, "tool"):
        raise BadRequest('\'tool_choice\' must be {"type": "auto" | "any" | "tool" | "none"}', param="tool_choice")
    if choice["type"] == "tool":
        if not isinstance(choice.get("name"), str):
            raise BadRequest("'tool_choice.name' is required with type \"tool\"", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return _TOOL_CHOICE[choice["type"]]


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``system`` and ``messages`` as OpenAI chat messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of messages", param="messages")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None and system != "" and system != []:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for i, message in enumerate(messages):
        out += _message(message, i)
    if all(m["role"] == "system" for m in out):
        raise BadRequest("'messages' must hold a user message, not only system messages", param="messages")
    return fold_system(out)


def messages_request(body: dict[str, Any], model: str, *, count_only: bool = False) -> tuple[dict[str, Any], list[str]]:
    """/v1/messages -> /v1/chat/completions (always streamed from the worker); also its stop sequences,
    which the proxy watches for. ``count_only``: /v1/messages/count_tokens, where max_tokens is absent."""
    out: dict[str, Any] = {"model": model, "messages": chat_messages(body)}
    tools = _tools(body["tools"]) if body.get("tools") else []
    if tools:
        out["tools"] = tools
        if body.get("tool_choice") is not None:
            choice = _tool_choice(body["tool_choice"])
            if choice == "none":
                del out["tools"]
            else:
                out["tool_choice"] = choice
    if count_only:
        return out, []
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise BadRequest("'max_tokens' is required", param="max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("'max_tokens' must be a positive integer", param="max_tokens")
    out.update(stream=True, stream_options={"include_usage": True}, max_tokens=max_tokens)
    for key in ("temperature", "top_p"):
        value = optional(body, key, (int, float), "a number")
        if value is not None:
            out[key] = value
    top_k = optional(body, "top_k", int, "an integer")
    if top_k is not None:
        out["top_k"] = top_k
    optional(body, "metadata", dict, "an object")
    config = optional(body, "output_config", dict, "an object") or {}
    fmt = config.get("format")
    if fmt is not None:  # structured output: the worker constrains the answer to the schema
        if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict)):
            raise BadRequest(
                '\'output_config.format\' must be {"type": "json_schema", "schema": {...}}', param="output_config"
            )
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    optional(body, "stream", bool, "a boolean")
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("'stop_sequences' must be an array of strings", param="stop_sequences")
    return out, stops


# -- answers ---------------------------------------------------------------------------------------

_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use"}


def _block(block: Block, *, whole: bool) -> dict[str, Any]:
    if block.kind == "text":
        return {"type": "text", "text": block.text if whole else ""}
    return {"type": "tool_use", "id": block.call_id, "name": block.name, "input": _input(block.text) if whole else {}}


def _input(arguments: str) -> Any:
    if not arguments:
        return {}
    try:
        return json.loads(arguments)
    except ValueError:
        return {"_raw": arguments}  # what the model wrote, when it is not JSON


class MessageStream:
    """OpenAI chunks in, Anthropic's (event name, data) pairs out; ``message()`` is the whole answer."""

    def __init__(self, model: str, stops: list[str]) -> None:
        self.model = model
        self.id = new_id("msg_")
        self.planner = BlockPlanner(call_prefix="toolu_")
        self.scanner = StopScanner(stops)
        self.stop_sequence: str | None = None

    @property
    def done(self) -> bool:
        """A stop sequence came: the caller stops reading the worker."""
        return self.stop_sequence is not None

    def _usage(self) -> dict[str, int]:
        """Anthropic's usage: the prompt tokens read from the cache are ``cache_read_input_tokens``, the rest
        ``input_tokens`` (their sum is what count_tokens counts); nothing is written to a cache on request."""
        prompt = self.planner.prompt_tokens or 0
        cached = min(self.planner.cached_tokens, prompt)
        return {
            "input_tokens": prompt - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": self.planner.output_tokens,
        }

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        head: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 0,
            },
        }
        return [("message_start", {"type": "message_start", "message": head}), ("ping", {"type": "ping"})]

    def _render(self, events: list[Event]) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        for event in events:
            block = event[1]
            if event[0] == "start":
                data = {
                    "type": "content_block_start",
                    "index": block.index,
                    "content_block": _block(block, whole=False),
                }
                out.append(("content_block_start", data))
            elif event[0] == "delta":
                piece = event[2]
                delta = (
                    {"type": "text_delta", "text": piece}
                    if block.kind == "text"
                    else {"type": "input_json_delta", "partial_json": piece}
                )
                out.append(
                    ("content_block_delta", {"type": "content_block_delta", "index": block.index, "delta": delta})
                )
            else:
                out.append(("content_block_stop", {"type": "content_block_stop", "index": block.index}))
        return out

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if self.done:
            return []
        text, calls = self.planner.read(chunk)
        safe, self.stop_sequence = self.scanner.feed(text)
        events = self.planner.text(safe)
        if not self.done:
            for call in calls:
                events += self.planner.tool(call)
        return self._render(events)

    def stop_reason(self) -> str:
        if self.stop_sequence is not None:
            return "stop_sequence"
        if self.planner.has_tool_calls:
            return "tool_use"
        return _STOP_REASONS.get(self.planner.finish_reason or "stop", "end_turn")

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        events = [] if self.done else self.planner.text(self.scanner.flush())
        out = self._render(events + self.planner.finish())
        delta = {"stop_reason": self.stop_reason(), "stop_sequence": self.stop_sequence}
        out.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": self._usage()}))
        out.append(("message_stop", {"type": "message_stop"}))
        return out

    def message(self) -> dict[str, Any]:
        """The whole answer (after ``finish``)."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [_block(b, whole=True) for b in self.planner.blocks],
            "stop_reason": self.stop_reason(),
            "stop_sequence": self.stop_sequence,
            "usage": self._usage(),
        }


# -- models ----------------------------------------------------------------------------------------


def model_info(name: str, created: float, context: int | None) -> dict[str, Any]:
    """A model in Anthropic's list shape (``GET /v1/models`` with ``anthropic-version``)."""
    info: dict[str, Any] = {
        "type": "model",
        "id": name,
        "display_name": name,
        "created_at": datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lifecycle": "active",
    }
    if context:
        info["max_input_tokens"] = context
    return info


def model_list(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "data": models,
        "has_more": False,
        "first_id": models[0]["id"] if models else None,
        "last_id": models[-1]["id"] if models else None,
    }
