"""What the bench scripts share: a live proxy in a temp dir, a worker's address, medians, results."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.harness import LiveProxy

RESULTS = Path(__file__).resolve().parent / "results"


def start_proxy(models: list[dict[str, Any]], **kw: Any) -> LiveProxy:
    return LiveProxy(Path(tempfile.mkdtemp(prefix="bench-")), models, **kw).start()


def load(proxy: LiveProxy, model: str) -> dict[str, Any]:
    """Load a model and return its /status entry (pid, ...)."""
    httpx.post(f"{proxy.url}/load/{model}", timeout=120).raise_for_status()
    return proxy.status()[model]


def worker_arg(pid: int, flag: str) -> str:
    cmd = psutil.Process(pid).cmdline()
    return cmd[cmd.index(flag) + 1]


def runtime(pid: int) -> float:
    """The CPU seconds of a process, its ended threads included, from the scheduler's own count (the process's
    CPU-time clock: ``clock_getcpuclockid``'s value, nanoseconds), where ``cpu_times`` counts in 10 ms ticks:
    an idle process's few ms a second need it."""
    return time.clock_gettime((~pid << 3) | 2)  # Linux: CPUCLOCK_SCHED of the whole process


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(values) < 2:
        return (values[0],) * 3 if values else (float("nan"),) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
