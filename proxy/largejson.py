"""Large JSON answers from workers (embeddings: 2,048 vectors of 576 floats are 24 MB), decoded, reshaped and
encoded off the event loop, piece by piece. No HTTP here.

A thread alone does not free the loop: the C JSON decoder holds the GIL for a whole document (a 24 MB
embeddings answer stalled the loop 0.6 s from a thread as it did on the loop). So an answer larger than
``LARGE_BYTES`` is cut, in a thread, into its top-level values and each top-level array into its items, by a
scan that only jumps between brackets and quotes (a regex search runs over the numbers between them), and
each piece is decoded on its own; encoding goes item by item the same way. Between pieces the thread lets
the loop run. Smaller answers are decoded at once, on the loop.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from proxy.errors import UpstreamError

T = TypeVar("T")

LARGE_BYTES = 1024 * 1024  # answers larger than this are decoded and encoded in a thread, in pieces

_OPEN, _CLOSE, _QUOTE, _COMMA = b"[{", b"]}", ord('"'), ord(",")
_MARKS_TOP = re.compile(rb'[\[\]{}",]')  # between a container's direct children: commas count
_MARKS_INSIDE = re.compile(rb'[\[\]{}"]')  # deeper: the commas between numbers are skipped in one search
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SPACE = re.compile(rb"[ \t\r\n]*")
_loads = json.loads  # one C call, the GIL held throughout: given pieces of a large answer, never all of it


def _skip_space(raw: bytes, i: int) -> int:
    m = _SPACE.match(raw, i)
    return m.end() if m else i


def _children(raw: bytes, start: int) -> tuple[list[tuple[int, int]], int]:
    """The spans of the direct children of the array or object that opens at ``start`` (an object's are
    ``"key": value``), and the index just past its end. ValueError when it never ends."""
    spans: list[tuple[int, int]] = []
    depth, pos, begin = 1, start + 1, start + 1
    while True:
        m = (_MARKS_TOP if depth == 1 else _MARKS_INSIDE).search(raw, pos)
        if m is None:
            raise ValueError("the JSON ends inside an array or object")
        at = m.start()
        mark = raw[at]
        if mark == _QUOTE:
            string = _STRING.match(raw, at)
            if string is None:
                raise ValueError("the JSON ends inside a string")
            pos = string.end()
            continue
        if mark in _OPEN:
            depth += 1
        elif mark in _CLOSE:
            depth -= 1
            if depth == 0:
                if raw[begin:at].strip():
                    spans.append((begin, at))
                return spans, at + 1
        elif mark == _COMMA:
            spans.append((begin, at))
            begin = at + 1
        pos = at + 1


def _member(raw: bytes, begin: int, end: int) -> tuple[str, int]:
    """An object member's key and where its value starts."""
    key = _STRING.match(raw, _skip_space(raw, begin))
    colon = _skip_space(raw, key.end()) if key is not None else end
    if key is None or colon >= end or raw[colon] != ord(":"):
        raise ValueError("an object member is not a string key and a value")
    return _loads(raw[key.start() : key.end()]), colon + 1


def _pieces(raw: bytes, only: Collection[str] | None) -> Any:
    start = _skip_space(raw, 0)
    if start >= len(raw) or raw[start] != ord("{"):
        return _loads(raw)
    members, end = _children(raw, start)
    if raw[end:].strip():
        raise ValueError("extra data after the JSON object")
    out: dict[str, Any] = {}
    for begin, stop in members:
        key, at = _member(raw, begin, stop)
        if only is not None and key not in only:
            continue
        at = _skip_space(raw, at)
        if raw[at : at + 1] == b"[":
            items, after = _children(raw, at)
            if raw[after:stop].strip():
                raise ValueError("extra data after an array")
            out[key] = [_loads(raw[a:b]) for a, b in items]
        else:
            out[key] = _loads(raw[at:stop])
    return out


def decode(raw: bytes, only: Collection[str] | None = None) -> Any:
    """``raw`` as JSON: a large object piece by piece (and with ``only``, just those top-level keys);
    ValueError when it is not JSON."""
    if len(raw) <= LARGE_BYTES:
        data = _loads(raw)
        return {k: v for k, v in data.items() if k in only} if only is not None and isinstance(data, dict) else data
    return _pieces(raw, only)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode(value: Any) -> bytes:
    """``value`` as compact JSON; a dict's list values item by item."""
    if not isinstance(value, dict):
        return _dumps(value)
    parts = []
    for key, item in value.items():
        body = b"[" + b",".join(_dumps(v) for v in item) + b"]" if isinstance(item, list) else _dumps(item)
        parts.append(_dumps(key) + b":" + body)
    return b"{" + b",".join(parts) + b"}"


async def off_loop(size: int, work: Callable[[], T]) -> T:
    """``work()`` at once for an answer of ``size`` bytes up to LARGE_BYTES, else in a thread."""
    if size <= LARGE_BYTES:
        return work()
    return await asyncio.to_thread(work)


async def loads(raw: bytes, only: Collection[str] | None = None) -> Any:
    """``decode``, in a thread for a large answer."""
    return await off_loop(len(raw), lambda: decode(raw, only))


def answer(raw: bytes) -> dict[str, Any]:
    """A worker's answer as a JSON object (``decode``); UpstreamError (502) when it is not one."""
    try:
        data = decode(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamError(502, "the worker answered something other than a JSON object")
    return data


async def answer_of(raw: bytes) -> dict[str, Any]:
    """``answer``, in a thread for a large one."""
    return await off_loop(len(raw), lambda: answer(raw))


async def reshape(raw: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    """A worker's answer decoded (``answer``), changed and encoded again, in a thread for a large one."""
    return await off_loop(len(raw), lambda: encode(change(answer(raw))))
