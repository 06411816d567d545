"""One caller against everyone else (issue 26): the review's findings replayed at small sizes on loopback.

A proxy with fake workers, two user keys and an admin key. Each finding is replayed by key A (or by no key
at all), and for each the table gives the proxy's RSS and open fds at the end of it, the event loop's
longest stall while it ran (the worst latency of a /health poller, every 20 ms, on its own connection),
whether key B was still served (a small chat on another model, sent while the abuse holds), and what the
abuse itself got:

- half-sent headers: 1,500 connections that send half a request's headers and nothing more (over the
  default server.max_connections of 1,000): how many the proxy closed, and in how long (header_timeout 10 s)
- per-key concurrency: key A opens 80 streams held by their worker (max_concurrent_per_key: 32 here): how
  many were taken and how many got 429
- queued jobs of 1 MB: one job holds the model, then 4 more of 1 MB each wait (/v2/{model}/run): the RSS they add
- a 30,000-value enum in a response_format schema: the answer's status and time
- 3,000 embedding inputs: the answer's status and time
- A1111 options: key A selects another checkpoint; the one key B gets

Loops are bounded and everything stops by itself; only 127.0.0.1 is contacted.

    .venv/bin/python -m bench.abuse [--connections 1500]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import resource
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import save, start_proxy
from tests.harness import LiveProxy, fake_config, gone, wait_until

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
ADMIN = {"Authorization": "Bearer admin-key"}
MSG = [{"role": "user", "content": "hi"}]
HALF = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl"
PER_KEY = 32
MB = 1024 * 1024


class Poller:
    """/health every 20 ms on its own connection; the worst latency since the last ``reset``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.wait(0.02):
                start = time.perf_counter()
                try:
                    client.get(self.url + "/health").raise_for_status()
                except httpx.HTTPError:
                    self.failures += 1
                self.worst = max(self.worst, time.perf_counter() - start)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=35)

    def reset(self) -> None:
        self.worst = 0.0
        self.failures = 0


def served(proxy: LiveProxy) -> bool:
    """Is key B still served: a small chat on the free model."""
    try:
        body = {"model": "free", "messages": MSG, "max_tokens": 2}
        return httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=B, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


class Bench:
    def __init__(self, proxy: LiveProxy, gates: Path) -> None:
        self.proxy = proxy
        self.gates = gates
        assert proxy.proc is not None
        self.process = psutil.Process(proxy.proc.pid)
        self.rows: list[dict[str, Any]] = []

    def row(self, finding: str, poller: Poller, second: bool, result: str) -> None:
        rss = self.process.memory_info().rss / MB
        row = {
            "finding": finding,
            "rss_mb": round(rss, 1),
            "fds": self.process.num_fds(),
            "worst_health_ms": round(poller.worst * 1000, 1),
            "health_failures": poller.failures,
            "key_b_served": second,
            "result": result,
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def half_headers(self, poller: Poller, count: int) -> None:
        poller.reset()
        socks: list[socket.socket] = []
        try:
            opened = time.monotonic()
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10)
                s.sendall(HALF)
                s.setblocking(False)
                socks.append(s)
            second = served(self.proxy)
            open_now = self.process.num_fds()
            deadline = opened + 15
            closed = 0
            last = 0.0
            pending = list(socks)
            while pending and time.monotonic() < deadline:
                still = []
                for s in pending:
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        still.append(s)
                        continue
                    except ConnectionResetError:
                        data = b""
                    if data and not data.startswith(b"HTTP/1.1 408"):
                        still.append(s)
                        continue
                    closed += 1
                    last = time.monotonic() - opened
                pending = still
                if pending:
                    time.sleep(0.1)  # a bench polls its sockets; tests never do this
            result = f"{closed}/{count} closed by the proxy, the last {last:.1f} s after the first opened"
            self.row("half-sent headers", poller, second, f"{result}; proxy fds with them open: {open_now}")
        finally:
            for s in socks:
                s.close()

    def per_key(self, poller: Poller) -> None:
        poller.reset()
        gate = self.gates / "streams"
        body = {"model": "held", "messages": MSG, "stream": True, "max_tokens": 4}
        held: list[httpx.Response] = []
        readers: list[Iterator[bytes]] = []  # kept: a dropped reader closes its response
        lock = threading.Lock()
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=200)) as client:

            def open_one(_: int) -> int:
                request = client.build_request("POST", self.proxy.url + "/v1/chat/completions", json=body, headers=A)
                response = client.send(request, stream=True)
                with lock:
                    held.append(response)
                if response.status_code == 200:
                    reader = response.iter_bytes()
                    next(reader)  # the first chunk: the stream holds its slot
                    with lock:
                        readers.append(reader)
                return response.status_code

            try:
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    codes = list(pool.map(open_one, range(PER_KEY + 48)))
                second = served(self.proxy)
                taken, refused = codes.count(200), codes.count(429)
                self.row("per-key concurrency", poller, second, f"key A: {taken} streams taken, {refused} got 429")
            finally:
                gate.touch()
                for response in held:
                    response.close()

    def jobs(self, poller: Poller) -> None:
        poller.reset()
        gate = self.gates / "answers"
        url = self.proxy.url + "/v2/slow/run"
        first = httpx.post(url, json={"input": {"messages": MSG}}, headers=A, timeout=30)
        wait_until(lambda: self.proxy.status(ADMIN)["slow"]["in_flight"] == 1, timeout=60)
        before = self.process.memory_info().rss
        pad = "x" * MB
        codes = [
            httpx.post(url, json={"input": {"messages": MSG, "user": pad}}, headers=A, timeout=60).status_code
            for _ in range(4)
        ]
        grown = (self.process.memory_info().rss - before) / MB
        second = served(self.proxy)
        self.row(
            "4 queued jobs of 1 MB",
            poller,
            second,
            f"statuses {codes} (first {first.status_code}); RSS +{grown:.1f} MiB",
        )
        gate.touch()

    def timed(self, poller: Poller, finding: str, path: str, body: dict[str, Any]) -> None:
        poller.reset()
        pid = self.proxy.status(ADMIN)["free"]["pid"]
        start = time.perf_counter()
        r = httpx.post(self.proxy.url + path, json=body, headers=A, timeout=300)
        seconds = time.perf_counter() - start
        second = served(self.proxy)
        same = self.proxy.status(ADMIN)["free"]["pid"] == pid
        result = f"HTTP {r.status_code} in {seconds:.2f} s; worker pid unchanged: {same}"
        self.row(finding, poller, second, result)

    def a1111(self, poller: Poller) -> None:
        poller.reset()
        options = self.proxy.url + "/sdapi/v1/options"
        before = httpx.get(options, headers=B, timeout=10).json()["sd_model_checkpoint"]
        httpx.post(options, json={"sd_model_checkpoint": "sd-b"}, headers=A, timeout=10).raise_for_status()
        after = httpx.get(options, headers=B, timeout=10).json()["sd_model_checkpoint"]
        mine = httpx.get(options, headers=A, timeout=10).json()["sd_model_checkpoint"]
        result = f"key A chose sd-b (it gets {mine}); key B got {before}, then {after}"
        self.row("A1111 options", poller, after == before, result)


