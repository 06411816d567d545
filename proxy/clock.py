"""Injectable time: the manager reads the time and sets timers only through a Clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (for expires_at and created_at)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)


class ManualClock:
    """A clock that moves only when told to; due timers fire inside ``advance``."""

    def __init__(self, start: float = 1_000.0, wall: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._timers: list[tuple[float, int, Callable[[], None], _ManualTimer]] = []
        self._seq = 0

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer()
        self._seq += 1
        self._timers.append((self._now + delay, self._seq, callback, timer))
        return timer

    def advance(self, seconds: float) -> None:
        target = self._now + seconds
        while True:
            due = sorted((t for t in self._timers if t[0] <= target and not t[3].cancelled), key=lambda t: t[:2])
            if not due:
                break
            when, _, callback, timer = due[0]
            self._timers.remove(due[0])
            self._now = max(self._now, when)
            callback()
        self._now = target
        self._timers = [t for t in self._timers if not t[3].cancelled]


class _ManualTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
