"""The proxy's own cost, against a fake worker that streams as fast as it can (tests/fake_worker.py).

- chunks/s through the proxy vs direct to the worker, at concurrency 1 and 32 (goal ratio >= 0.5)
- the proxy process's CPU time per streamed request of 64 chunks (goal <= 2 ms)
- added p50 latency of a small non-streaming request (goal <= 1 ms)

Variants are interleaved in rounds; medians. The load comes from an aiohttp client in this process.

    .venv/bin/python -m bench.proxy_overhead [--rounds N] [--quick]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 short rounds")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
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
