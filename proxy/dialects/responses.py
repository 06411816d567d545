"""OpenAI's Responses API <-> chat completions: pure translation of requests and stream chunks, no I/O.

The stateless subset: ``input`` (a string, or items: messages, ``function_call``,
``function_call_output``), ``instructions``, function ``tools``, ``tool_choice``, ``max_output_tokens``,
``temperature``, ``top_p``, ``text.format``, ``stream``. Nothing is stored, so ``previous_response_id``
and ``conversation`` are refused with a 400 naming the field; ``store`` is accepted and answered false.
Tools of other types (hosted tools such as ``web_search``, Codex's ``custom`` / ``local_shell``) are left
out of what the model sees: a local model cannot run them, and Codex sends them with every request.
Answers come back through ``ResponseStream`` as the typed, numbered events (``response.created``, ...,
``response.completed``) or, for a non-streamed call, as one ``response`` object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.dialects.blocks import Block, BlockPlanner, Event, new_id
from proxy.dialects.roles import fold_system
from proxy.dialects.shaping import optional
from proxy.errors import BadRequest

_STATEFUL = ("previous_response_id", "conversation")
_ROLES = frozenset({"user", "assistant", "system", "developer"})
_SKIPPED_ITEMS = frozenset({"reasoning"})  # a model's earlier reasoning, sent back by Codex: not re-read


def _parts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content: a string, or input/output parts -> OpenAI chat content."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"'{where}.content' must be a string or an array of content parts", param="input")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRequest(f"'{where}.content[{j}]' must be a content part (an object with a 'type')", param="input")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise BadRequest(
                f"'{where}.content[{j}]' is a {kind!r} part; taken are input_text, output_text and input_image "
                "(with an image_url)",
                param="input",
            )
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    text = _parts(output, where)
    if not isinstance(text, str):
        raise BadRequest(f"'{where}.output' must be text", param="input")
    return text


def input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as OpenAI chat messages."""
    out: list[dict[str, Any]] = []
    instructions = optional(body, "instructions", str, "a string")
    if instructions:
        out.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        if not items:
            raise BadRequest("'input' must not be empty", param="input")
        return [*out, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty array of input items", param="input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"'{where}' must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise BadRequest(f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}", param="input")
            out.append(
                {"role": "system" if role == "developer" else role, "content": _parts(item.get("content"), where)}
            )
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if not (isinstance(name, str) and isinstance(args, str) and isinstance(call_id, str)):
                raise BadRequest(f"'{where}' needs string 'call_id', 'name' and 'arguments'", param="input")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # calls made in one turn: one message
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise BadRequest(f"'{where}.call_id' is required", param="input")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _output_text(item.get("output"), where)})
        elif kind in _SKIPPED_ITEMS:
            continue
        elif kind == "item_reference":
            raise BadRequest(f"'{where}' refers to a stored item; this proxy stores none", param="input")
        else:
            raise BadRequest(
                f"'{where}' is a {kind!r} item; taken are message, function_call and function_call_output",
                param="input",
            )
    return fold_system(out)


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array of tools", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"'tools[{i}]' must be an object", param="tools")
        if tool.get("type") != "function":
            continue  # hosted and client-specific tools: a local model cannot run them (see the docstring)
        if not isinstance(tool.get("name"), str):
            raise BadRequest(f"'tools[{i}].name' is required", param="tools")
        fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object"}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest(
        '\'tool_choice\' must be "auto", "none", "required" or {"type": "function", "name": ...}', param="tool_choice"
    )


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise BadRequest("'text' must be an object", param="text")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "format", "schema": fmt["schema"]}}
    raise BadRequest(
        '\'text.format\' must be {"type": "text" | "json_object"} or {"type": "json_schema", "schema": {...}}',
        param="text.format",
    )


