"""The stall watchdog: kill a worker that has requests in flight and makes no progress.

A deadlock or a hung abort would otherwise hold its requests for ever. Progress is CPU time (the worker's
process tree, ``supervisor.Worker.cpu_seconds``), checked ``_STALL_CHECKS`` times per ``stall_timeout``.
A worker whose requests wait on a slow reader is not stalled: while a send of one of its answers to its
client is pending (the client is not reading: ``Lease.writing``), the worker is blocked on the proxy, not
hung, and the watch starts over. Its exit after a kill takes the crash path: the requests in flight get an
explicit error. The manager says what it knows of the model (``Activity``); time comes from its clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.clock import Clock, Timer

log = logging.getLogger("proxy.watchdog")

_STALL_CHECKS = 4  # progress checks per stall_timeout (at most every _STALL_CHECK_MAX seconds)
_STALL_CHECK_MAX = 5.0
_MIN_CPU_SHARE = 0.01  # less CPU than this share of one core between two checks is "no progress"


class Watched(Protocol):
    """What the watchdog uses of a worker (``supervisor.Worker``, a test's fake)."""

    @property
    def pid(self) -> int | None: ...

    def cpu_seconds(self) -> float | None: ...

    def kill(self, reason: str) -> None: ...


@dataclass(frozen=True)
class Activity:
    """A loaded model's requests now: in flight, and of those, how many wait on their client's reading."""

    in_flight: int
    writing: int = 0


class StallWatch:
    """One worker's watch, from its load until it is no longer the model's ready worker (``activity`` says
    None) or is killed."""

    def __init__(
        self, clock: Clock, limit: float, worker: Watched, name: str, activity: Callable[[], Activity | None]
    ) -> None:
        self._clock = clock
        self._limit = limit
        self._worker = worker
        self._name = name
        self._activity = activity
        self._interval = min(_STALL_CHECK_MAX, limit / _STALL_CHECKS)
        self._last: float | None = None
        self._quiet = 0.0
        self._timer: Timer | None = None

    @classmethod
    def start(
        cls, clock: Clock, limit: float, worker: Watched, name: str, activity: Callable[[], Activity | None]
    ) -> StallWatch | None:
        """Watch this worker; None when the watchdog is off (``stall_timeout`` 0 or infinite) or there is
        nothing here to measure (a server at a url)."""
        if limit <= 0 or math.isinf(limit):
            return None
        watch = cls(clock, limit, worker, name, activity)
        watch._last = worker.cpu_seconds()
        if watch._last is None:
            return None
        watch._timer = clock.call_later(watch._interval, watch._check)
        return watch

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        now = self._activity()
        if now is None:
            return
        cpu = self._worker.cpu_seconds()
        if cpu is None:
            return
        idle_cpu = self._last is not None and cpu - self._last < self._interval * _MIN_CPU_SHARE
        # busy with no progress, and not because its client is slow to read what it made
        stalled = now.in_flight > 0 and now.writing == 0 and idle_cpu
        self._quiet = self._quiet + self._interval if stalled else 0.0
        self._last = cpu
        if self._quiet >= self._limit:
            why = f"the worker made no progress for {self._quiet:g}s with {now.in_flight} requests in flight; killed"
            log.warning("model %s: worker %s: %s", self._name, self._worker.pid, why)
            self._worker.kill(why)
            return
        self._timer = self._clock.call_later(self._interval, self._check)
