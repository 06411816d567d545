"""Request bodies as JSON objects, with bounded cost: no HTTP here.

A small body is decoded by msgspec at once. A large one (over ``OFF_LOOP_BYTES``) is decoded in a
thread by the standard library's pure-Python scanner, with hooks that count what it builds: a C decoder
holds the GIL for the whole body (an 8 MiB ``[{}, {}, ...]`` stalled every other request for ~0.5 s),
while Python code lets the event loop in every few milliseconds. The hooks also bound what a body may
cost: at most ``max_values`` objects, arrays, strings and numbers (memory stays proportional: ``{}`` is 3
bytes on the wire and ~64 as a dict) and ``MAX_DEPTH`` levels of nesting (past Python's recursion limit
the C decoders raise RecursionError).

Either way: a lone surrogate (``"\\ud800"``, which could never be sent on as UTF-8), numbers out of
range and non-JSON are a BadRequest naming the problem.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import math
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec

from proxy.errors import BadRequest

# the standard library's pure-Python JSON parts (typeshed does not describe them)
_decoder: Any = json.decoder
_scanner: Any = json.scanner
_WHITESPACE = re.compile(r"[ \t\n\r]*")

OFF_LOOP_BYTES = 64 * 1024  # larger bodies: parse_large, in a thread
MAX_DEPTH = 64  # objects and arrays inside each other
_YIELD_EVERY = 1024  # values


class _TooMuch(Exception):
    pass


def _object_or_400(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _too_deep(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest deeper than ``limit`` (depth-first, iterative)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _deep_error() -> BadRequest:
    return BadRequest(f"the request body nests objects and arrays more than {MAX_DEPTH} deep")


def parse_small(raw: bytes) -> dict[str, Any]:
    """A small body (at most OFF_LOOP_BYTES), decoded by msgspec on the spot."""
    if not raw.strip():
        raise BadRequest("the request body is empty; a JSON object is expected")
    try:
        body = msgspec.json.decode(raw)
    except RecursionError:
        raise _deep_error() from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    # fewer brackets than the limit cannot nest deeper: most bodies skip the walk
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(body, MAX_DEPTH):
        raise _deep_error()
    return _object_or_400(body)


class _Counting:
    """The context ``json.scanner.py_make_scanner`` reads, with every builder counted."""

    strict = True
    object_hook = None
    object_pairs_hook = None

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self.values = 0
        self.depth = 0
        self.memo: dict[str, str] = {}
        self.parse_constant = self._constant
        self.parse_object = self._object
        self.parse_array = self._array
        self.parse_string = self._string
        self.parse_int = self._number(int)
        self.parse_float = self._number(float)

    def _count(self) -> None:
        self.values += 1
        if not self.values % _YIELD_EVERY:
            time.sleep(0)  # hand the GIL to the event loop now rather than at the next switch interval
        if self.values > self.max_values:
            raise _TooMuch(f"the request body holds more than {self.max_values} JSON values (limits.max_json_values)")

    def _nested(self, build: Callable[..., Any], *args: Any) -> Any:
        self._count()
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _TooMuch(_deep_error().message)
        try:
            return build(*args)
        finally:
            self.depth -= 1

    def _object(self, *args: Any) -> Any:
        return self._nested(_decoder.JSONObject, *args)

    def _array(self, *args: Any) -> Any:
        return self._nested(_decoder.JSONArray, *args)

    def _string(self, s: str, end: int, strict: bool = True) -> tuple[str, int]:
        self._count()
        text, end = _decoder.py_scanstring(s, end, strict)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _TooMuch("the request body holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
        return text, end

    def _number(self, kind: Callable[[str], Any]) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            self._count()
            value = kind(text)
            if isinstance(value, float) and math.isinf(value):
                raise _TooMuch(f"the number {text[:40]} is out of range")
            return value

        return parse

    def _constant(self, name: str) -> Any:
        raise _TooMuch(f"{name} is not JSON")


def parse_large(raw: bytes, max_values: int) -> dict[str, Any]:
    """A large body, decoded by Python code (run it in a thread) with its values and depth bounded."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not UTF-8: {exc}") from None
    start = _WHITESPACE.match(text, 0).end()  # type: ignore[union-attr]
    if start == len(text):
        raise BadRequest("the request body is empty; a JSON object is expected")
    scan = _scanner.py_make_scanner(_Counting(max_values))
    try:
        body, end = scan(text, start)
    except _TooMuch as exc:
        raise BadRequest(str(exc)) from None
    except StopIteration:
        raise BadRequest(f"the request body is not valid JSON: no value at character {start}") from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if _WHITESPACE.match(text, end).end() != len(text):  # type: ignore[union-attr]
        raise BadRequest(f"the request body is not valid JSON: extra data at character {end}")
    return _object_or_400(body)
