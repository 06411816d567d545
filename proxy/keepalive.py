"""keep_alive values: Ollama's semantics, parsed and formatted (see DESIGN.md's table).

A parsed value is seconds as a float: ``0.0`` unloads as soon as in-flight requests finish,
``math.inf`` (any negative input) keeps the model until it is unloaded by hand, ``None`` means
"absent: keep the current value".
"""

from __future__ import annotations

import math
import re
from typing import Any

from proxy.errors import BadRequest

FOREVER = math.inf

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")

ACCEPTED_FORMS = (
    "a number of seconds (300, 42.5), a duration string ('5m', '1h30m', '0s'), "
    "0 to unload at once, or a negative value to keep the model loaded"
)


def parse_duration(text: str) -> float | None:
    """Go's time.ParseDuration, as Ollama uses it; None when ``text`` is not a duration."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        return None
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


# Ollama's durations are int64 nanoseconds: anything longer (~292 years) is "forever" there too
LONGEST = 2**63 / 1e9


def _normalise(seconds: float) -> float:
    if not math.isfinite(seconds):
        raise ValueError("not a finite number")
    return FOREVER if seconds < 0 or seconds >= LONGEST else seconds


def parse_keep_alive(value: Any, field: str = "keep_alive") -> float | None:
    """Parse a keep_alive from a request or a config; raise BadRequest naming ``field``."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError("boolean")
        if isinstance(value, int | float):
            return _normalise(float(value))
        if isinstance(value, str):
            if _NUMBER.fullmatch(value.strip()):
                return _normalise(float(value))
            seconds = parse_duration(value)
            if seconds is not None:
                return _normalise(seconds)
    except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
        pass
    raise BadRequest(f"invalid {field} {value!r}: expected {ACCEPTED_FORMS}", param=field)


def format_keep_alive(seconds: float | None) -> str:
    """Render seconds back as a short Go-style duration ('5m0s' -> '5m', inf -> '-1')."""
    if seconds is None:
        return ""
    if math.isinf(seconds):
        return "-1"
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
    return out or "0s"


def keep_alive_of(body: dict[str, Any]) -> float | None:
    """A request's keep_alive, from the top level or from ``options`` (older clients put it there),
    taken out of the body: the one way every route reads it."""
    value = body.pop("keep_alive", None)
    options = body.get("options")
    if isinstance(options, dict) and "keep_alive" in options:
        inner = options.pop("keep_alive")
        if value is None:
            return parse_keep_alive(inner, "options.keep_alive")
    return parse_keep_alive(value)