def responses_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """/v1/responses -> /v1/chat/completions (always streamed from the worker)."""
    for key in _STATEFUL:
        if body.get(key) is not None:
            raise BadRequest(
                f"'{key}' is not supported: this proxy keeps no responses or conversations; "
                "send the whole conversation in 'input'",
                param=key,
            )
    if body.get("background"):
        raise BadRequest("'background' responses are not supported", param="background")
    out: dict[str, Any] = {"model": model, "messages": input_messages(body), "stream": True}
    out["stream_options"] = {"include_usage": True}
    optional(body, "stream", bool, "a boolean")
    if body.get("tools"):
        tools = _tools(body["tools"])
        if tools:
            out["tools"] = tools
            if body.get("tool_choice") is not None:
                out["tool_choice"] = _tool_choice(body["tool_choice"])
    max_tokens = optional(body, "max_output_tokens", int, "an integer")
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadRequest("'max_output_tokens' must be a positive integer", param="max_output_tokens")
        out["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        value = optional(body, key, (int, float), "a number")
        if value is not None:
            out[key] = value
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        out["response_format"] = response_format
    return out


# -- answers ---------------------------------------------------------------------------------------


class ResponseStream:
    """OpenAI chunks in, the Responses API's numbered events out; ``response()`` is the whole answer."""

    def __init__(self, model: str, body: Mapping[str, Any], created_at: float) -> None:
        self.id = new_id("resp_")
        self.model = model
        self.created_at = int(created_at)
        self.planner = BlockPlanner(call_prefix="call_")
        self.sequence = 0
        self.item_ids: dict[int, str] = {}  # block index -> item id
        self.echo = {
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"],
            "text": body.get("text") or {"format": {"type": "text"}},
            "metadata": body.get("metadata") or {},
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
        }

    def _event(self, kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
        event = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return kind, event

    def _item(self, block: Block, status: str) -> dict[str, Any]:
        item_id = self.item_ids.setdefault(block.index, new_id("msg_" if block.kind == "text" else "fc_"))
        if block.kind == "text":
            content = [self._part(block.text)] if status != "in_progress" else []
            return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}
        arguments = block.text if status != "in_progress" else ""
        return {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "call_id": block.call_id,
            "name": block.name,
            "arguments": arguments,
        }

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _status(self) -> str:
        return "incomplete" if self.planner.finish_reason == "length" else "completed"

    def response(self, status: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object: in progress (no output yet), or whole once ``finish`` has run."""
        status = status or self._status()
        done = status in ("completed", "incomplete", "failed")
        output = [self._item(b, "incomplete" if status == "incomplete" else "completed") for b in self.planner.blocks]
        usage = None
        if done:
            usage = {
                "input_tokens": self.planner.prompt_tokens or 0,
                "input_tokens_details": {"cached_tokens": self.planner.cached_tokens},
                "output_tokens": self.planner.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": (self.planner.prompt_tokens or 0) + self.planner.output_tokens,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output if done else [],
            "usage": usage,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "previous_response_id": None,
            "store": False,
            **self.echo,
        }

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        head = self.response("in_progress")
        return [self._event("response.created", response=head), self._event("response.in_progress", response=head)]

    def _render(self, events: list[Event]) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for event in events:
            block = event[1]
            at = {"output_index": block.index}
            if event[0] == "start":
                out.append(self._event("response.output_item.added", **at, item=self._item(block, "in_progress")))
                if block.kind == "text":
                    item_id = self.item_ids[block.index]
                    part = self._part("")
                    out.append(
                        self._event("response.content_part.added", item_id=item_id, **at, content_index=0, part=part)
                    )
            elif event[0] == "delta":
                item_id = self.item_ids[block.index]
                if block.kind == "text":
                    out.append(
                        self._event(
                            "response.output_text.delta",
                            item_id=item_id,
                            **at,
                            content_index=0,
                            delta=event[2],
                            logprobs=[],
                        )
                    )
                else:
                    out.append(
                        self._event("response.function_call_arguments.delta", item_id=item_id, **at, delta=event[2])
                    )
            else:
                item_id = self.item_ids[block.index]
                if block.kind == "text":
                    text = {"item_id": item_id, **at, "content_index": 0}
                    out.append(self._event("response.output_text.done", **text, text=block.text, logprobs=[]))
                    out.append(self._event("response.content_part.done", **text, part=self._part(block.text)))
                else:
                    out.append(
                        self._event(
                            "response.function_call_arguments.done",
                            item_id=item_id,
                            **at,
                            name=block.name,
                            arguments=block.text,
                        )
                    )
                out.append(self._event("response.output_item.done", **at, item=self._item(block, "completed")))
        return out

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return self._render(self.planner.feed(chunk))

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        out = self._render(self.planner.finish())
        status = self._status()
        kind = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self._event(kind, response=self.response(status)))
        return out

    @property
    def done(self) -> bool:
        """Never early: the Responses API has no stop sequences; the worker's stream ends it."""
        return False

    def failed(self, code: str, message: str) -> list[tuple[str, dict[str, Any]]]:
        """The stream broke (its worker went away): the response fails, with what it had."""
        self.planner.finish()
        return [self._event("response.failed", response=self.response("failed", {"code": code, "message": message}))]
