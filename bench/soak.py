"""Soak (issue 11): three models with room for one, clients that walk away, 2,000 requests at 64 at once.

Two SmolLM2 configs (``smollm2-a``, ``smollm2-b``: the same GGUF, two models to the proxy) and Piper
share a proxy with ``max_loaded_models: 1``, so nearly every other request is a switch. SmolLM2 requests
alternate streamed and plain; Piper's are streamed speech. 10% of the requests of every kind are dropped by
their clients (a stream after its first chunk, a plain request after a random wait). Requests go out at a
fixed concurrency until the count is reached or the time bound runs out; then the proxy is stopped.

Reports, in the issue's form: requests lost (neither dropped by their client, nor answered in full, nor
refused with a 503 that carries Retry-After: errors, truncated streams, timeouts), other 5xx, worker
crashes (an unexpected exit in the proxy's log), orphans (processes ever seen under the proxy that are
still alive after it stopped), the proxy's open fds and RSS when request 500 finished and at the end
(with their change in %), and the total time. Goal: 0 lost, 0 other 5xx, 0 crashes, 0 orphans, fds and
RSS within 5% between request 500 and the end, under 10 minutes.

    .venv/bin/python -m bench.soak [--requests 2000] [--concurrency 64] [--max-seconds 1500] [--mark 500]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import signal
import sys
import time
from typing import Any

import httpx
import psutil

from bench.common import save, start_proxy, table
from tests.harness import REPO, smollm2_config, wait_until

MODELS = ["smollm2-a", "smollm2-b", "piper-joe"]
DROP = 0.10


def configs() -> list[dict[str, Any]]:
    import yaml

    out = [smollm2_config(name=name, aliases=[], keep_alive="5m") for name in MODELS[:2]]
    out.append(yaml.safe_load((REPO / "configs" / "piper.yaml").read_text()))
    return out


def _refused(r: httpx.Response) -> bool:
    """A documented refusal: 503 with Retry-After (the queue is full, the model cannot start now)."""
    return r.status_code == 503 and "retry-after" in r.headers


class Soak:
    def __init__(self, url: str, rng: random.Random) -> None:
        self.url = url
        self.rng = rng
        self.results: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []
        self.server_errors = 0  # 5xx other than a 503 with Retry-After

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        kind = MODELS[i % 3]
        drop = self.rng.random() < DROP
        wait = self.rng.uniform(0.05, 5.0)
        try:
            if kind.startswith("smollm2"):
                ok = await self.chat(client, kind, stream=(i // 3) % 2 == 0, drop=drop, wait=wait)
            else:
                ok = await self.speech(client, drop=drop)
        except httpx.TimeoutException:
            ok = "dropped" if drop else "lost: timeout"
        except httpx.HTTPError as exc:
            ok = f"lost: {type(exc).__name__}: {exc}"
        key = ok if ok in ("ok", "dropped", "refused") else "lost"
        self.results[f"{kind} {key}"] += 1
        if key == "lost":
            self.lost.append(f"{kind}: {ok}")

    def _failed(self, r: httpx.Response, text: str) -> str:
        if _refused(r):
            return "refused"
        if r.status_code >= 500:
            self.server_errors += 1
        return f"lost: {r.status_code} {text[:200]}"

    async def chat(self, client: httpx.AsyncClient, model: str, stream: bool, drop: bool, wait: float) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 16,
            "stream": stream,
        }
        if not stream:
            timeout = httpx.Timeout(600, read=wait) if drop else httpx.Timeout(600)
            r = await client.post("/v1/chat/completions", json=body, timeout=timeout)
            if r.status_code != 200:
                return self._failed(r, r.text)
            return "ok" if r.json()["choices"][0]["message"]["content"] is not None else "lost: no content"
        last = ""
        async with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return self._failed(r, (await r.aread()).decode(errors="replace"))
            async for line in r.aiter_lines():
                if not line or line.startswith(":"):  # SSE comments while the model loads
                    continue
                if drop:
                    return "dropped"
                last = line
                if '"error"' in line:
                    return f"lost: {line[:200]}"
        return "ok" if last == "data: [DONE]" else f"lost: stream ended with {last[:200]!r}"

    async def speech(self, client: httpx.AsyncClient, drop: bool) -> str:
        body = {
            "model": "piper-joe",
            "input": "The soak goes on. It goes on a little longer.",
            "response_format": "pcm",
        }
        size = 0
        async with client.stream("POST", "/v1/audio/speech", json=body, timeout=600) as r:
            if r.status_code != 200:
                return self._failed(r, (await r.aread()).decode(errors="replace"))
            async for chunk in r.aiter_raw():
                if drop:
                    return "dropped"
                size += len(chunk)
        return "ok" if size > 22050 else f"lost: only {size} bytes of audio"


def alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def proxy_probe(pid: int) -> tuple[int, float]:
    proc = psutil.Process(pid)
    return proc.num_fds(), proc.memory_info().rss / 2**20


def _change(a: float, b: float) -> float:
    return round(100 * (b - a) / a, 1) if a else float("nan")


async def soak(
    url: str, proxy_pid: int, requests: int, concurrency: int, max_seconds: float, mark: int, seen: set[int]
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        runner = Soak(url, random.Random(2026))
        fds0, rss0 = proxy_probe(proxy_pid)
        at_mark: tuple[int, float] | None = None
        done = 0
        started = time.monotonic()
        deadline = started + max_seconds
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def lane() -> None:
            nonlocal done, at_mark
            while time.monotonic() < deadline:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await runner.one(client, i)
                done += 1
                if done == mark:
                    at_mark = proxy_probe(proxy_pid)
                for proc in psutil.Process(proxy_pid).children(recursive=True):
                    seen.add(proc.pid)

        # lanes stop taking requests at the deadline; what is still in flight then gets a minute more, and
        # is then cut (counted, not lost: it is the bench that gave up, not the proxy)
        lanes = [asyncio.create_task(lane()) for _ in range(concurrency)]
        _, cut = await asyncio.wait(lanes, timeout=max(0.0, deadline - time.monotonic()) + 60)
        for task in cut:
            task.cancel()
        await asyncio.gather(*cut, return_exceptions=True)
        elapsed = time.monotonic() - started
        fds1, rss1 = proxy_probe(proxy_pid)
    # the clients' connections closed: what the proxy still holds (its connections to the loaded
    # worker stay pooled); polled until it stops dropping, for at most 10 s
    closed = proxy_probe(proxy_pid)
    until = time.monotonic() + 10
    while time.monotonic() < until:
        await asyncio.sleep(0.5)
        now = proxy_probe(proxy_pid)
        if now[0] >= closed[0]:
            break
        closed = now
    fds_m, rss_m = at_mark if at_mark is not None else (0, 0.0)
    return {
        "requests_sent": requests - queue.qsize(),
        "requests_done": done,
        "cut_at_deadline": len(cut),
        "seconds": round(elapsed, 1),
        "results": dict(sorted(runner.results.items())),
        "lost": len(runner.lost),
        "other_5xx": runner.server_errors,
        "lost_examples": runner.lost[:10],
        f"proxy_fds (start, request {mark}, end, clients closed)": [fds0, fds_m, fds1, closed[0]],
        f"proxy_rss_mib (start, request {mark}, end, clients closed)": [
            round(rss0, 1),
            round(rss_m, 1),
            round(rss1, 1),
            round(closed[1], 1),
        ],
        f"fds change % (request {mark} -> end)": _change(fds_m, fds1),
        f"rss change % (request {mark} -> end)": _change(rss_m, rss1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=1500.0, help="stop sending new requests after this")
    parser.add_argument("--mark", type=int, default=500, help="fds and RSS are compared from this request on")
    args = parser.parse_args()
    # a SIGTERM (timeout(1), a CI bound) ends the run through the finally below: the proxy is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    proxy = start_proxy(configs(), limits={"max_loaded_models": 1, "max_queue": 1024})
    assert proxy.proc is not None
    seen: set[int] = set()
    try:
        result = asyncio.run(
            soak(proxy.url, proxy.proc.pid, args.requests, args.concurrency, args.max_seconds, args.mark, seen)
        )
    finally:
        seen.update(p.pid for p in proxy.workers())
        proxy.stop()
    try:
        wait_until(lambda: not alive(seen), timeout=15)
    except AssertionError:
        pass  # counted below
    orphans = alive(seen)
    log = proxy.log()
    result["crashes"] = log.count("exited with code")
    result["stalls_killed"] = log.count("made no progress")
    result["orphans"] = len(orphans)
    result["workers_seen"] = len(seen)
    result["total_seconds (proxy start to stop)"] = round(time.monotonic() - started, 1)
    result["load_average (1, 5, 15 min)"] = [round(x, 2) for x in psutil.getloadavg()]
    path = save("soak", result)
    rows = [(k, str(v)) for k, v in result.items() if k != "lost_examples"]
    print(table(rows))
    for example in result["lost_examples"]:
        print("  lost:", example)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
