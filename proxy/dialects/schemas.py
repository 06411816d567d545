"""JSON schemas in requests (OpenAI's ``response_format``, Ollama's ``format``, tools' ``parameters``):
refused when llama.cpp could not build a grammar for them, or only one that makes every token slow. Pure
functions; ``proxy.dialects.gate`` finds the schemas of a request and calls ``check_schemas``.

- Repetition: llama.cpp turns a bounded repetition (``maxLength: 2000``, ``maxItems``, ``{0,3000}`` in a
  ``pattern``) into that many grammar rules; past about a thousand it rejects the grammar and then crashes
  the worker (exit -11), cutting every request on that model (issue 11). Every such count above
  ``limits.max_schema_repeat`` is refused.
- Alternatives: each value of an ``enum`` (and each branch of an ``anyOf`` / ``oneOf``) is a grammar
  alternative the sampler checks every candidate token against: a 30,000-value enum made each token take
  4.4 s (issue 26). More than ``limits.max_schema_enum`` in one is refused.
- Size: all the schemas of one request together, as compact JSON, above ``limits.max_schema_bytes``.

Each refusal is a 400 naming the field (as the client spelled it) and the limit, before a worker sees it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

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
_ALTERNATIVES = ("enum", "anyOf", "oneOf")
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


@dataclass(frozen=True)
class SchemaLimits:
    repeat: int = 500  # limits.max_schema_repeat
    enum: int = 256  # limits.max_schema_enum
    bytes: int = 64 * 1024  # limits.max_schema_bytes


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


def _param(where: str) -> str:
    return where.split(".")[0].split("[")[0].split(" ")[0]


def check_schema(schema: Any, where: str, limits: SchemaLimits) -> None:
    """BadRequest naming ``where`` and the limit when a repetition count or a list of alternatives in
    ``schema`` is above its limit."""
    for node in _nodes(schema):
        worst = _largest_repeat(node)
        if worst is not None and worst[1] > limits.repeat:
            raise BadRequest(
                f"'{where}': {worst[0]} {worst[1]} is over the limit of {limits.repeat} repetitions "
                "(limits.max_schema_repeat); the model's grammar cannot be that large",
                param=_param(where),
            )
        for key in _ALTERNATIVES:
            values = node.get(key)
            if isinstance(values, list) and len(values) > limits.enum:
                raise BadRequest(
                    f"'{where}': an '{key}' of {len(values)} values is over the limit of {limits.enum} "
                    "(limits.max_schema_enum); each value is a grammar alternative every token is checked against",
                    param=_param(where),
                )


def check_schemas(schemas: Sequence[tuple[str, Any]], limits: SchemaLimits) -> None:
    """Every schema of one request, each named as its client spelled it: their total size, then each one."""
    total = sum(len(msgspec.json.encode(schema)) for _, schema in schemas)
    if total > limits.bytes:
        named = list(dict.fromkeys(f"'{where}'" for where, _ in schemas))
        names = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
        raise BadRequest(
            f"the request's JSON schemas ({names}) take {total} bytes, over the limit of {limits.bytes} "
            "(limits.max_schema_bytes)",
            param=_param(schemas[0][0]),
        )
    for where, schema in schemas:
        check_schema(schema, where, limits)
