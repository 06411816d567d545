"""Where a small non-streamed request's time goes inside the proxy: wall-clock counters around each stage.

The proxy runs with its stages wrapped (``--serve``: the middlewares, body reading and the JSON gate, the
lease, the upstream call, the release and its memory read, the answer's sends, the request events), against
the fake worker (tests/fake_worker.py), loaded; small ``/v1/chat/completions`` requests (``max_tokens`` 1) are
sent one at a time, and each stage's median wall time is printed in microseconds, with the p50 of the whole
request through the proxy and directly to the worker. A stage's time includes the stages inside it and, for
one that awaits, whatever else the loop ran meanwhile; medians of single runs, so compare runs made on the
same machine state. Stages the code no longer has are left out.

``--url``: the fake worker as a ``url:`` model (a server the proxy reaches but does not start, as a comparison
with other proxies must configure it), which has no process whose memory the proxy reads.

    .venv/bin/python -m bench.request_stages [--requests N] [--keys] [--url]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import runpy
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench.common import save, table, worker_arg
from bench.proxy_overhead import BODY
from tests.harness import FAKE_WORKER, LiveProxy, fake_config, free_port

USER, ADMIN = "sk-bench-user-0123456789", "sk-bench-admin-0123456789"

# (module, owner in it or "", attribute, label): the label's number orders the table
STAGES = [
    ("proxy.api.observe", "RequestEvents", "__call__", "0 the app, from the outermost middleware"),
    ("proxy.api.security", "RequestGuard", "__call__", "1 RequestGuard and below"),
    ("proxy.api.perkey", "PerKeyLimit", "__call__", "2 PerKeyLimit and below"),
    ("starlette.middleware.exceptions", "ExceptionMiddleware", "__call__", "2a ExceptionMiddleware and below"),
    ("starlette.routing", "Router", "app", "2b Router.app (route lookup) and below"),
    ("starlette.routing", "Route", "handle", "2c Route.handle and below"),
    ("proxy.api.common", "", "key_from_headers", "3 key_from_headers"),
    ("proxy.auth", "KeyRing", "authenticate", "3 KeyRing.authenticate"),
    ("proxy.api.common", "", "caller_id", "3 caller_id"),
    ("proxy.api.perkey", "InFlight", "hold", "3 InFlight.hold"),
    ("proxy.api.openai", "", "read_json", "4 read_json (body, JSON gate)"),
    ("proxy.api.openai", "", "_prepare", "4a _prepare (read_json, model_for)"),
    ("proxy.api.openai", "", "model_for", "5 model_for"),
    ("proxy.api.openai", "", "inline_images", "5 inline_images"),
    ("proxy.api.openai", "", "apply_model_defaults", "5 apply_model_defaults"),
    ("proxy.api.openai", "", "check_chat", "5 check_chat"),
    ("proxy.api.openai", "", "forward", "6 forward (lease, upstream, release)"),
    ("proxy.relay", "LeasedCall", "__aenter__", "7 LeasedCall enter (watch task, acquire)"),
    ("proxy.manager", "ModelManager", "acquire", "7a ModelManager.acquire"),
    ("proxy.relay", "LeasedCall", "post", "8 LeasedCall.post (upstream round trip)"),
    ("proxy.upstream", "Upstream", "request", "8a Upstream.request (aiohttp)"),
    ("proxy.largejson", "", "loads", "8b largejson.loads (the answer's usage)"),
    ("proxy.relay", "LeasedCall", "__aexit__", "9 LeasedCall exit (release)"),
    ("proxy.manager", "ModelManager", "_release", "9a ModelManager._release"),
    ("proxy.manager", "ModelManager", "_measure", "9b ModelManager._measure (memory read)"),
    ("starlette.responses", "Response", "__call__", "A Response.__call__ (head and body sends)"),
    ("proxy.events", "RequestNote", "open", "B RequestNote.open"),
    ("proxy.events", "RequestNote", "end", "B RequestNote.end (events, metrics)"),
]


def _wrap(times: dict[str, list[int]], func: Any, label: str) -> Any:
    clock = time.perf_counter_ns
    if asyncio.iscoroutinefunction(func):

        @functools.wraps(func)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return await func(*args, **kwargs)
            finally:
                times[label].append(clock() - start)

        return timed_async

    @functools.wraps(func)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return func(*args, **kwargs)
        finally:
            times[label].append(clock() - start)

    return timed


def serve(out: str, argv: list[str]) -> None:
    """The proxy (``python -m proxy`` with ``argv``), its stages counted: SIGUSR1 starts afresh, SIGUSR2
    writes each stage's count and median to ``out``."""
    import importlib

    times: dict[str, list[int]] = defaultdict(list)
    for module_name, owner_name, attr, label in STAGES:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name, None) if owner_name else module
        if owner is not None and callable(getattr(owner, attr, None)):
            setattr(owner, attr, _wrap(times, getattr(owner, attr), label))

    def dump(*_: Any) -> None:
        stats = {k: {"n": len(v), "median_us": statistics.median(v) / 1000} for k, v in sorted(times.items()) if v}
        Path(out).write_text(json.dumps(stats, indent=1))

    signal.signal(signal.SIGUSR1, lambda *_: times.clear())
    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["proxy", *argv]
    runpy.run_module("proxy", run_name="__main__")


