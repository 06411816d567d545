"""OpenAI stream chunks -> an ordered list of content blocks (text, tool calls): pure, no I/O.

Shared by the dialects whose answers are a sequence of blocks, each opened, filled and closed before
the next (Anthropic's content blocks, the Responses API's output items). OpenAI's stream may interleave
its parallel tool calls' argument pieces (and text may follow a tool call); a block, once closed, cannot
take more. So one block is *live* at a time, its pieces passed on as they come; a block whose pieces
arrive while another is live (or a call before it has not started) is *pending*, kept whole and sent at
``finish``; tool calls go out in their OpenAI index order.
With the usual order (text, then one tool call after another) everything but the second and later tool
calls streams live; with any order the blocks are the same (tests/test_properties.py).

The planner also keeps the usage and the finish reason, for the dialects' final events.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


def sse(name: str, data: Mapping[str, Any]) -> bytes:
    """One named SSE event (``event:`` and ``data:`` lines), as both dialects stream them."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def frames(events: Iterable[tuple[str, Mapping[str, Any]]]) -> bytes:
    """Named SSE events, in order, as one piece to send."""
    return b"".join(sse(name, data) for name, data in events)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


@dataclass
class Block:
    kind: Literal["text", "tool"]
    text: str = ""  # the text, or a tool call's arguments (JSON, as the model wrote them)
    call_id: str = ""
    name: str = ""
    index: int = -1  # its place in the answer, given when it starts (Anthropic's index, Responses' output_index)
    call_index: int = -1  # a tool call's index in OpenAI's stream


# what a dialect renders: a block starts, gets a piece, stops
Start = tuple[Literal["start"], Block]
Delta = tuple[Literal["delta"], Block, str]
Stop = tuple[Literal["stop"], Block]
Event = Start | Delta | Stop


@dataclass
class BlockPlanner:
    """Feed it the pieces of one OpenAI chat stream; it says which block events to send, in order."""

    call_prefix: str = "call_"
    blocks: list[Block] = field(default_factory=list)  # started, in order
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0  # prompt tokens the worker reused from its cache (prompt_tokens_details)
    pieces: int = 0  # chunks that carried text or a tool call (an output count when no usage came)
    _live: Block | None = None
    _pending: list[Block] = field(default_factory=list)
    _pending_text: Block | None = None
    _tools: dict[int, Block] = field(default_factory=dict)

    def read(self, chunk: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """Take the usage and the finish reason out of a chunk; return its text and its tool-call deltas."""
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                self.cached_tokens = int(details.get("cached_tokens") or 0)
        choices = chunk.get("choices") or []
        if not choices:
            return "", []
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        calls = delta.get("tool_calls") or []
        if text or calls:
            self.pieces += 1
        return text, calls

    def _start(self, block: Block) -> Start:
        block.index = len(self.blocks)
        self.blocks.append(block)
        return ("start", block)

    def _close_live(self) -> list[Event]:
        live, self._live = self._live, None
        return [("stop", live)] if live is not None else []

    def text(self, piece: str) -> list[Event]:
        if not piece:
            return []
        live = self._live
        if live is not None and live.kind == "text":
            live.text += piece
            return [("delta", live, piece)]
        if live is None and not self.blocks:
            self._live = block = Block("text", piece)
            return [self._start(block), ("delta", block, piece)]
        if self._pending_text is None:  # text after a tool call: a block of its own, sent at the end
            self._pending_text = Block("text")
            self._pending.append(self._pending_text)
        self._pending_text.text += piece
        return []

    def tool(self, call: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        index = int(call.get("index") or 0)
        fn = call.get("function") or {}
        block = self._tools.get(index)
        if block is None:
            block = Block("tool", call_id=str(call.get("id") or new_id(self.call_prefix)), call_index=index)
            block.name = str(fn.get("name") or "")
            self._tools[index] = block
            live = self._live
            started = sum(1 for b in self.blocks if b.kind == "tool")
            if (live is None or live.kind == "text") and index == started:  # calls go out in their order
                events += self._close_live()
                self._live = block
                events.append(self._start(block))
            else:
                self._pending.append(block)
        elif fn.get("name"):
            block.name += str(fn["name"])
        piece = str(fn.get("arguments") or "")
        if piece:
            block.text += piece
            if block is self._live:
                events.append(("delta", block, piece))
        return events

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        text, calls = self.read(chunk)
        events = self.text(text)
        for call in calls:
            events += self.tool(call)
        return events

    def finish(self) -> list[Event]:
        """Close the live block and send the pending ones whole."""
        events = self._close_live()
        calls = iter(sorted((b for b in self._pending if b.kind == "tool"), key=lambda b: b.call_index))
        pending = [next(calls) if b.kind == "tool" else b for b in self._pending]
        for block in pending:
            events.append(self._start(block))
            if block.text:
                events.append(("delta", block, block.text))
            events.append(("stop", block))
        self._pending = []
        self._pending_text = None
        return events

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._tools)

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.pieces


class StopScanner:
    """Finds the first of some stop strings (the first to end, as generation meets them) in text that
    arrives in pieces: passes on what cannot be the start of one, holds back the rest (at most the
    longest stop's length less one character)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, str | None]:
        """The text that is safe to send, and the stop string found (the text ends just before it)."""
        if not self.stops:
            return piece, None
        text = self.held + piece
        # the stop a model writing this text would meet first: the one that ends first (then the longest)
        found: tuple[int, int, str] | None = None
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0 and (found is None or (at + len(stop), at) < found[:2]):
                found = (at + len(stop), at, stop)
        if found is not None:
            self.held = ""
            return text[: found[1]], found[2]
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], None

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
