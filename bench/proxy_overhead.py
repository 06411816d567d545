"""The proxy's own cost, against a fake worker that streams as fast as it can (tests/fake_worker.py).

- chunks/s through the proxy vs direct to the worker, at concurrency 1 and 32 (goal ratio >= 0.5)
- the proxy process's CPU time per streamed request of 64 chunks (goal <= 2 ms)
- added p50 latency of a small non-streaming request (goal <= 1 ms)

Variants are interleaved in rounds; medians. The load comes from an aiohttp client in this process.

``--paced RATE``: the fake worker sends one chunk per write at RATE chunks/s per stream, as a real model sends
its tokens (a read per token, where the unpaced worker's chunks arrive many to a read), 4 streams at once: the
proxy's CPU per chunk (the per-token figure of ``bench.llm_stream`` without llama.cpp's noise) and its CPU
while idle with the model loaded (what a slow stream's per-token figure also carries).

    .venv/bin/python -m bench.proxy_overhead [--rounds N] [--quick] [--paced RATE]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
import psutil

from bench.common import load, median, save, start_proxy, table, worker_arg
from tests.harness import fake_config

CHUNKS = 64
PACED_CHUNKS = 256
BODY = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": CHUNKS}


async def stream_once(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url, json={**BODY, "stream": True}) as r:
        n = 0
        async for _ in r.content:
            n += 1
        return n


async def small_once(session: aiohttp.ClientSession, url: str) -> float:
    start = time.perf_counter()
    async with session.post(url, json={**BODY, "max_tokens": 1}) as r:
        await r.read()
    return time.perf_counter() - start


async def throughput(url: str, requests: int, concurrency: int) -> float:
    """Chunks per second over ``requests`` streamed requests, ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            async with sem:
                await stream_once(session, url)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        return requests * CHUNKS / (time.perf_counter() - start)