async def _p50(url: str, requests: int, headers: dict[str, str]) -> float:
    import aiohttp

    async with aiohttp.ClientSession(headers=headers) as session:
        took = []
        for _ in range(requests + 20):
            start = time.perf_counter()
            async with session.post(url, json={**BODY, "max_tokens": 1}) as r:
                await r.read()
            took.append(time.perf_counter() - start)
        return statistics.median(took[20:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--keys", action="store_true", help="with API keys (the request sends a user key)")
    parser.add_argument("--url", action="store_true", help="the fake worker as a `url:` model, started here")
    parser.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(os.environ["BENCH_STAGES_OUT"], args.serve)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    tokens = {"api_key": [USER], "admin_key": [ADMIN]} if args.keys else None
    worker: subprocess.Popen[bytes] | None = None
    if args.url:  # a server the proxy does not start: no process of its own to read the memory of
        wport = free_port()
        worker = subprocess.Popen([sys.executable, FAKE_WORKER, "--port", str(wport), "--tokens", "64"])
        model: dict[str, Any] = {"name": "fake", "backend": "external", "url": f"http://127.0.0.1:{wport}"}
    else:
        model = fake_config("fake", "--tokens", "64")
    proxy = LiveProxy(root, [{**model, "parallel": 32}], tokens=tokens)
    out = root / "stages.json"
    with (root / "proxy.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.request_stages", "--serve", "--config", str(root / "config.yml")]
            + ["--port", str(proxy.port)],
            env={**os.environ, "BENCH_STAGES_OUT": str(out)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    user = {"Authorization": f"Bearer {USER}"} if args.keys else {}
    admin = {"Authorization": f"Bearer {ADMIN}"} if args.keys else {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(proxy.url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the proxy did not start; see {root / 'proxy.log'}") from None
                time.sleep(0.1)
        httpx.post(f"{proxy.url}/load/fake", headers=admin, timeout=120).raise_for_status()
        port = str(wport) if args.url else worker_arg(proxy.status(admin)["fake"]["pid"], "--port")
        url = proxy.url + "/v1/chat/completions"
        asyncio.run(_p50(url, 50, user))  # warm
        proc.send_signal(signal.SIGUSR1)
        through = asyncio.run(_p50(url, args.requests, user))
        proc.send_signal(signal.SIGUSR2)
        direct = asyncio.run(_p50(f"http://127.0.0.1:{port}/v1/chat/completions", args.requests, {}))
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stages = json.loads(out.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if worker is not None:
            worker.terminate()
            worker.wait()
    summary = {
        "keys": args.keys,
        "url": args.url,
        "p50_ms": {"proxy": through * 1000, "direct": direct * 1000},
        "stages": stages,
    }
    summary["load_average"] = os.getloadavg()[0]
    path = save("request_stages" + ("_keys" if args.keys else "") + ("_url" if args.url else ""), summary)
    rows = [(label, f"{s['median_us']:8.1f} us  (n={s['n']})") for label, s in stages.items()]
    rows += [
        ("p50 whole request proxy, direct", f"{through * 1000:.2f} ms, {direct * 1000:.2f} ms"),
        ("added p50", f"{(through - direct) * 1000:.2f} ms"),
        ("load average", f"{summary['load_average']:.2f}"),
        ("results", str(path)),
    ]
    print(table(rows))


if __name__ == "__main__":
    main()
