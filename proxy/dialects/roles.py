"""System messages in a conversation -> the one leading system message chat templates take: pure.

Agents put system-role messages in the middle of a conversation (Claude Code's environment notes after
the user's turn, Codex's developer messages); many chat templates take one system message, first, and
some raise on any other (Qwen3's). Rather than learn each template's rule, one rule holds for every model:

- the system messages before the first other message are merged into one leading system message;
- a later system message joins the nearest user turn as a marked block, ``<system>...</system>``: put
  before the next message's text when that is a user message, else after the previous user message's
  text, else as a user message of its own.

So the prompt a model reads is the same on every template, nothing in it can be refused, and the text
keeps its place in the conversation.
"""

from __future__ import annotations

from typing import Any

_SYSTEM = frozenset({"system", "developer"})


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _marked(text: str) -> str:
    return f"<system>\n{text}\n</system>"


def _join(content: Any, block: str, *, before: bool) -> Any:
    """A user message's content with ``block`` put before or after its text."""
    if isinstance(content, list):
        part = {"type": "text", "text": block}
        return [part, *content] if before else [*content, part]
    text = content if isinstance(content, str) else ""
    if not text:
        return block
    return f"{block}\n\n{text}" if before else f"{text}\n\n{block}"


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages with at most one system message, first (see the module's docstring)."""
    lead: list[str] = []
    i = 0
    while i < len(messages) and messages[i].get("role") in _SYSTEM:
        lead.append(_text(messages[i].get("content")))
        i += 1
    out: list[dict[str, Any]] = []
    if lead:
        out.append({"role": "system", "content": "\n\n".join(t for t in lead if t)})
    rest = messages[i:]
    pending: list[str] = []  # marked blocks waiting for the next message
    for message in rest:
        if message.get("role") in _SYSTEM:
            text = _text(message.get("content"))
            if text:
                pending.append(_marked(text))
            continue
        if pending:
            block = "\n\n".join(pending)
            pending = []
            if message.get("role") == "user":
                message = {**message, "content": _join(message.get("content"), block, before=True)}
            elif out and out[-1].get("role") == "user":
                out[-1] = {**out[-1], "content": _join(out[-1].get("content"), block, before=False)}
            else:
                out.append({"role": "user", "content": block})
        out.append(message)
    if pending:
        block = "\n\n".join(pending)
        if out and out[-1].get("role") == "user":
            out[-1] = {**out[-1], "content": _join(out[-1].get("content"), block, before=False)}
        else:
            out.append({"role": "user", "content": block})
    return out