async def latencies(url: str, requests: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        await small_once(session, url)
        return [await small_once(session, url) for _ in range(requests)]


async def cpu_per_stream(url: str, proxy: psutil.Process, requests: int) -> float:
    async with aiohttp.ClientSession() as session:
        await stream_once(session, url)
        before = sum(proxy.cpu_times()[:2])
        for _ in range(requests):
            await stream_once(session, url)
        return (sum(proxy.cpu_times()[:2]) - before) / requests


async def events_once(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    """The SSE events of one streamed answer (its ``data:`` lines)."""
    async with session.post(url, json={**body, "stream": True}) as r:
        return sum([1 async for line in r.content if line.startswith(b"data: ")])


async def paced_cpu(url: str, proxy: psutil.Process, streams: int, concurrency: int) -> tuple[float, float, int]:
    """(proxy user CPU seconds, its system CPU seconds, chunks) over ``streams`` streams of the paced worker,
    ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)
    body = {**BODY, "model": "paced", "max_tokens": PACED_CHUNKS}
    async with aiohttp.ClientSession() as session:
        await events_once(session, url, body)

        async def one() -> int:
            async with sem:
                return await events_once(session, url, body)

        before = proxy.cpu_times()
        chunks = sum(await asyncio.gather(*(one() for _ in range(streams))))
        after = proxy.cpu_times()
        return after.user - before.user, after.system - before.system, chunks


def paced(rate: float, rounds: int) -> None:
    proxy = start_proxy([{**fake_config("paced", "--tokens", str(PACED_CHUNKS), "--rate", str(rate)), "parallel": 8}])
    try:
        load(proxy, "paced")
        assert proxy.proc is not None
        proxy_proc = psutil.Process(proxy.proc.pid)
        url = proxy.url + "/v1/chat/completions"
        per_chunk, user, idle = [], [], []
        for _ in range(rounds):
            before = sum(proxy_proc.cpu_times()[:2])
            time.sleep(5)
            idle.append((sum(proxy_proc.cpu_times()[:2]) - before) / 5)
            in_user, in_system, chunks = asyncio.run(paced_cpu(url, proxy_proc, 8, 4))
            per_chunk.append((in_user + in_system) / chunks)
            user.append(in_user / chunks)
    finally:
        proxy.stop()
    summary = {"rate": rate, "rounds": rounds, "proxy_cpu_us_per_chunk": median(per_chunk) * 1e6}
    summary["of_which_user_us"] = median(user) * 1e6
    summary |= {"proxy_idle_cpu_percent": median(idle) * 100, "raw": {"per_chunk": per_chunk, "idle": idle}}
    path = save("proxy_overhead_paced", summary)
    print(
        table(
            [
                ("paced chunks/s per stream, streams at once", f"{rate:g}, 4"),
                ("proxy CPU per chunk (user + system)", f"{summary['proxy_cpu_us_per_chunk']:.0f} us"),
                ("  of which user", f"{summary['of_which_user_us']:.0f} us"),
                ("proxy CPU idle, model loaded", f"{summary['proxy_idle_cpu_percent']:.2f}% of a core"),
                ("results", str(path)),
            ]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 short rounds")
    parser.add_argument("--paced", type=float, default=0.0, help="chunks/s per stream of a paced worker (see above)")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    if args.paced:
        paced(args.paced, rounds)
        return
    scale = 1 if args.quick else 3

    # parallel 32: the fake worker serves concurrent streams, so the proxy queues none of them (what is measured
    # is the proxy's own cost per stream, not its queue)
    proxy = start_proxy([{**fake_config("fake", "--tokens", str(CHUNKS)), "parallel": 32}])
    try:
        status = load(proxy, "fake")
        port = worker_arg(status["pid"], "--port")
        assert proxy.proc is not None
        proxy_proc = psutil.Process(proxy.proc.pid)
        urls = {"proxy": proxy.url + "/v1/chat/completions", "direct": f"http://127.0.0.1:{port}/v1/chat/completions"}
        out: dict[str, Any] = {f"{k}_{c}": [] for k in urls for c in (1, 32)}
        out |= {"p50_proxy": [], "p50_direct": [], "cpu_ms": []}
        for _ in range(rounds):
            for concurrency in (1, 32):
                for name, url in urls.items():
                    out[f"{name}_{concurrency}"].append(asyncio.run(throughput(url, 60 * scale, concurrency)))
            for name, url in urls.items():
                out[f"p50_{name}"].append(median(asyncio.run(latencies(url, 100 * scale))) * 1000)
            out["cpu_ms"].append(asyncio.run(cpu_per_stream(urls["proxy"], proxy_proc, 50 * scale)) * 1000)
        rss_mb = proxy_proc.memory_info().rss / 2**20
    finally:
        proxy.stop()

    med = {k: median(v) for k, v in out.items()}
    summary = {
        "rounds": rounds,
        "chunks_per_s": {k: med[k] for k in ("proxy_1", "direct_1", "proxy_32", "direct_32")},
        "ratio_c1": med["proxy_1"] / med["direct_1"],
        "ratio_c32": med["proxy_32"] / med["direct_32"],
        "proxy_cpu_ms_per_64_chunk_stream": med["cpu_ms"],
        "p50_ms": {"proxy": med["p50_proxy"], "direct": med["p50_direct"]},
        "added_p50_ms": med["p50_proxy"] - med["p50_direct"],
        "proxy_rss_mb_after": rss_mb,
        "raw": out,
    }
    path = save("proxy_overhead", summary)
    print(
        table(
            [
                ("chunks/s c=1 proxy, direct", f"{med['proxy_1']:.0f}, {med['direct_1']:.0f}"),
                ("chunks/s c=32 proxy, direct", f"{med['proxy_32']:.0f}, {med['direct_32']:.0f}"),
                ("ratio c=1, c=32 (goal >= 0.5)", f"{summary['ratio_c1']:.2f}, {summary['ratio_c32']:.2f}"),
                ("proxy CPU per 64-chunk stream (goal <= 2 ms)", f"{med['cpu_ms']:.2f} ms"),
                ("p50 small request proxy, direct", f"{med['p50_proxy']:.2f} ms, {med['p50_direct']:.2f} ms"),
                ("added p50 (goal <= 1 ms)", f"{summary['added_p50_ms']:.2f} ms"),
                ("proxy RSS after the run", f"{rss_mb:.1f} MiB"),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
