"""What /status, /api/ps and the metrics show of the manager's models and spares, read from its runtimes
(``proxy.runtime``): plain reads, no state changes."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Iterator
from typing import Any

from proxy.clock import Clock
from proxy.memory import MemoryProbe
from proxy.runtime import ModelStatus, Runtime, State, device
from proxy.spares import Spares


def expires_at(rt: Runtime, clock: Clock) -> float | None:
    """When its keep_alive runs out (wall clock); math.inf for never, None unless it is ready."""
    if rt.state is not State.READY:
        return None
    if math.isinf(rt.keep_alive):
        return math.inf
    now_mono, now_wall = clock.monotonic(), clock.time()
    deadline = rt.idle_deadline if rt.idle_deadline is not None else now_mono + rt.keep_alive
    return now_wall + (deadline - now_mono)


def models(runtimes: Iterable[Runtime], clock: Clock, probe: MemoryProbe) -> Iterator[ModelStatus]:
    """Each model's status, for /status, /api/ps and the metrics."""
    for rt in runtimes:
        worker = rt.worker
        pid = worker.pid if worker is not None else None
        running = rt.state in (State.STARTING, State.READY) and rt.config.url is None
        vram = sum(probe.vram(pid).values()) if pid and running else None
        yield ModelStatus(
            name=rt.config.name,
            backend=rt.config.backend,
            state=rt.state.value,
            pid=worker.pid if worker is not None else None,
            in_flight=rt.in_flight,
            keep_alive=rt.keep_alive,
            expires_at=expires_at(rt, clock),
            loaded_at=rt.loaded_at,
            last_error=rt.last_error,
            rss_bytes=probe.rss(pid) if pid else None,
            config=rt.effective,
            need=rt.counted if rt.state is State.READY else rt.need,
            device=device(rt) if running else None,
            vram_bytes=vram,
            waiting=rt.waiting,
            queued=rt.waiters,
            progress=rt.progress if rt.state is State.STARTING else None,
            phase=rt.phase if rt.state is State.STARTING else None,
        )


async def worker_reports(runtimes: Iterable[Runtime]) -> dict[str, dict[str, Any]]:
    """Each ready worker's own /health (progress of a running job, device, ...), asked at once."""
    ready = [
        rt for rt in runtimes if rt.state is State.READY and rt.worker is not None and rt.worker.upstream is not None
    ]

    async def ask(rt: Runtime) -> dict[str, Any] | None:
        assert rt.worker is not None and rt.worker.upstream is not None
        return await rt.worker.upstream.health_report(rt.config.health_path)

    reports = await asyncio.gather(*(ask(rt) for rt in ready))
    return {rt.config.name: r for rt, r in zip(ready, reports, strict=True) if r is not None}


def spares(spares: Spares | None, probe: MemoryProbe) -> list[dict[str, Any]]:
    """The warm spares, for /status: backend, pid, state (importing, waiting) and RSS."""
    if spares is None:
        return []
    return [{**s, "rss_bytes": probe.rss(int(str(s["pid"])))} for s in spares.status()]
