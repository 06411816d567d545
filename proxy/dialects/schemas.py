"""JSON schemas in requests (OpenAI's ``response_format``, Ollama's ``format``, tools' ``parameters``):
refused when llama.cpp could not build a grammar for them. Pure functions.

llama.cpp turns a bounded repetition (``maxLength: 2000``, ``maxItems``, ``{0,3000}`` in a ``pattern``)
into that many grammar rules; past about a thousand it rejects the grammar and then crashes the worker
(exit -11), cutting every request on that model (issue 11). So every such count above
``limits.max_schema_repeat`` is a 400 naming the limit, before the worker sees it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from proxy.errors import BadRequest

_COUNTS = (
    "maxLength",
    "minLength",
    "maxItems",
    "minItems",
    "maxProperties",
    "minProperties",
    "minContains",
    "maxContains",
)
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every object inside a schema (iterative: depth is bounded by the body parser, not here)."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _largest_repeat(node: dict[str, Any]) -> tuple[str, int] | None:
    worst: tuple[str, int] | None = None
    for key in _COUNTS:
        value = node.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and (worst is None or value > worst[1]):
            worst = (key, int(value))
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        for m in _QUANTIFIER.finditer(pattern):
            count = max(int(m.group(1)), int(m.group(2) or 0))
            if worst is None or count > worst[1]:
                worst = (f"{{{m.group(0)[1:-1]}}} in 'pattern'", count)
    return worst


def check_schema(schema: Any, where: str, limit: int) -> None:
    """BadRequest naming ``where`` and the limit when a repetition count in ``schema`` is above it."""
    for node in _nodes(schema):
        worst = _largest_repeat(node)
        if worst is not None and worst[1] > limit:
            raise BadRequest(
                f"'{where}': {worst[0]} {worst[1]} is over the limit of {limit} repetitions "
                "(limits.max_schema_repeat); the model's grammar cannot be that large",
                param=where.split(".")[0].split("[")[0],
            )


def check_schemas(body: dict[str, Any], limit: int) -> None:
    """The schemas of a canonical (OpenAI-format) request: response_format and every tool's parameters."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        # OpenAI's json_schema.schema; llama-cpp-python's own json_object + schema
        inner = response_format.get("json_schema")
        check_schema(inner.get("schema") if isinstance(inner, dict) else None, "response_format", limit)
        check_schema(response_format.get("schema"), "response_format", limit)
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict):
                check_schema(function.get("parameters"), f"tools[{i}].function.parameters", limit)
