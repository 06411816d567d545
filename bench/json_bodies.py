"""Large JSON bodies: how far the proxy's RSS rises and how long /health waits while it parses them.

The body is the worst case found in issue 11, ``{"model": ..., "x": [{}, {}, ...]}`` (each ``{}`` costs 3
bytes on the wire and ~64 bytes as a Python dict). It is sent once, then ``--concurrency`` at a time;
meanwhile a thread asks /health every 10 ms (its slowest answer is the event loop's longest stall) and
another samples the proxy's RSS. ``--tree /work/main`` runs the proxy from another checkout (the
baseline: no max_json_bytes there, so its body limit is raised instead).

    python -m bench.json_bodies [--mib 32] [--concurrency 10] [--tree PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

import tests.harness
from bench.common import save, start_proxy, table
from tests.harness import fake_config


def body(mib: float) -> bytes:
    n = int(mib * 1024 * 1024) // 3
    return b'{"model": "fake", "x": [' + b"{}," * (n - 1) + b"{}]}"


class Watch:
    """/health's slowest answer and the proxy's peak RSS while running."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.proc = url, psutil.Process(pid)
        self.worst = 0.0
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._health), threading.Thread(target=self._rss)]

    def _health(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                t = time.perf_counter()
                client.get(self.url + "/health")
                self.worst = max(self.worst, time.perf_counter() - t)
                self.stop.wait(0.01)

    def _rss(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.005)

    def __enter__(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def run(mib: float, concurrency: int, tree: str | None) -> dict[str, Any]:
    limit = int(mib * 1024 * 1024) + 4096
    if tree:
        tests.harness.REPO = Path(tree)
        limits: dict[str, Any] = {"max_body_bytes": limit}
    else:
        limits = {"max_body_bytes": limit, "max_json_bytes": limit}
    proxy = start_proxy([fake_config("fake")], limits=limits)
    assert proxy.proc is not None
    data = body(mib)
    out: dict[str, Any] = {"tree": tree or str(tests.harness.REPO), "mib": mib, "concurrency": concurrency}
    try:
        base = psutil.Process(proxy.proc.pid).memory_info().rss
        out["rss_idle_mb"] = base / 1e6

        def send() -> int:
            headers = {"content-type": "application/json"}
            return httpx.post(
                proxy.url + "/v1/chat/completions", content=data, headers=headers, timeout=300
            ).status_code

        for label, n in (("one", 1), ("many", concurrency)):
            with Watch(proxy.url, proxy.proc.pid) as watch, concurrent.futures.ThreadPoolExecutor(n) as pool:
                statuses = list(pool.map(lambda _: send(), range(n)))
            out[f"{label}_statuses"] = sorted(set(statuses))
            out[f"{label}_rss_peak_mb"] = watch.peak / 1e6
            out[f"{label}_rss_rise_mb"] = (watch.peak - base) / 1e6
            out[f"{label}_health_worst_ms"] = watch.worst * 1e3
    finally:
        proxy.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=32)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--tree", help="run the proxy from this checkout (the baseline)")
    parser.add_argument("--quick", action="store_true", help="4 MiB, concurrency 2")
    args = parser.parse_args()
    mib, n = (4.0, 2) if args.quick else (args.mib, args.concurrency)
    result = run(mib, n, args.tree)
    print(table([(k, f"{v:.1f}" if isinstance(v, float) else str(v)) for k, v in result.items()]))
    save("json_bodies" + ("_baseline" if args.tree else ""), result)


if __name__ == "__main__":
    main()
