"""Pure eviction policy: which idle model makes room. No state, no I/O, no time of its own."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    name: str
    keep_alive: float  # seconds; math.inf for "forever"
    last_used: float  # monotonic
    busy: bool


def choose_victim(candidates: Iterable[Candidate]) -> str | None:
    """The idle model to unload: shortest keep_alive first, then least recently used.

    A busy model is never chosen; None when every loaded model is busy.
    """
    idle = [c for c in candidates if not c.busy]
    if not idle:
        return None
    return min(idle, key=lambda c: (c.keep_alive, c.last_used, c.name)).name


def backoff(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before retrying a model whose start failed ``failures`` times in a row."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (failures - 1)))