def configs(root: Path, gates: Path) -> list[dict[str, Any]]:
    (root / "sd").mkdir(parents=True, exist_ok=True)
    return [
        fake_config("held", "--gate", str(gates / "streams"), parallel=64),
        fake_config("slow", "--gate-answers", str(gates / "answers")),
        fake_config("free", parallel=4),
        *({"name": n, "backend": "diffusers", "model": {"path": str(root / "sd")}} for n in ("sd-a", "sd-b")),
    ]


@contextlib.contextmanager
def running(make: Callable[[], LiveProxy]) -> Iterator[LiveProxy]:
    proxy = make()
    try:
        yield proxy
    finally:
        left = [p.pid for p in proxy.workers()]
        proxy.stop()
        wait_until(lambda: gone(left), timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1500, help="half-sent requests to open")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:  # this process holds the half-sent connections
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard)
        )
    root = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    gates = root / "gates"
    gates.mkdir()
    tokens = {"api_key": ["key-a", "key-b"], "admin_key": ["admin-key"]}
    limits = {"max_queue": 64, "max_concurrent_per_key": PER_KEY}

    def make() -> LiveProxy:
        return start_proxy(configs(root, gates), tokens=tokens, limits=limits)

    with running(make) as proxy, Poller(proxy.url) as poller:
        for model in ("held", "slow", "free"):
            httpx.post(f"{proxy.url}/load/{model}", headers=ADMIN, timeout=120).raise_for_status()
        bench = Bench(proxy, gates)
        bench.row("(idle, models loaded)", poller, served(proxy), "")
        bench.half_headers(poller, args.connections)
        bench.per_key(poller)
        bench.jobs(poller)
        enum = [f"value-{i}" for i in range(30_000)]
        schema = {"type": "object", "properties": {"v": {"enum": enum}}, "required": ["v"]}
        fmt = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
        chat = {"model": "free", "messages": MSG, "max_tokens": 4, "response_format": fmt}
        bench.timed(poller, "30,000-value enum", "/v1/chat/completions", chat)
        inputs = [f"text number {i}" for i in range(3000)]
        bench.timed(poller, "3,000 embedding inputs", "/v1/embeddings", {"model": "free", "input": inputs})
        bench.a1111(poller)
    print()
    header = ("finding", "RSS MiB", "fds", "worst /health ms", "key B served", "result")
    lines = [header] + [
        (
            r["finding"],
            str(r["rss_mb"]),
            str(r["fds"]),
            f"{r['worst_health_ms']}" + (f" ({r['health_failures']} failed)" if r["health_failures"] else ""),
            "yes" if r["key_b_served"] else "NO",
            r["result"],
        )
        for r in bench.rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1])
    print(f"\nresults: {save('abuse', {'rows': bench.rows, 'connections': args.connections})}")


if __name__ == "__main__":
    main()
